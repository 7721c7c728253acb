//! Effects → the world: `PostToConnection` through the real `aws-sdk-apigatewaymanagement`
//! client, and record deletions through the [`Store`].
//!
//! Per recipient: 410 Gone → the connection is stale: delete its record (which in turn yields
//! presence `left`), unless it is younger than [`DeliverySettings::young_connection`] (its
//! `$connect` may not have returned yet): then retry. 429, 5xx and timeouts → back off and retry
//! until [`DeliverySettings::deadline`]. 413 and other 4xx → give up on that recipient and log.
//! The SDK's own retries are off: this module owns the policy.
//!
//! Only a store failure is an error here: it is the platform's fault and fails the record.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_apigatewaymanagement::Client;
use aws_sdk_apigatewaymanagement::config::retry::RetryConfig;
use aws_sdk_apigatewaymanagement::config::timeout::TimeoutConfig;
use aws_sdk_apigatewaymanagement::error::{DisplayErrorContext, SdkError};
use aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use futures::StreamExt;

use crate::metrics::Metrics;
use crate::model::{Clock, LeftReason};
use crate::react::{Effect, Recipient};
use crate::store::{Store, StoreError};

#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// Recipients served at once, per record.
    pub concurrency: usize,
    /// One `PostToConnection` attempt.
    pub call_timeout: Duration,
    /// All attempts for one recipient.
    pub deadline: Duration,
    /// A connection this young that answers 410 is retried, not deleted.
    pub young_connection: Duration,
    /// First backoff; doubles per attempt, capped at one second.
    pub initial_backoff: Duration,
    /// Sends every message here instead of each connection's own endpoint (local stacks).
    pub endpoint_override: Option<String>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            concurrency: 32,
            call_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(20),
            young_connection: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
            endpoint_override: None,
        }
    }
}

/// How one recipient's delivery ended.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Delivered,
    /// 410 for an established connection: its record was deleted.
    Gone,
    /// Given up: 413, another 4xx, or the deadline passed.
    Failed(String),
    /// A dry run: it would have been sent, and was not.
    NotSent,
}

/// What `GetConnection` said of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Open,
    Gone,
    /// No clear answer (throttled, unreachable): leave the record alone this time.
    Unknown(String),
}

/// One attempt's result, classified.
enum Attempt {
    Ok,
    Gone,
    Retry(String),
    GiveUp(String),
}

pub struct Deliverer {
    sdk: aws_config::SdkConfig,
    clients: Mutex<HashMap<String, Client>>,
    settings: DeliverySettings,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    /// Sends nothing and deletes nothing: every recipient's outcome is [`Outcome::NotSent`].
    dry_run: bool,
}

