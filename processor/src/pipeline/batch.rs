//! Whole batches: the Lambda's event in, `batchItemFailures` out, within the invocation's
//! deadline; the batch's counts and plugin statistics logged; and the stream poller's loop
//! (`run_from_stream`) for the local stack.

use std::time::Instant;

use aws_lambda_events::dynamodb::EventRecord;
use aws_lambda_events::streams::DynamoDbEventResponse;

use super::{ANSWER_MARGIN, Processor, START_RESERVE};
use crate::deliver::Window;
use crate::metrics::Metrics;
use crate::model::ItemKind;
use crate::presence::{PresenceOp, PresenceRuns, RunRecord};
use crate::rules::Lookups;
use crate::store::StoreError;
use crate::stream::batch::{BatchOutcome, Decoded, decode_batch, run_decoded};
use crate::stream::{Change, item_kind};

/// How many times a batch's webhook events are offered to the queue before the batch is
/// reported (the SQS client retries each of them too).
const QUEUE_ATTEMPTS: u32 = 4;

/// With webhooks, the records' work ends this long before the batch must, so that queueing
/// their events has time of its own.
const QUEUE_RESERVE: std::time::Duration = std::time::Duration::from_secs(2);

impl Processor {
    /// One batch, as the Lambda receives it (`Records` of the event, raw), with no deadline.
    pub async fn process_batch(&self, raw: &[serde_json::Value]) -> BatchOutcome {
        self.process_batch_until(raw, None).await
    }

    /// One batch that must be done by `finish_by`: no record starts with less than
    /// [`START_RESERVE`] left, no delivery runs past it, and the earliest record not done is
    /// reported for redelivery.
    pub async fn process_batch_until(&self, raw: &[serde_json::Value], finish_by: Option<Instant>) -> BatchOutcome {
        self.process_decoded(decode_batch(raw), finish_by).await
    }

    /// One batch of records already read (the stream poller's, the local stack's), with no
    /// deadline: nothing goes through JSON and back.
    pub async fn process_records(&self, records: &[EventRecord]) -> BatchOutcome {
        self.process_decoded(records.iter().cloned().map(Ok).collect(), None).await
    }

    async fn process_decoded(&self, decoded: Decoded, finish_by: Option<Instant>) -> BatchOutcome {
        let before = self.metrics.snapshot();
        // One look-up of each tenant's ACTIVE pointer for the whole batch.
        let lookups = match self.presence_runs {
            true => Lookups::with_presence_runs(presence_runs_of(&decoded)),
            false => Lookups::default(),
        };
        // The records' own deadline: the batch's, less the time queueing their webhook events
        // keeps for itself.
        let work_by = match self.webhooks.is_some() {
            true => finish_by.map(|at| at.checked_sub(QUEUE_RESERVE).unwrap_or(at)),
            false => finish_by,
        };
        let window = work_by.map_or_else(Window::unbounded, Window::until);
        let start_by = work_by.map(|at| at.checked_sub(START_RESERVE).unwrap_or(at));
        // Where each record is, for the webhook events held while the batch ran.
        let positions: std::collections::HashMap<String, (usize, String)> = decoded
            .iter()
            .enumerate()
            .filter_map(|(at, d)| d.as_ref().ok().map(|r| (at, r)))
            .map(|(at, r)| (r.event_id.clone(), (at, r.change.sequence_number.clone().unwrap_or_default())))
            .collect();
        let mut outcome = run_decoded(decoded, self.partitions_at_once, start_by, |_, record| {
            let (lookups, window) = (&lookups, &window);
            async move {
                let record = self.process_in_batch(&record, lookups, window);
                match work_by {
                    // Reads, compiles and writes are bounded too: a record still running at
                    // the end of the window is left for redelivery (every step is idempotent).
                    Some(at) => match tokio::time::timeout_at(at.into(), record).await {
                        Ok(done) => done.map(|_| ()),
                        Err(_) => Err(StoreError::OutOfTime("the record was still running at the deadline".into())),
                    },
                    None => record.await.map(|_| ()),
                }
            }
        })
        .await;
        Metrics::add(&self.metrics.young_dropped, window.settle().await as u64);
        self.queue_held_webhooks(&lookups, &positions, &mut outcome, finish_by).await;
        let malformed = outcome.malformed.len() as u64;
        Metrics::add(&self.metrics.records, malformed);
        Metrics::add(&self.metrics.skipped, malformed);
        if outcome.failure.is_some() {
            let counter = if outcome.out_of_time { &self.metrics.out_of_time } else { &self.metrics.platform_failures };
            Metrics::add(counter, 1);
        }
        self.log_batch(&before);
        outcome
    }

