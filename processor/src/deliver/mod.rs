//! Effects → the world: `PostToConnection` through the real `aws-sdk-apigatewaymanagement`
//! client, and record deletions through the [`Store`].
//!
//! How many calls are in flight is one adaptive limit per process ([`limit`]), shared by every
//! record and room: it grows while calls succeed and latency holds, and is cut on 429, so one
//! container reaches the account's quota without flooding it.
//!
//! Per recipient:
//! * 410 Gone → the connection is stale: delete its record (which in turn yields presence
//!   `left`), unless it is younger than [`DeliverySettings::young_connection`] (its `$connect`
//!   may not have returned yet). A young connection's retries are set aside in the batch's
//!   [`Window`]: they never hold up the room's next record or other rooms, and the batch waits
//!   for them at most [`YOUNG_GRACE`] after its own work, and never past its window.
//! * 429 → back off and retry; a connection still answering 429 after
//!   [`DeliverySettings::slow_consumer`] is a slow consumer: given up for this record and for
//!   the rest of the batch, counted (`slow_consumers`) and, unless configured otherwise, closed
//!   (`DELETE @connections/{id}`), so one client never stalls its room. While the account is
//!   throttling (429s for several connections at once, [`limit::AdaptiveLimit::account_throttled`])
//!   a 429 is the account's, not the client's: it is retried and never counts toward that budget
//!   (`account_throttled`).
//! * 5xx and timeouts → back off and retry until [`DeliverySettings::deadline`].
//! * 413 and other 4xx → give up on that recipient and log.
//!
//! No attempt and no retry runs past the batch's [`Window`] (the Lambda deadline less a
//! margin): a recipient still being retried then leaves its record unfinished, and the record
//! is reported for redelivery. The SDK's own retries are off: this module owns the policy.
//!
//! Only a store failure and an unfinished record are errors here.

use std::collections::{HashMap, HashSet};
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

pub mod limit;
pub mod stage;

use limit::{AdaptiveLimit, Finished};

#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// The most `@connections` calls in flight at once, per process: the ceiling of the
    /// adaptive limit ([`limit`]).
    pub concurrency: usize,
    /// Where the adaptive limit starts.
    pub initial_concurrency: usize,
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
    /// A connection answering 429 for this long is a slow consumer.
    pub slow_consumer: Duration,
    /// Close slow consumers (`DELETE @connections/{id}`); otherwise only skip them.
    pub close_slow_consumers: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            concurrency: 512,
            initial_concurrency: 32,
            call_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(20),
            young_connection: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
            endpoint_override: None,
            slow_consumer: Duration::from_secs(2),
            close_slow_consumers: true,
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
    /// A young connection answered 410: its retries go on beside the batch ([`Window`]).
    Deferred,
    /// Still being retried when the batch's time ran out: the record is redelivered.
    Unfinished(String),
    /// Handed to the fan-out stage ([`stage`]): a worker serves it, after the batch.
    Queued,
}

/// A frame for this many recipients keeps its progress in the table ([`Deliverer::apply`]).
pub const RESUMABLE_RECIPIENTS: usize = 1000;
/// How often a big fan-out's progress is written while it runs.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A big fan-out starts no call this long before the batch's window ends…
pub const PROGRESS_RESERVE: Duration = Duration::from_millis(400);
/// …its calls in flight end twice this long before it, and a progress read or write takes at
/// most this long.
pub const PROGRESS_WRITE: Duration = Duration::from_millis(150);

/// How long a batch, its own work done, still waits for young connections' retries.
pub const YOUNG_GRACE: Duration = Duration::from_secs(1);

/// The time one batch's deliveries may take, the young connections' retries set aside until
/// the batch ends (one ordered queue per connection), and the connections found slow in it.
#[derive(Default)]
pub struct Window {
    finish_by: Option<Instant>,
    deferred: Mutex<tokio::task::JoinSet<()>>,
    queues: Mutex<HashMap<String, tokio::sync::mpsc::UnboundedSender<Blob>>>,
    slow: Mutex<HashSet<String>>,
}

impl Window {
    /// No deadline (the local stacks, replay, tests).
    pub fn unbounded() -> Window {
        Window::default()
    }

    /// Every delivery of the batch ends by `finish_by`.
    pub fn until(finish_by: Instant) -> Window {
        Window { finish_by: Some(finish_by), ..Window::default() }
    }

    pub fn finish_by(&self) -> Option<Instant> {
        self.finish_by
    }

    fn is_slow(&self, connection_id: &str) -> bool {
        self.slow.lock().unwrap_or_else(|p| p.into_inner()).contains(connection_id)
    }

    /// Queues `body` behind the connection's set-aside retries, if it has any; else gives it back.
    fn queue_behind(&self, connection_id: &str, body: Blob) -> Result<(), Blob> {
        let queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        match queues.get(connection_id) {
            Some(queue) => queue.send(body).map_err(|e| e.0),
            None => Err(body),
        }
    }

