//! Webhook deliveries from this process: one queue and one worker per tenant, so a tenant whose
//! endpoint is down or slow holds up only its own events. A worker sends its tenant's events in
//! order, up to [`MAX_BATCH`] a request; a request that fails (no answer within the timeout, or
//! any status but 2xx) is sent again after a backoff that doubles up to [`RetryPolicy::max_delay`],
//! for [`RetryPolicy::retry_for`] (ten minutes by default); then its events become a dead letter,
//! kept for an operator to list and re-drive ([`LocalWebhooks::dead_letters`],
//! [`LocalWebhooks::redrive`]). The tenant's URL and secret are read for every attempt, so a
//! corrected setting applies to the next one. This is the developer's own machine: receivers on
//! loopback and private addresses are allowed ([`super::guard`] is for the deployed function).
//! Every attempt is kept in a short log ([`LocalWebhooks::deliveries`]) for the dev page.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

use super::{WebhookEvent, WebhookSink};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The most events in one request.
pub const MAX_BATCH: usize = 100;

/// The most events a tenant's queue holds; past it, new ones become dead letters at once.
pub const MAX_QUEUED: usize = 10_000;

/// How a failed delivery is tried again.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// The first backoff; each next one doubles.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// How long a batch is retried before it becomes a dead letter.
    pub retry_for: Duration,
    /// How long one request may take.
    pub timeout: Duration,
    /// How long a worker waits to fill a batch once it has an event.
    pub linger: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            retry_for: Duration::from_secs(10 * 60),
            timeout: Duration::from_secs(5),
            linger: Duration::from_millis(100),
        }
    }
}

/// Events that could not be delivered, and why.
#[derive(Clone, Debug, Serialize)]
pub struct DeadLetter {
    pub tenant: String,
    pub events: Vec<WebhookEvent>,
    pub error: String,
    pub attempts: u32,
}

/// The most delivery attempts [`LocalWebhooks::deliveries`] keeps (the newest).
pub const KEPT_ATTEMPTS: usize = 500;

/// One attempt to deliver a batch of a tenant's events, as the dev page lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeliveryAttempt {
    pub tenant: String,
    /// When the attempt ended, RFC 3339.
    pub at: String,
    /// 1 for the first try of the batch.
    pub attempt: u32,
    /// `delivered`, `retrying` (refused or no answer: tried again after `retry_in_ms`),
    /// `dead-lettered` (given up on) or `dropped` (the tenant has no webhook any more).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    /// Each event's type, in order.
    pub types: Vec<String>,
    /// Each event's id.
    pub ids: Vec<String>,
}

type Attempts = Arc<Mutex<VecDeque<DeliveryAttempt>>>;

/// The webhook sink of `roomcast dev` and the tests.
pub struct LocalWebhooks {
    store: Arc<dyn Store>,
    policy: RetryPolicy,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    queues: Mutex<HashMap<String, mpsc::Sender<WebhookEvent>>>,
    dead: Arc<Mutex<Vec<DeadLetter>>>,
    attempts: Attempts,
}

impl LocalWebhooks {
    pub fn new(store: Arc<dyn Store>, policy: RetryPolicy, metrics: Arc<Metrics>) -> Arc<LocalWebhooks> {
        let http = super::guard::client(policy.timeout, true);
        Arc::new(LocalWebhooks {
            store,
            policy,
            metrics,
            http,
            queues: Mutex::default(),
            dead: Arc::default(),
            attempts: Arc::default(),
        })
    }