    /// Queues the webhook events the batch's records made — every record that was done, those
    /// after one reported for redelivery too ([`crate::webhook::Held::take`]) — by the batch's
    /// deadline, in the time the records left it ([`QUEUE_RESERVE`]). When they cannot be
    /// queued, the batch is reported from the earliest record that made some, and its retry
    /// makes them again (without the room events of transitions already applied).
    async fn queue_held_webhooks(
        &self,
        lookups: &Lookups,
        positions: &std::collections::HashMap<String, (usize, String)>,
        outcome: &mut BatchOutcome,
        finish_by: Option<Instant>,
    ) {
        let (queued, earliest) = lookups.webhooks().take(|id| positions.get(id).map(|(at, _)| *at));
        if queued.is_empty() {
            return;
        }
        // A refusal is tried again a few times within the window before the batch is reported:
        // a retried batch makes its members' events again, but not its rooms' (see
        // `webhook::events`), so a retry costs the tenant its room events.
        let mut result = Ok(());
        for attempt in 0..QUEUE_ATTEMPTS {
            if attempt > 0 {
                let pause = std::time::Duration::from_millis(50 << attempt);
                if finish_by.is_some_and(|at| Instant::now() + pause >= at) {
                    break;
                }
                tokio::time::sleep(pause).await;
            }
            let queueing = self.queue_webhooks(queued.clone());
            result = match finish_by {
                Some(at) => tokio::time::timeout_at(at.into(), queueing)
                    .await
                    .unwrap_or_else(|_| Err(StoreError::OutOfTime("queueing webhook events at the deadline".into()))),
                None => queueing.await,
            };
            if result.is_ok() || matches!(result, Err(StoreError::OutOfTime(_))) {
                break;
            }
            tracing::info!(attempt, error = %result.as_ref().err().map(ToString::to_string).unwrap_or_default(), "queueing webhook events: tried again");
        }
        let Err(error) = result else { return };
        let Some((at, sequence)) = earliest.and_then(|id| positions.get(&id).cloned()) else { return };
        tracing::warn!(%error, %sequence, "the batch's webhook events could not be queued: retried from the first record that made some");
        if outcome.failure.as_ref().is_none_or(|(failed, _)| at < *failed) {
            outcome.out_of_time = matches!(error, StoreError::OutOfTime(_));
            outcome.failure = Some((at, sequence));
        }
    }

    /// The batch's counts (since `before`) and each tenant plugin's statistics, logged; as
    /// CloudWatch embedded metrics too in the Lambda.
    fn log_batch(&self, before: &crate::metrics::Counts) {
        let counts = self.metrics.snapshot().since(before);
        counts.emit("roomcast.batch");
        let plugins = self.rules.as_deref().map(|rules| rules.take_stats()).unwrap_or_default();
        for stats in &plugins {
            tracing::info!(
                tenant = %stats.tenant,
                version = %stats.version,
                calls = stats.calls,
                faults = stats.fault_count(),
                fault_kinds = %serde_json::to_string(&stats.faults).unwrap_or_default(),
                fuel_p50 = stats.fuel_p50,
                fuel_p99 = stats.fuel_p99,
                micros_p50 = stats.micros_p50,
                micros_p99 = stats.micros_p99,
                "roomcast.plugin"
            );
        }
        if let Some(emf) = &self.emf {
            // Its own line on stdout, outside the JSON log's envelope: CloudWatch reads it as is.
            let now = chrono::Utc::now().timestamp_millis();
            println!("{}", counts.emf(emf, now));
            for stats in &plugins {
                println!("{}", stats.emf(emf, now));
            }
        }
    }