    /// Starts the connection's queue of set-aside retries with `body`: one task delivers them in
    /// order, retrying while the connection is young, until the window closes.
    fn set_aside(&self, inner: Arc<Inner>, to: Recipient, body: Blob) {
        let (queue, mut frames) = tokio::sync::mpsc::unbounded_channel();
        let _ = queue.send(body);
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).insert(to.connection_id.clone(), queue);
        let finish_by = self.finish_by;
        self.deferred.lock().unwrap_or_else(|p| p.into_inner()).spawn(async move {
            while let Some(body) = frames.recv().await {
                match inner.clone().send(&to, body, finish_by, finish_by, false).await {
                    Ok(Sent::Done(Outcome::Delivered)) => continue,
                    Ok(_) => {
                        tracing::debug!(connection_id = %to.connection_id, "young connection's retries ended undelivered");
                        break;
                    }
                    Err(err) => {
                        tracing::error!(connection_id = %to.connection_id, error = %err, "young connection's retries failed");
                        break;
                    }
                }
            }
        });
    }

    /// Once the batch's own work is done, waits for the set-aside retries for at most
    /// [`YOUNG_GRACE`], and never past the window. Those still running then are dropped
    /// (logged, not deleted): a connection that has not finished connecting by then gets no
    /// frames from this batch; if it is really gone, its `$disconnect` or the sweeper removes it.
    /// Returns how many connections' retries were dropped (`young_dropped`).
    pub async fn settle(&self) -> usize {
        // No more frames join the queues: each task ends when its queue is empty.
        self.queues.lock().unwrap_or_else(|p| p.into_inner()).clear();
        let mut deferred = std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|p| p.into_inner()));
        if deferred.is_empty() {
            return 0;
        }
        let grace = Instant::now() + YOUNG_GRACE;
        let until = self.finish_by.map_or(grace, |at| at.min(grace));
        let all = async { while deferred.join_next().await.is_some() {} };
        if tokio::time::timeout_at(until.into(), all).await.is_ok() {
            return 0;
        }
        let dropped = deferred.len();
        tracing::warn!(dropped, "young connections still answering 410; their frames from this batch are dropped");
        deferred.abort_all();
        dropped
    }
}

/// Whether an outcome needs no further attempt: served, gone, or given up on. A young
/// connection's set-aside frame (`Deferred`) and an unfinished one do: a redelivery tries them.
fn counts_as_settled(outcome: &Outcome) -> bool {
    !matches!(outcome, Outcome::Unfinished(_) | Outcome::Deferred)
}

/// Writes a big fan-out's progress by `by`; a failure is logged and counted, never an error.
async fn progress_write(inner: &Inner, progress: &crate::model::FanoutProgress, by: Instant) {
    progress_io(inner, &progress.pk, "written", by, inner.store.put_fanout_progress(progress)).await;
}

