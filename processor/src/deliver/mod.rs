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
//!
//! Here: [`Deliverer::apply`] (a record's effects) and a recipient's way through the window.
//! Beside it: `post` (one recipient's `PostToConnection`, what each answer means, backing off,
//! slow consumers, closing), `resumable` (a big fan-out's progress in the table), `window` (one
//! batch's time and what it sets aside), [`limit`] (the calls in flight) and [`stage`] (the
//! fan-out stage).

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
mod post;
mod resumable;
pub mod stage;
mod window;

use post::Sent;
pub use resumable::{PROGRESS_EVERY, PROGRESS_RESERVE, PROGRESS_WRITE, RESUMABLE_RECIPIENTS};
pub use window::{Window, YOUNG_GRACE};

use limit::{AdaptiveLimit, Finished};

/// How deliveries go (the configuration's, `ROOMCAST_DELIVERY_*`).
pub use crate::config::DeliverySettings;

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
        if self.dry_run {
            return Ok(not_sent(effects));
        }
        let mut outcomes = Vec::new();
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
                        None => outcomes.extend(self.send_all(payload, recipients, window).await?),
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
    /// One frame to each recipient, as many at once as the limit allows, within the window.
    async fn send_all(
        &self,
        payload: &crate::protocol::ServerMessage,
        recipients: &[Recipient],
        window: &Window,
    ) -> Result<Vec<(String, Outcome)>, StoreError> {
        let body = Blob::new(payload.to_json());
        let sends: Vec<_> = recipients
            .iter()
            .map(|r| {
                let body = body.clone();
                async move {
                    Ok::<_, StoreError>((r, self.send(r, body, window, window.finish_by, window.finish_by).await?))
                }
            })
            .collect();
        let results: Vec<Result<(&Recipient, Sent), StoreError>> =
            futures::stream::iter(sends).buffer_unordered(self.inner.limit.max()).collect().await;
        let mut sent = Vec::with_capacity(results.len());
        for result in results {
            sent.push(result?);
        }
        Ok(self.judge_slow(sent, window, window.finish_by, false).await)
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

/// A dry run's outcomes: every recipient of every frame, not sent.
fn not_sent(effects: &[Effect]) -> Vec<(String, Outcome)> {
    let mut outcomes: Vec<(String, Outcome)> = effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::Send { recipients, .. } => Some(recipients),
            _ => None,
        })
        .flatten()
        .map(|r| (r.connection_id.clone(), Outcome::NotSent))
        .collect();
    outcomes.sort();
    outcomes
}