    /// The Lambda entry without a deadline: `{"Records": [...]}` in, `batchItemFailures` out.
    pub async fn handle_event(&self, event: &serde_json::Value) -> Result<DynamoDbEventResponse, String> {
        self.handle_event_until(event, None).await
    }

    /// The Lambda entry: the batch must be answered by `deadline` (the invocation's); the work
    /// ends [`ANSWER_MARGIN`] before it.
    pub async fn handle_event_until(
        &self,
        event: &serde_json::Value,
        deadline: Option<Instant>,
    ) -> Result<DynamoDbEventResponse, String> {
        let Some(records) = event.get("Records").and_then(|r| r.as_array()) else {
            return Err("not a DynamoDB stream event: it has no \"Records\" array".into());
        };
        let finish_by = deadline.map(|at| at.checked_sub(ANSWER_MARGIN).unwrap_or(at));
        Ok(self.process_batch_until(records, finish_by).await.response())
    }
}

/// A stream record's `ApproximateCreationDateTime`; `None` for one made by hand without it.
pub(super) fn record_time(record: &EventRecord) -> Option<chrono::DateTime<chrono::Utc>> {
    let t = record.change.approximate_creation_date_time;
    (t.timestamp() > 0).then_some(t)
}

/// The batch's membership records that change presence, per room ([`PresenceRuns`]): decoded
/// ahead only when the batch holds two or more memberships (a join storm), so that a batch of
/// messages pays nothing for it.
fn presence_runs_of(decoded: &Decoded) -> PresenceRuns {
    let membership = |record: &&EventRecord| item_kind(record) == Some(ItemKind::Membership);
    let memberships = || decoded.iter().filter_map(|d| d.as_ref().ok()).filter(membership);
    if memberships().nth(1).is_none() {
        return PresenceRuns::default();
    }
    PresenceRuns::of(memberships().filter_map(|record| {
        let change = Change::from_record(record);
        let (m, op, inserted) = match (change.joined(), change.left()) {
            (Some(m), _) => (m.clone(), PresenceOp::Add, matches!(change, Change::Inserted(_))),
            (_, Some(m)) => (m.clone(), PresenceOp::Remove, false),
            _ => return None,
        };
        let seq = record.change.sequence_number.as_deref().map(crate::model::sequence_key);
        let time = record_time(record).unwrap_or_else(chrono::Utc::now);
        Some(RunRecord { event_id: record.event_id.clone(), time, seq, membership: m, op, inserted })
    }))
}

/// Feeds the processor from a table's stream through the DynamoDB Streams API until `shutdown`
/// fires, as Lambda's event source mapping would: a batch whose record failed for a platform
/// reason is re-read from that record after a pause; with `redeliver`, every batch is
/// processed twice, as the event source may.
pub async fn run_from_stream(
    processor: &Processor,
    poller: &mut crate::stream::poller::StreamPoller,
    idle: std::time::Duration,
    log: Option<&crate::stream::log::StreamLog>,
    redeliver: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut failures_in_a_row = 0u32;
    while !*shutdown.borrow() {
        let batch = poller.poll().await?;
        if batch.records.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        if let Some(log) = log {
            log.append(&batch.records);
        }
        let mut outcome = processor.process_records(&batch.records).await;
        if redeliver {
            outcome = processor.process_records(&batch.records).await;
        }
        if let Some((_, sequence)) = outcome.failure {
            failures_in_a_row += 1;
            let pause = std::time::Duration::from_millis(200 * u64::from(failures_in_a_row.min(25)));
            tracing::warn!(shard = %batch.shard_id, %sequence, ?pause, "batch failed; re-reading from the failed record");
            poller.rewind(&batch.shard_id, &sequence);
            tokio::time::sleep(pause).await;
        } else {
            failures_in_a_row = 0;
        }
    }
    Ok(())
}