/// A progress read or write, by `by`: progress is a saving, never a condition, so a failure or a
/// time-out is logged and counted (`progress_failures`), and gives `None`.
async fn progress_io<T>(
    inner: &Inner,
    key: &str,
    what: &str,
    by: Instant,
    io: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Option<T> {
    let why = match tokio::time::timeout_at(by.into(), io).await {
        Ok(Ok(done)) => return Some(done),
        Ok(Err(err)) => err.to_string(),
        Err(_) => "no answer in time".to_string(),
    };
    tracing::warn!(key, error = %why, "fan-out progress not {what}");
    Metrics::add(&inner.metrics.progress_failures, 1);
    None
}

/// The most connection ids a progress item lists as pending (~150 KB, well under DynamoDB's
/// 400 KB item limit); past it, `through` is lowered, which serves more again and skips nobody.
pub const MAX_PENDING: usize = 5000;

/// What a resumable fan-out has settled, for its progress item: `through` is the highest
/// connection id settled in this attempt or any before; `pending` are this attempt's recipients
/// at or below it not settled (in flight when it was written, or cut off). Recipients of this
/// attempt are exactly those an earlier attempt had not settled.
fn progress(
    key: &str,
    order: &[&Recipient],
    settled: &[bool],
    earlier: Option<&crate::model::FanoutProgress>,
    complete: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> crate::model::FanoutProgress {
    let highest = settled.iter().rposition(|s| *s).map(|i| order[i].connection_id.as_str());
    let before = earlier.map(|e| e.through.as_str());
    let mut through = highest.max(before).unwrap_or_default().to_string();
    let mut pending: Vec<String> = order
        .iter()
        .zip(settled)
        .filter(|(r, done)| !**done && r.connection_id.as_str() <= through.as_str())
        .map(|(r, _)| r.connection_id.clone())
        .collect();
    if pending.len() > MAX_PENDING {
        // Everything from the first pending id not kept counts as not started.
        let first_dropped = pending[MAX_PENDING].clone();
        pending.truncate(MAX_PENDING);
        through = order
            .iter()
            .map(|r| r.connection_id.as_str())
            .take_while(|id| *id < first_dropped.as_str())
            .last()
            .unwrap_or_default()
            .to_string();
        pending.retain(|p| p.as_str() <= through.as_str());
    }
    crate::model::FanoutProgress::new(key, through, pending, complete, now)
}

/// What `GetConnection` said of a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Open,
    Gone,
    /// 429: the account is over its quota (a client's full buffer does not throttle this).
    Throttled,
    /// No clear answer (an error, unreachable): leave the record alone this time.
    Unknown(String),
}

/// One attempt's result, classified.
enum Attempt {
    Ok,
    Gone,
    Retry(String),
    GiveUp(String),
}

#[derive(Clone)]
pub struct Deliverer {
    inner: Arc<Inner>,
    /// Sends nothing and deletes nothing: every recipient's outcome is [`Outcome::NotSent`].
    dry_run: bool,
}

/// What a delivery needs, shared with the retries set aside in a [`Window`].
struct Inner {
    sdk: aws_config::SdkConfig,
    clients: Mutex<HashMap<String, Client>>,
    settings: DeliverySettings,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    limit: AdaptiveLimit,
    /// Connections whose last calls answered 429, and how many in a row: kept across records,
    /// so a slow client stops counting as a fresh call after its first few, whatever the message.
    streaks: Mutex<HashMap<String, u32>>,
}

impl Deliverer {
    pub fn new(
        sdk: aws_config::SdkConfig,
        settings: DeliverySettings,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Deliverer {
        let limit = AdaptiveLimit::new(settings.initial_concurrency, settings.concurrency);
        let inner = Inner {
            sdk,
            clients: Mutex::new(HashMap::new()),
            settings,
            store,
            clock,
            metrics,
            limit,
            streaks: Mutex::new(HashMap::new()),
        };
        Deliverer { inner: Arc::new(inner), dry_run: false }
    }

    /// With `dry_run`, it performs no effect at all: replay's dry runs ([`crate::assembly`]
    /// sets it from the mode).
    pub fn with_dry_run(self, dry_run: bool) -> Deliverer {
        Deliverer { dry_run, ..self }
    }

    /// Performs the effects of one record, in order, within the batch's `window`. Sends to many
    /// recipients run concurrently. A recipient still being retried when the window closes
    /// makes the record unfinished: [`StoreError::OutOfTime`].
    ///
    /// `resume` names the record (its stream event id): a frame for at least
    /// [`RESUMABLE_RECIPIENTS`] is then sent in connection-id order with its progress kept in the
    /// table ([`crate::model::FanoutProgress`]), written every [`PROGRESS_EVERY`], when the
    /// window closes and when it is done; a redelivered record skips the recipients already
    /// served, so a cut-off fan-out resumes where it stopped and a finished one is not repeated.
    pub async fn apply(
        &self,
        effects: &[Effect],
        window: &Window,
        resume: Option<&str>,
    ) -> Result<Vec<(String, Outcome)>, StoreError> {
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
        // Large frames of the record, counted: the key of each one's progress. (Effects before
        // them can differ between attempts — a plugin's rewrite marks the message first — large
        // frames cannot.)
        let mut large = 0;
        for effect in effects {
            match effect {
                Effect::Send { payload, recipients } => {
                    let key = resume.filter(|_| recipients.len() >= RESUMABLE_RECIPIENTS).map(|r| {
                        large += 1;
                        format!("{r}#{}", large - 1)
                    });
                    match key {
                        Some(key) => outcomes.extend(self.send_resumable(&key, payload, recipients, window).await?),
                        None => {
                            let body = Blob::new(payload.to_json());
                            let sends: Vec<_> = recipients
                                .iter()
                                .map(|r| {
                                    let body = body.clone();
                                    async move {
                                        Ok::<_, StoreError>((
                                            r,
                                            self.send(r, body, window, window.finish_by, window.finish_by).await?,
                                        ))
                                    }
                                })
                                .collect();
                            let results: Vec<Result<(&Recipient, Sent), StoreError>> =
                                futures::stream::iter(sends).buffer_unordered(self.inner.limit.max()).collect().await;
                            let mut sent = Vec::with_capacity(results.len());
                            for result in results {
                                sent.push(result?);
                            }
                            outcomes.extend(self.judge_slow(sent, window, window.finish_by, false).await);
                        }
                    }
                }
                Effect::RemoveMembership { tenant, room, connection_id, reason } => {
                    self.inner.store.remove_membership(tenant, room, connection_id, *reason).await?;
                }
                Effect::MarkMessage { tenant, room, sk, verdict } => {
                    self.inner.store.mark_message(tenant, room, sk, verdict).await?;
                }
                // A repeat writes the same item again: no stream record, nothing changed.
                Effect::KeepCopies(copies) => {
                    // At most 64 (the tenant's extra-rooms ceiling), at once.
                    let mut writes = Vec::with_capacity(copies.len());
                    for copy in copies {
                        writes.push(self.inner.store.put_message(copy));
                    }
                    futures::future::try_join_all(writes).await?;
                }
                Effect::Close(to) => self.inner.close(to).await,
            }
        }
        outcomes.sort();
        let unfinished = outcomes.iter().filter(|(_, o)| matches!(o, Outcome::Unfinished(_))).count();
        if unfinished > 0 {
            return Err(StoreError::OutOfTime(format!(
                "{unfinished} recipient(s) still being retried when the invocation's time ran out"
            )));
        }
        Ok(outcomes)
    }

    /// One frame to many, in connection-id order, with its progress kept in the table (see
    /// [`Deliverer::apply`]). No call starts later than [`PROGRESS_RESERVE`] (400 ms) before the
    /// window ends, and calls in flight end 2 × [`PROGRESS_WRITE`] (300 ms) before it, so that
    /// what was served is
    /// known and written before the invocation's time is up. Progress is a saving, never a
    /// condition: a read or write that fails is logged and counted (`progress_failures`), and
    /// the fan-out goes on.
    async fn send_resumable(
        &self,
        key: &str,
        payload: &crate::protocol::ServerMessage,
        recipients: &[Recipient],
        window: &Window,
    ) -> Result<Vec<(String, Outcome)>, StoreError> {
        let earlier = self.progress_read(key).await;
        let mut order: Vec<&Recipient> = recipients.iter().collect();
        order.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        if let Some(earlier) = &earlier {
            let before = order.len();
            let settled = earlier.settled_lookup();
            order.retain(|r| !settled(&r.connection_id));
            Metrics::add(&self.inner.metrics.resumed_skips, (before - order.len()) as u64);
            tracing::info!(key, skipped = before - order.len(), left = order.len(), "fan-out resumes where it stopped");
        }
        let cut = |margin: Duration| window.finish_by.map(|at| at.checked_sub(margin).unwrap_or(at));
        // No call starts in the last PROGRESS_RESERVE; calls, then slow consumers' closing, end
        // by 2 × PROGRESS_WRITE before the window; the last write has the PROGRESS_WRITE before it.
        let (start_by, finish_by, write_by) =
            (cut(PROGRESS_RESERVE), cut(PROGRESS_WRITE * 2), cut(Duration::from_millis(10)));
        let body = Blob::new(payload.to_json());
        let sends: Vec<_> = order
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let body = body.clone();
                async move { Ok::<_, StoreError>((i, *r, self.send(r, body, window, start_by, finish_by).await?)) }
            })
            .collect();
        let mut running = futures::stream::iter(sends).buffer_unordered(self.inner.limit.max());
        // Settled in this attempt: served, gone, given up on or set aside. A slow consumer is not,
        // until judged below.
        let mut settled = vec![false; order.len()];
        let mut sent = Vec::with_capacity(order.len());
        let mut written = Instant::now();
        // The periodic write runs beside the sends (awaiting it here would stop them polling).
        let mut writing: Option<tokio::task::JoinHandle<()>> = None;
        while let Some(result) = running.next().await {
            let (i, to, outcome) = result?;
            settled[i] = matches!(&outcome, Sent::Done(o) if counts_as_settled(o));
            sent.push((to, outcome));
            if written.elapsed() >= PROGRESS_EVERY && writing.as_ref().is_none_or(|w| w.is_finished()) {
                let snapshot = progress(key, &order, &settled, earlier.as_ref(), false, self.inner.clock.now());
                let inner = self.inner.clone();
                let by = Instant::now() + PROGRESS_WRITE;
                writing = Some(tokio::spawn(async move { progress_write(&inner, &snapshot, by).await }));
                written = Instant::now();
            }
        }
        drop(running);
        // An earlier attempt settled some: the frame has been served, so recipients still
        // answering 429 now are not all of it.
        let outcomes = self.judge_slow(sent, window, finish_by, earlier.is_some()).await;
        let unsettled: HashSet<&str> =
            outcomes.iter().filter(|(_, o)| !counts_as_settled(o)).map(|(id, _)| id.as_str()).collect();
        let settled: Vec<bool> = order.iter().map(|r| !unsettled.contains(r.connection_id.as_str())).collect();
        if let Some(writing) = writing {
            // The last write must not be overtaken by an older one.
            let _ = tokio::time::timeout(PROGRESS_WRITE, writing).await;
        }
        let last = progress(key, &order, &settled, earlier.as_ref(), unsettled.is_empty(), self.inner.clock.now());
        let by = write_by.unwrap_or_else(|| Instant::now() + PROGRESS_WRITE);
        progress_write(&self.inner, &last, by).await;
        Ok(outcomes)
    }

    async fn progress_read(&self, key: &str) -> Option<crate::model::FanoutProgress> {
        let by = Instant::now() + PROGRESS_WRITE;
        progress_io(&self.inner, key, "read; serving every member", by, self.inner.store.fanout_progress(key))
            .await
            .flatten()
    }

    /// One recipient: no call starts after `start_by`, none runs past `finish_by` (both the
    /// batch's window, or earlier). A connection that already has retries set aside in this window
    /// queues behind them, so that it receives its frames in order.
    async fn send(
        &self,
        to: &Recipient,
        body: Blob,
        window: &Window,
        start_by: Option<Instant>,
        finish_by: Option<Instant>,
    ) -> Result<Sent, StoreError> {
        if window.is_slow(&to.connection_id) {
            Metrics::add(&self.inner.metrics.failed, 1);
            return Ok(Sent::Done(Outcome::Failed("slow consumer: skipped for the rest of the batch".into())));
        }
        let body = match window.queue_behind(&to.connection_id, body) {
            Ok(()) => return Ok(Sent::Done(Outcome::Deferred)),
            Err(body) => body,
        };
        match self.inner.clone().send(to, body.clone(), start_by, finish_by, true).await? {
            Sent::Young => {
                window.set_aside(self.inner.clone(), to.clone(), body);
                Ok(Sent::Done(Outcome::Deferred))
            }
            other => Ok(other),
        }
    }

    /// Decides on the recipients of one frame that kept answering 429 past the budget. If some
    /// other recipient was served, the 429s are those clients' own (their send buffers are full):
    /// slow consumers, closed unless configured otherwise and skipped for the rest of the batch.
    /// If every recipient of a frame sent to several kept answering 429, API Gateway itself is
    /// throttling: nobody is closed, and the record is left unfinished, for Lambda to retry.
    /// A frame for one recipient (a welcome, a join's ack, a recovery, `join_denied`, a message
    /// in a room of one) cannot tell the two apart, and account-level throttling is what a lone
    /// 429 past the budget most often is: its recipient is given up on for this record and
    /// skipped for the rest of the batch (`lone_throttled`), never closed — closing healthy
    /// clients of a throttled account would make them reconnect into the storm.
    async fn judge_slow(
        &self,
        sent: Vec<(&Recipient, Sent)>,
        window: &Window,
        finish_by: Option<Instant>,
        served_before: bool,
    ) -> Vec<(String, Outcome)> {
        let served = served_before || sent.iter().any(|(_, s)| matches!(s, Sent::Done(Outcome::Delivered)));
        let slow = sent.iter().filter(|(_, s)| matches!(s, Sent::Slow)).count();
        let everyone_throttled = !served && slow == sent.len() && sent.len() > 1;
        let lone = !served && sent.len() == 1;
        let mut outcomes = Vec::with_capacity(sent.len());
        for (to, s) in sent {
            let outcome = match s {
                Sent::Done(outcome) => outcome,
                Sent::Young => Outcome::Deferred,
                Sent::Slow if everyone_throttled => Outcome::Unfinished(
                    "every recipient answered 429 past the budget: API Gateway is throttling".into(),
                ),
                Sent::Slow if lone => {
                    // Skipped for the rest of the batch (its next frames cost nothing), not closed.
                    window.slow.lock().unwrap_or_else(|p| p.into_inner()).insert(to.connection_id.clone());
                    Metrics::add(&self.inner.metrics.lone_throttled, 1);
                    tracing::warn!(connection_id = %to.connection_id,
                        "a frame for this connection alone answered 429 past the budget: given up on, not closed");
                    Outcome::Failed("429 past the budget for a lone frame: given up on, not closed".into())
                }
                Sent::Slow => {
                    window.slow.lock().unwrap_or_else(|p| p.into_inner()).insert(to.connection_id.clone());
                    self.inner.slow_consumer(to, finish_by).await
                }
            };
            outcomes.push((to.connection_id.clone(), outcome));
        }
        outcomes
    }

    /// Asks API Gateway whether a connection is still open (`GetConnection`): the sweeper's
    /// confirmation before it deletes a record.
    pub async fn probe(&self, connection_id: &str, endpoint: &str) -> Probe {
        self.inner.probe(connection_id, endpoint, self.inner.settings.call_timeout).await
    }
}