    /// The last [`KEPT_ATTEMPTS`] delivery attempts (of `tenant`, or all), oldest first.
    pub fn deliveries(&self, tenant: Option<&str>) -> Vec<DeliveryAttempt> {
        let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        attempts.iter().filter(|a| tenant.is_none_or(|t| t == a.tenant)).cloned().collect()
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues every dead letter again (of `tenant`, or all), and says how many events.
    pub async fn redrive(&self, tenant: Option<&str>) -> usize {
        let letters: Vec<DeadLetter> = {
            let mut dead = self.dead.lock().unwrap_or_else(|p| p.into_inner());
            let (again, keep) = dead.drain(..).partition(|d| tenant.is_none_or(|t| t == d.tenant));
            *dead = keep;
            again
        };
        let mut events = 0;
        for letter in letters {
            events += letter.events.len();
            let _ = self
                .enqueue(vec![super::Queued { tenant: letter.tenant, events: letter.events, records: Vec::new() }])
                .await;
        }
        events
    }

    fn queue(&self, tenant: &str) -> mpsc::Sender<WebhookEvent> {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(queue) = queues.get(tenant).filter(|q| !q.is_closed()) {
            return queue.clone();
        }
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let worker = Worker {
            tenant: tenant.to_string(),
            store: self.store.clone(),
            policy: self.policy,
            metrics: self.metrics.clone(),
            http: self.http.clone(),
            dead: self.dead.clone(),
            attempts: self.attempts.clone(),
        };
        tokio::spawn(worker.run(rx));
        queues.insert(tenant.to_string(), tx.clone());
        tx
    }
}

#[async_trait::async_trait]
impl WebhookSink for LocalWebhooks {
    async fn enqueue(&self, batch: Vec<super::Queued>) -> Result<(), StoreError> {
        for super::Queued { tenant, events, .. } in batch {
            self.take(&tenant, events);
        }
        Ok(())
    }
}

impl LocalWebhooks {
    /// Queues one tenant's events on its worker; past [`MAX_QUEUED`], dead letters at once.
    fn take(&self, tenant: &str, events: Vec<WebhookEvent>) {
        let queue = self.queue(tenant);
        let mut refused = Vec::new();
        for event in events {
            if let Err(e) = queue.try_send(event) {
                refused.push(e.into_inner());
            }
        }
        if !refused.is_empty() {
            tracing::warn!(tenant, events = refused.len(), "webhook queue full: dead-lettered");
            let letter =
                DeadLetter { tenant: tenant.into(), events: refused, error: "the queue was full".into(), attempts: 0 };
            bury(&self.dead, &self.metrics, letter);
        }
    }
}

/// One tenant's deliveries, in order.
struct Worker {
    tenant: String,
    store: Arc<dyn Store>,
    policy: RetryPolicy,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    dead: Arc<Mutex<Vec<DeadLetter>>>,
    attempts: Attempts,
}

impl Worker {
    /// Keeps one attempt in the log, dropping the oldest past [`KEPT_ATTEMPTS`].
    fn note(
        &self,
        events: &[WebhookEvent],
        attempt: u32,
        outcome: &'static str,
        error: Option<&str>,
        retry: Option<Duration>,
    ) {
        let entry = DeliveryAttempt {
            tenant: self.tenant.clone(),
            at: crate::model::format_ts(&chrono::Utc::now()),
            attempt,
            outcome,
            error: error.map(str::to_string),
            retry_in_ms: retry.map(|d| d.as_millis() as u64),
            types: events.iter().map(|e| e.kind.clone()).collect(),
            ids: events.iter().map(|e| e.id.clone()).collect(),
        };
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if attempts.len() == KEPT_ATTEMPTS {
            attempts.pop_front();
        }
        attempts.push_back(entry);
    }

    async fn run(self, mut rx: mpsc::Receiver<WebhookEvent>) {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            let until = tokio::time::Instant::now() + self.policy.linger;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(event)) => batch.push(event),
                    _ => break,
                }
            }
            self.deliver(batch).await;
        }
    }

    /// Sends one batch until it is accepted, or dead-letters it after the retry budget.
    async fn deliver(&self, events: Vec<WebhookEvent>) {
        let started = Instant::now();
        let mut delay = self.policy.first_delay;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.attempt(&events).await {
                Ok(true) => {
                    Metrics::add(&self.metrics.webhook_delivered, events.len() as u64);
                    self.note(&events, attempts, "delivered", None, None);
                    return;
                }
                Ok(false) => {
                    tracing::info!(tenant = %self.tenant, events = events.len(), "the tenant has no webhook now: dropped");
                    self.note(&events, attempts, "dropped", None, None);
                    return;
                }
                Err(error) => error,
            };
            if started.elapsed() + delay > self.policy.retry_for {
                tracing::warn!(tenant = %self.tenant, events = events.len(), attempts, %error, "webhook dead-lettered");
                self.note(&events, attempts, "dead-lettered", Some(&error), None);
                let letter = DeadLetter { tenant: self.tenant.clone(), events, error, attempts };
                bury(&self.dead, &self.metrics, letter);
                return;
            }
            tracing::info!(tenant = %self.tenant, attempts, %error, retry_in_ms = delay.as_millis() as u64, "webhook retried");
            Metrics::add(&self.metrics.webhook_retried, 1);
            self.note(&events, attempts, "retrying", Some(&error), Some(delay));
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.policy.max_delay);
        }
    }

    /// One request: `Ok(true)` accepted, `Ok(false)` the tenant has no webhook any more.
    async fn attempt(&self, events: &[WebhookEvent]) -> Result<bool, String> {
        let settings = self.store.tenant_settings(&self.tenant).await.map_err(|e| format!("the table: {e}"))?;
        let Some(webhook) = settings.and_then(|s| s.webhook) else {
            return Ok(false);
        };
        super::post(&self.http, &webhook, events, true).await.map(|()| true)
    }
}

/// Keeps `letter` among the dead letters, counted.
fn bury(dead: &Mutex<Vec<DeadLetter>>, metrics: &Metrics, letter: DeadLetter) {
    Metrics::add(&metrics.webhook_dead, letter.events.len() as u64);
    dead.lock().unwrap_or_else(|p| p.into_inner()).push(letter);
}