impl Deliverer {
    pub fn new(
        sdk: aws_config::SdkConfig,
        settings: DeliverySettings,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Deliverer {
        Deliverer { sdk, clients: Mutex::new(HashMap::new()), settings, store, clock, metrics, dry_run: false }
    }

    /// A deliverer for replay's dry runs: it performs no effect at all.
    pub fn dry_run(store: Arc<dyn Store>, clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Deliverer {
        let sdk = aws_config::SdkConfig::builder().build();
        Deliverer { dry_run: true, ..Deliverer::new(sdk, DeliverySettings::default(), store, clock, metrics) }
    }

    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// Performs the effects of one record, in order. Sends to many recipients run concurrently.
    pub async fn apply(&self, effects: &[Effect]) -> Result<Vec<(String, Outcome)>, StoreError> {
        let mut outcomes = Vec::new();
        if self.dry_run {
            for effect in effects {
                if let Effect::Send { recipients, .. } = effect {
                    outcomes.extend(recipients.iter().map(|r| (r.connection_id.clone(), Outcome::NotSent)));
                }
            }
            outcomes.sort();
            return Ok(outcomes);
        }
        for effect in effects {
            match effect {
                Effect::Send { payload, recipients } => {
                    let body = Blob::new(payload.to_json());
                    let sends: Vec<_> = recipients.iter().map(|r| self.send_to(r, body.clone())).collect();
                    let results: Vec<Result<(String, Outcome), StoreError>> =
                        futures::stream::iter(sends).buffer_unordered(self.settings.concurrency.max(1)).collect().await;
                    for result in results {
                        outcomes.push(result?);
                    }
                }
                Effect::RemoveMembership { tenant, room, connection_id, reason } => {
                    self.store.remove_membership(tenant, room, connection_id, *reason).await?;
                }
            }
        }
        outcomes.sort();
        Ok(outcomes)
    }

    async fn send_to(&self, to: &Recipient, body: Blob) -> Result<(String, Outcome), StoreError> {
        Ok((to.connection_id.clone(), self.send(to, body).await?))
    }

    async fn send(&self, to: &Recipient, body: Blob) -> Result<Outcome, StoreError> {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        let client = self.client(endpoint);
        let started = Instant::now();
        let mut backoff = self.settings.initial_backoff;
        loop {
            let attempt =
                match client.post_to_connection().connection_id(&to.connection_id).data(body.clone()).send().await {
                    Ok(_) => Attempt::Ok,
                    Err(err) => classify(err),
                };
            let why_retry = match attempt {
                Attempt::Ok => {
                    Metrics::add(&self.metrics.delivered, 1);
                    return Ok(Outcome::Delivered);
                }
                Attempt::Gone => {
                    let age = self.clock.now() - to.connected_at;
                    if age.to_std().unwrap_or_default() >= self.settings.young_connection {
                        tracing::info!(connection_id = %to.connection_id, "410 Gone: deleting the stale connection");
                        self.store.delete_connection(&to.connection_id, Some(LeftReason::Gone)).await?;
                        Metrics::add(&self.metrics.gone, 1);
                        return Ok(Outcome::Gone);
                    }
                    format!("410 for a connection {}ms old: its $connect may still be running", age.num_milliseconds())
                }
                Attempt::Retry(why) => why,
                Attempt::GiveUp(why) => {
                    tracing::warn!(connection_id = %to.connection_id, reason = %why, "giving up on recipient");
                    Metrics::add(&self.metrics.failed, 1);
                    return Ok(Outcome::Failed(why));
                }
            };
            if why_retry.starts_with("429") {
                Metrics::add(&self.metrics.throttled, 1);
            }
            if started.elapsed() + backoff > self.settings.deadline {
                let why = format!("deadline of {:?} passed; last: {why_retry}", self.settings.deadline);
                tracing::warn!(connection_id = %to.connection_id, reason = %why, "giving up on recipient");
                Metrics::add(&self.metrics.failed, 1);
                return Ok(Outcome::Failed(why));
            }
            tracing::debug!(connection_id = %to.connection_id, reason = %why_retry, ?backoff, "retrying");
            Metrics::add(&self.metrics.retried, 1);
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Asks API Gateway whether a connection is still open (`GetConnection`): the sweeper's
    /// confirmation before it deletes a record.
    pub async fn probe(&self, connection_id: &str, endpoint: &str) -> Probe {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(endpoint);
        match self.client(endpoint).get_connection().connection_id(connection_id).send().await {
            Ok(_) => Probe::Open,
            Err(err) => {
                let gone = err.as_service_error().is_some_and(|e| e.is_gone_exception())
                    || err.raw_response().is_some_and(|r| r.status().as_u16() == 410);
                if gone { Probe::Gone } else { Probe::Unknown(DisplayErrorContext(&err).to_string()) }
            }
        }
    }

    /// One client per endpoint (per API and stage), built once and reused.
    fn client(&self, endpoint: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry(endpoint.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_apigatewaymanagement::config::Builder::from(&self.sdk)
                    .endpoint_url(endpoint)
                    .retry_config(RetryConfig::disabled())
                    .timeout_config(TimeoutConfig::builder().operation_timeout(self.settings.call_timeout).build())
                    .build();
                Client::from_conf(config)
            })
            .clone()
    }
}

fn classify(err: SdkError<PostToConnectionError, aws_smithy_runtime_api_http::Response>) -> Attempt {
    let status = err.raw_response().map(|r| r.status().as_u16());
    match err.as_service_error() {
        Some(PostToConnectionError::GoneException(_)) => return Attempt::Gone,
        Some(PostToConnectionError::LimitExceededException(_)) => {
            return Attempt::Retry("429 LimitExceededException".into());
        }
        Some(PostToConnectionError::PayloadTooLargeException(_)) => {
            return Attempt::GiveUp("413 PayloadTooLargeException".into());
        }
        _ => {}
    }
    match status {
        Some(410) => Attempt::Gone,
        Some(429) => Attempt::Retry("429".into()),
        Some(s) if s >= 500 => Attempt::Retry(format!("{s} from API Gateway")),
        Some(s) => Attempt::GiveUp(format!("{s}: {}", DisplayErrorContext(&err))),
        // No response at all: timeout, connection refused, DNS. Worth another try.
        None => Attempt::Retry(format!("no response: {}", DisplayErrorContext(&err))),
    }
}

/// Up to a quarter off the backoff, so that many recipients do not retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    d - d.mul_f64(f64::from(nanos % 1000) / 4000.0)
}

mod aws_smithy_runtime_api_http {
    pub use aws_sdk_apigatewaymanagement::config::http::HttpResponse as Response;
}