/// A recipient's deadlines: no call runs past `limit`, none starts after `start_limit`.
struct Deadlines {
    limit: Instant,
    start_limit: Instant,
}

/// 429s in a row held against a client, and since when (not while the account is throttling).
#[derive(Default)]
struct Throttled {
    since: Option<Instant>,
    counted: u32,
}

/// How [`Inner::send`] ended.
enum Sent {
    Done(Outcome),
    /// Still answering 429 after the slow-consumer budget: judged with the frame's other
    /// recipients ([`Deliverer::judge_slow`]).
    Slow,
    /// A young connection answered 410, and the caller asked to set such retries aside.
    Young,
}

impl Inner {
    /// Delivers to one recipient, retrying by the rules of the module docs, until its own
    /// deadline or the batch's: no attempt starts after `start_by`, and none runs past
    /// `finish_by`. With `set_aside_young`, a young connection's 410 returns [`Sent::Young`] at
    /// once instead of being retried here.
    async fn send(
        self: Arc<Self>,
        to: &Recipient,
        body: Blob,
        start_by: Option<Instant>,
        finish_by: Option<Instant>,
        set_aside_young: bool,
    ) -> Result<Sent, StoreError> {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        let client = self.client(endpoint);
        // The recipient's own clocks start with its first call, not while it waits for room
        // behind a big room's other recipients; that wait is bounded by the batch's window only.
        let first = match start_by {
            None => Some(self.limit.acquire(0).await),
            Some(at) => tokio::time::timeout_at(at.into(), self.limit.acquire(0)).await.ok(),
        };
        let Some(first) = first else {
            let why = "the invocation's time ran out before a call could be made".to_string();
            tracing::warn!(connection_id = %to.connection_id, reason = %why, "recipient unfinished");
            return Ok(Sent::Done(Outcome::Unfinished(why)));
        };
        let mut slot = Some(first);
        let own_deadline = Instant::now() + self.settings.deadline;
        let limit = finish_by.map_or(own_deadline, |f| f.min(own_deadline));
        let window =
            Deadlines { limit, start_limit: start_by.map_or(own_deadline, |s| s.min(own_deadline)).min(limit) };
        let mut backoff = self.settings.initial_backoff;
        let mut throttled = Throttled::default();
        loop {
            let slot = match slot.take() {
                Some(slot) => Ok(slot),
                None => {
                    let streak = self.streak(&to.connection_id);
                    tokio::time::timeout_at(window.start_limit.into(), self.limit.acquire(streak)).await
                }
            };
            let attempt = match slot {
                Err(_) => Attempt::Retry("no room for another call in flight before the deadline".into()),
                Ok(slot) => self.attempt(&client, to, &body, slot, &window).await,
            };
            let why_retry = match self.judge(to, attempt, set_aside_young).await? {
                Ok(sent) => return Ok(sent),
                Err(why) => why,
            };
            if why_retry.starts_with("429") {
                if self.throttled_too_long(to, &mut throttled, window.limit).await {
                    return Ok(Sent::Slow);
                }
            } else {
                self.clear_streak(&to.connection_id);
                throttled = Throttled::default();
            }
            if Instant::now() + backoff > window.start_limit {
                return Ok(Sent::Done(self.out_of_time(to, &why_retry, window.start_limit < own_deadline)));
            }
            tracing::debug!(connection_id = %to.connection_id, reason = %why_retry, ?backoff, "retrying");
            Metrics::add(&self.metrics.retried, 1);
            tokio::time::sleep(jitter(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One `PostToConnection` in `slot`, bounded by the recipient's window; its answer is told
    /// to the adaptive limit.
    async fn attempt(
        &self,
        client: &Client,
        to: &Recipient,
        body: &Blob,
        slot: limit::Slot<'_>,
        window: &Deadlines,
    ) -> Attempt {
        if Instant::now() >= window.start_limit {
            drop(slot);
            return Attempt::Retry("no time left to start another call".into());
        }
        let within = window.limit.saturating_duration_since(Instant::now()).min(self.settings.call_timeout);
        let call = client.post_to_connection().connection_id(&to.connection_id).data(body.clone()).send();
        let attempt = match tokio::time::timeout(within, call).await {
            Ok(Ok(_)) => Attempt::Ok,
            Ok(Err(err)) => classify(err),
            Err(_) => Attempt::Retry(format!("no response within {within:?}")),
        };
        slot.finish(match &attempt {
            Attempt::Retry(why) if why.starts_with("429") => Finished::Throttled,
            Attempt::Retry(_) => Finished::NoAnswer,
            Attempt::Ok | Attempt::Gone | Attempt::GiveUp(_) => Finished::Answered,
        });
        attempt
    }

    /// What an attempt means for the recipient: done (`Ok`), or why it is tried again (`Err`).
    /// A 410 from a connection older than `young_connection` deletes it; from a young one (its
    /// `$connect` may still be running) it is retried, here or, with `set_aside_young`, beside
    /// the batch.
    async fn judge(
        &self,
        to: &Recipient,
        attempt: Attempt,
        set_aside_young: bool,
    ) -> Result<Result<Sent, String>, StoreError> {
        Ok(Err(match attempt {
            Attempt::Ok => {
                Metrics::add(&self.metrics.delivered, 1);
                return Ok(Ok(Sent::Done(Outcome::Delivered)));
            }
            Attempt::Gone => {
                let age = self.clock.now() - to.connected_at;
                if age.to_std().unwrap_or_default() >= self.settings.young_connection {
                    tracing::info!(connection_id = %to.connection_id, "410 Gone: deleting the stale connection");
                    self.store.delete_connection(&to.connection_id, Some(LeftReason::Gone)).await?;
                    Metrics::add(&self.metrics.gone, 1);
                    return Ok(Ok(Sent::Done(Outcome::Gone)));
                }
                if set_aside_young {
                    Metrics::add(&self.metrics.retried, 1);
                    tracing::debug!(connection_id = %to.connection_id, "410 for a young connection: retrying beside the batch");
                    return Ok(Ok(Sent::Young));
                }
                format!("410 for a connection {}ms old: its $connect may still be running", age.num_milliseconds())
            }
            Attempt::Retry(why) => why,
            Attempt::GiveUp(why) => {
                tracing::warn!(connection_id = %to.connection_id, reason = %why, "giving up on recipient");
                Metrics::add(&self.metrics.failed, 1);
                return Ok(Ok(Sent::Done(Outcome::Failed(why))));
            }
        }))
    }

    /// A 429: counted against the client unless the account is throttling. True when the
    /// client has answered 429 for the whole slow-consumer budget, on enough attempts that a
    /// slot's wait between them cannot make two 429s look like two seconds of them, and a
    /// `GetConnection` (whose buffer is not the client's) does not answer 429 too.
    async fn throttled_too_long(&self, to: &Recipient, throttled: &mut Throttled, by: Instant) -> bool {
        Metrics::add(&self.metrics.throttled, 1);
        self.note_429(&to.connection_id);
        if self.limit.account_throttled() {
            // The account's quota, not this client: retried, never held against it.
            Metrics::add(&self.metrics.account_throttled, 1);
            *throttled = Throttled::default();
            return false;
        }
        let since = *throttled.since.get_or_insert_with(Instant::now);
        throttled.counted += 1;
        if since.elapsed() < self.settings.slow_consumer || throttled.counted < limit::STREAK {
            return false;
        }
        if self.account_says_throttled(to, by).await {
            Metrics::add(&self.metrics.account_throttled, 1);
            *throttled = Throttled::default();
            return false;
        }
        true
    }

    /// No time for another attempt: unfinished when the batch's window ran out (the record is
    /// redelivered), failed when the recipient's own deadline did.
    fn out_of_time(&self, to: &Recipient, last: &str, batch_window: bool) -> Outcome {
        if batch_window {
            let why = format!("the invocation's time ran out; last: {last}");
            tracing::warn!(connection_id = %to.connection_id, reason = %why, "recipient unfinished");
            return Outcome::Unfinished(why);
        }
        let why = format!("deadline of {:?} passed; last: {last}", self.settings.deadline);
        tracing::warn!(connection_id = %to.connection_id, reason = %why, "giving up on recipient");
        Metrics::add(&self.metrics.failed, 1);
        Outcome::Failed(why)
    }

    /// How many 429s in a row the connection has answered, across records.
    fn streak(&self, connection_id: &str) -> u32 {
        self.streaks.lock().unwrap_or_else(|p| p.into_inner()).get(connection_id).copied().unwrap_or(0)
    }

    fn note_429(&self, connection_id: &str) {
        let mut streaks = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a process never remembers more than this many throttled connections.
        if streaks.len() >= 100_000 && !streaks.contains_key(connection_id) {
            streaks.clear();
        }
        *streaks.entry(connection_id.to_string()).or_default() += 1;
    }

    fn clear_streak(&self, connection_id: &str) {
        let mut streaks = self.streaks.lock().unwrap_or_else(|p| p.into_inner());
        if !streaks.is_empty() {
            streaks.remove(connection_id);
        }
    }

    /// `GetConnection`, answered within `within`.
    async fn probe(&self, connection_id: &str, endpoint: &str, within: Duration) -> Probe {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(endpoint);
        let asked = self.client(endpoint).get_connection().connection_id(connection_id).send();
        match tokio::time::timeout(within, asked).await {
            Ok(Ok(_)) => Probe::Open,
            Ok(Err(err)) => match err.raw_response().map(|r| r.status().as_u16()) {
                _ if err.as_service_error().is_some_and(|e| e.is_gone_exception()) => Probe::Gone,
                Some(410) => Probe::Gone,
                Some(429) => Probe::Throttled,
                _ => Probe::Unknown(DisplayErrorContext(&err).to_string()),
            },
            Err(_) => Probe::Unknown(format!("no answer within {within:?}")),
        }
    }

    /// Asks `GetConnection` about a connection whose sends keep answering 429: a 429 to that too
    /// is the account's quota (a client's full buffer throttles only what is sent to it). Any
    /// other answer leaves the blame with the client.
    async fn account_says_throttled(&self, to: &Recipient, by: Instant) -> bool {
        let within = by.saturating_duration_since(Instant::now()).min(self.settings.call_timeout);
        let throttled = self.probe(&to.connection_id, &to.endpoint, within).await == Probe::Throttled;
        if throttled {
            tracing::info!(connection_id = %to.connection_id, "GetConnection answers 429 too: the account is throttled, not the client");
        }
        throttled
    }

    /// Gives up on a slow consumer, and closes it unless configured not to (the `DELETE` bounded
    /// by the time left).
    async fn slow_consumer(&self, to: &Recipient, finish_by: Option<Instant>) -> Outcome {
        Metrics::add(&self.metrics.slow_consumers, 1);
        Metrics::add(&self.metrics.failed, 1);
        let budget = self.settings.slow_consumer;
        if !self.settings.close_slow_consumers {
            tracing::warn!(connection_id = %to.connection_id, ?budget, "slow consumer: skipped for this batch");
            return Outcome::Failed(format!("slow consumer: 429 for {budget:?}"));
        }
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        let left = finish_by.map_or(self.settings.call_timeout, |at| at.saturating_duration_since(Instant::now()));
        let close = self.client(endpoint).delete_connection().connection_id(&to.connection_id).send();
        match tokio::time::timeout(left.min(self.settings.call_timeout), close).await {
            Ok(Ok(_)) => tracing::warn!(connection_id = %to.connection_id, ?budget, "slow consumer: closed"),
            Ok(Err(err)) => tracing::warn!(
                connection_id = %to.connection_id,
                error = %DisplayErrorContext(&err),
                "slow consumer: closing it failed; skipped for this batch"
            ),
            Err(_) => {
                tracing::warn!(connection_id = %to.connection_id, "slow consumer: no time left to close it; skipped")
            }
        }
        Outcome::Failed(format!("slow consumer: 429 for {budget:?}; closed"))
    }

    /// Closes a connection the handlers found flooding (`DELETE @connections`); one already gone
    /// is not an error, and a failure is logged (its record is gone: its next frame is refused).
    async fn close(&self, to: &Recipient) {
        let endpoint = self.settings.endpoint_override.as_deref().unwrap_or(&to.endpoint);
        match self.client(endpoint).delete_connection().connection_id(&to.connection_id).send().await {
            Ok(_) => {
                Metrics::add(&self.metrics.rate_limited_closed, 1);
                tracing::warn!(connection_id = %to.connection_id, "closed: it kept going over its rate limit");
            }
            Err(err) if err.raw_response().is_some_and(|r| r.status().as_u16() == 410) => {}
            Err(err) => tracing::warn!(
                connection_id = %to.connection_id,
                error = %DisplayErrorContext(&err),
                "closing a flooding connection failed"
            ),
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
    d - d.mul_f64(fastrand::f64() / 4.0)
}

mod aws_smithy_runtime_api_http {
    pub use aws_sdk_apigatewaymanagement::config::http::HttpResponse as Response;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipients(ids: &[&str]) -> Vec<Recipient> {
        let at = chrono::DateTime::<chrono::Utc>::UNIX_EPOCH;
        ids.iter()
            .map(|id| Recipient { connection_id: id.to_string(), endpoint: String::new(), connected_at: at })
            .collect()
    }

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::<chrono::Utc>::UNIX_EPOCH
    }

    #[test]
    fn progress_is_the_highest_settled_and_the_unsettled_below_it() {
        let all = recipients(&["a", "b", "c", "d", "e", "f"]);
        let order: Vec<&Recipient> = all.iter().collect();
        // a, b, d settled; c in flight; e and f not started (or cut off after the last write).
        let p = progress("k", &order, &[true, true, false, true, false, false], None, false, now());
        assert_eq!((p.through.as_str(), p.pending.clone()), ("d", vec!["c".to_string()]));
        let served: Vec<&str> = ["a", "b", "c", "d", "e", "f"].into_iter().filter(|id| p.settled(id)).collect();
        assert_eq!(served, ["a", "b", "d"], "a resume serves c, e and f, nobody else");
    }

    #[test]
    fn a_resume_never_moves_progress_back() {
        let all = recipients(&["a", "b", "c", "d", "e", "f"]);
        let first: Vec<&Recipient> = all.iter().collect();
        let earlier = progress("k", &first, &[true, false, true, true, false, false], None, false, now());
        assert_eq!((earlier.through.as_str(), earlier.pending.clone()), ("d", vec!["b".to_string()]));
        // The resume's recipients are those not settled: b, e, f. Only b is done when it writes.
        let second: Vec<&Recipient> = all.iter().filter(|r| !earlier.settled(&r.connection_id)).collect();
        let ids: Vec<&str> = second.iter().map(|r| r.connection_id.as_str()).collect();
        assert_eq!(ids, ["b", "e", "f"]);
        let p = progress("k", &second, &[true, false, false], Some(&earlier), false, now());
        assert_eq!(p.through, "d", "not back to b: c and d were served");
        assert!(p.pending.is_empty());
        assert!(["a", "b", "c", "d"].iter().all(|id| p.settled(id)) && !p.settled("e") && !p.settled("f"));
        let done = progress("k", &second, &[true, true, true], Some(&earlier), true, now());
        assert!(done.complete && done.settled("zzz"));
    }

    #[test]
    fn a_pending_list_past_its_cap_lowers_through_and_skips_nobody() {
        let ids: Vec<String> = (0..MAX_PENDING + 10).map(|i| format!("c{i:06}")).collect();
        let all = recipients(&ids.iter().map(String::as_str).collect::<Vec<_>>());
        let order: Vec<&Recipient> = all.iter().collect();
        // Only the last one settled: every other is pending below it.
        let mut settled = vec![false; order.len()];
        *settled.last_mut().unwrap() = true;
        let p = progress("k", &order, &settled, None, false, now());
        assert!(p.pending.len() <= MAX_PENDING);
        let skipped: Vec<&String> = ids.iter().filter(|id| p.settled(id)).collect();
        assert!(skipped.is_empty(), "{} unsettled recipients would be skipped", skipped.len());
    }
}
