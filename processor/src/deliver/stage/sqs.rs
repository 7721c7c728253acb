//! The fan-out stage on Amazon SQS: a FIFO queue whose message groups are the jobs' groups
//! (`{tenant}#{room}#{lane}`), worked by the `fanout` function ([`crate::lambda::run_fanout`],
//! [`handle_jobs`]). FIFO keeps each group's jobs in the order queued and hands a group to one
//! worker at a time; different groups — other lanes, rooms and tenants — run in parallel, as many
//! as Lambda scales the function to. A job's id is its deduplication id: within SQS's five
//! minutes, a stream record redelivered after its hand-off queues nothing twice.

use std::collections::HashSet;
use std::time::Instant;

use aws_lambda_events::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
use tracing::Instrument;

use super::{Job, Stage};
use crate::deliver::{Deliverer, Outcome, Window};
use crate::metrics::Metrics;
use crate::store::StoreError;

/// No job starts with less than this left before the invocation must answer: it is reported
/// instead, untouched, so that its retry serves no one twice. (A job of 500 at 20 ms a call
/// takes a fraction of a second unless the account is throttling.)
pub const JOB_RESERVE: std::time::Duration = std::time::Duration::from_secs(5);

/// One `SendMessageBatch`: at most ten entries and 256 KiB of bodies.
pub(crate) const BATCH_ENTRIES: usize = 10;
pub(crate) const BATCH_BYTES: usize = 256 * 1024;

/// A message group id or deduplication id is at most 128 characters.
const ID_MAX: usize = 128;

pub struct SqsStage {
    client: Client,
    queue_url: String,
}

impl SqsStage {
    pub fn new(client: Client, queue_url: impl Into<String>) -> SqsStage {
        SqsStage { client, queue_url: queue_url.into() }
    }

    /// Sends one batch, in order. A batch SQS takes only in part is an error: the record is
    /// retried, and the entries already queued are dropped as repeats.
    async fn send(&self, batch: &[(&Job, String)]) -> Result<(), StoreError> {
        let entries = batch
            .iter()
            .enumerate()
            .map(|(i, (job, body))| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body)
                    .message_group_id(fit(&job.group))
                    .message_deduplication_id(fit(&job.id))
                    .build()
                    .map_err(|e| StoreError::Unavailable(format!("sqs entry: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out =
            self.client
                .send_message_batch()
                .queue_url(&self.queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| StoreError::Unavailable(format!("sqs send_message_batch: {}", DisplayErrorContext(&e))))?;
        if let Some(failed) = out.failed.first() {
            return Err(StoreError::Unavailable(format!(
                "sqs send_message_batch: {} of {} entries refused, first {}: {}",
                out.failed.len(),
                batch.len(),
                failed.code,
                failed.message.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }
}

/// An id SQS accepts: as it is when short enough, else its FNV-1a digest beside its tail (the
/// lane and part), which keeps it distinct and stable.
pub(crate) fn fit(id: &str) -> String {
    if id.len() <= ID_MAX {
        return id.to_string();
    }
    let hash = super::fnv1a(id);
    let tail: String = id.chars().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{hash:016x}~{tail}")
}

#[async_trait::async_trait]
impl Stage for SqsStage {
    async fn hand_off(&self, jobs: Vec<Job>) -> Result<(), StoreError> {
        let mut batch: Vec<(&Job, String)> = Vec::new();
        let mut bytes = 0;
        for job in &jobs {
            let body = serde_json::to_string(job).map_err(|e| StoreError::Unavailable(format!("a job: {e}")))?;
            if batch.len() == BATCH_ENTRIES || (bytes + body.len() > BATCH_BYTES && !batch.is_empty()) {
                self.send(&batch).await?;
                batch.clear();
                bytes = 0;
            }
            bytes += body.len();
            batch.push((job, body));
        }
        if !batch.is_empty() {
            self.send(&batch).await?;
        }
        Ok(())
    }
}

/// One invocation of the `fanout` function: each SQS message is a [`Job`], delivered by the
/// processor's own rules within the invocation's window; none starts in its last [`JOB_RESERVE`].
///
/// A job left unfinished (its recipients still being retried when the window closed) is reported
/// in `batchItemFailures`, and so is every later message of its group, which must not overtake
/// it; other groups go on. Once the window is too short to start a job, the rest of the batch is
/// reported untouched. SQS delivers reported messages again after the queue's visibility timeout,
/// and a job that fails `maxReceiveCount` times goes to the dead-letter queue. A message that is
/// not a job can never succeed: it is logged with its id and dropped (`fanout_jobs_dropped`,
/// alarmed), not retried into the dead-letter queue at the expense of its group.
pub async fn handle_jobs(
    deliverer: &Deliverer,
    metrics: &Metrics,
    event: &SqsEvent,
    finish_by: Option<Instant>,
) -> SqsBatchResponse {
    let window = finish_by.map_or_else(Window::unbounded, Window::until);
    let mut failures: Vec<String> = Vec::new();
    let mut failed_groups: HashSet<String> = HashSet::new();
    let mut seen = HashSet::new();
    let mut late = false;
    for record in &event.records {
        let id = record.message_id.clone().unwrap_or_default();
        let job: Job = match record.body.as_deref().map(serde_json::from_str) {
            Some(Ok(job)) => job,
            other => {
                let error = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no body".to_string(),
                };
                Metrics::add(&metrics.fanout_jobs_dropped, 1);
                tracing::error!(message_id = %id, %error, "a message on the fan-out queue is not a job: dropped");
                continue;
            }
        };
        late = late || finish_by.is_some_and(|at| at.saturating_duration_since(Instant::now()) < JOB_RESERVE);
        if late || failed_groups.contains(&job.group) {
            Metrics::add(&metrics.fanout_jobs_reported, 1);
            failures.push(id);
            continue;
        }
        if !seen.insert(job.id.clone()) {
            continue;
        }
        let span = tracing::info_span!("job", job = %job.id, tenant = %job.tenant, room = %job.room);
        let delivery = job.deliver(deliverer, &window).instrument(span);
        // Every step of a job ends with the window, the table's calls after a 410 included.
        let outcome = match finish_by {
            Some(at) => tokio::time::timeout_at(at.into(), delivery)
                .await
                .unwrap_or_else(|_| Err(StoreError::OutOfTime("the job was still running at the deadline".into()))),
            None => delivery.await,
        };
        Metrics::add(&metrics.fanout_jobs, 1);
        match outcome {
            Ok(outcomes) => {
                let delivered = outcomes.iter().filter(|(_, o)| *o == Outcome::Delivered).count();
                tracing::debug!(job = %job.id, recipients = outcomes.len(), delivered, "job delivered");
            }
            Err(e) => {
                tracing::warn!(job = %job.id, tenant = %job.tenant, room = %job.room, error = %e, "job unfinished: SQS delivers it again");
                Metrics::add(&metrics.fanout_jobs_reported, 1);
                failed_groups.insert(job.group.clone());
                failures.push(id);
            }
        }
    }
    reported(failures)
}

/// An SQS event source's answer reporting the messages `ids` (`batchItemFailures`): the rest
/// of the batch is deleted, these come back after their visibility timeout.
pub(crate) fn reported(ids: impl IntoIterator<Item = String>) -> SqsBatchResponse {
    let mut response = SqsBatchResponse::default();
    response.batch_item_failures = ids
        .into_iter()
        .map(|id| {
            let mut failure = BatchItemFailure::default();
            failure.item_identifier = id;
            failure
        })
        .collect();
    response
}
