//! The batch runner: how one batch of stream records is processed.
//!
//! * Records of one partition key (`pk`: a room, or a connection) are processed in order, one
//!   after the other; different partition keys proceed concurrently.
//! * A malformed record is reported with its position and event id, counted, and skipped.
//! * A record that fails for a platform reason (the table is unavailable) stops its partition.
//!   Its sequence number — the earliest such in the batch — is reported in `batchItemFailures`,
//!   and no record after it in the batch is started. Lambda then redelivers from that record;
//!   records of other rooms already in flight when it failed complete, and their redelivery is
//!   harmless for clients because every message carries its id.
//! * With a deadline (`start_by`), no record starts after it: the earliest record not started
//!   is reported the same way, so the invocation answers in time instead of timing out (which
//!   would make Lambda redeliver the whole batch).

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use aws_lambda_events::dynamodb::EventRecord;
use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use futures::StreamExt;

use super::{MalformedRecord, decode_record, partition_key};
use crate::store::StoreError;

#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// The earliest record that failed for a platform reason: (position, sequence number).
    pub failure: Option<(usize, String)>,
    pub malformed: Vec<MalformedRecord>,
    /// Records processed to the end.
    pub processed: usize,
    /// The reported record was not done for lack of time (not a platform fault).
    pub out_of_time: bool,
}

impl BatchOutcome {
    /// The Lambda response: the failed record's sequence number, or nothing.
    pub fn response(&self) -> DynamoDbEventResponse {
        let mut response = DynamoDbEventResponse::default();
        if let Some((_, sequence)) = &self.failure {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(sequence.clone());
            response.batch_item_failures.push(failure);
        }
        response
    }
}

/// A batch's records, each read once: a malformed one is an error value naming its position.
pub type Decoded = Vec<Result<EventRecord, MalformedRecord>>;

/// Reads the raw records of one batch (the Lambda event's `Records`), one by one.
pub fn decode_batch(raw: &[serde_json::Value]) -> Decoded {
    raw.iter().enumerate().map(|(position, value)| decode_record(position, value)).collect()
}

/// Runs `process` over the raw records of one batch (see the module docs for the rules).
pub async fn run_batch<F, Fut>(
    raw: &[serde_json::Value],
    partitions_at_once: usize,
    start_by: Option<Instant>,
    process: F,
) -> BatchOutcome
where
    F: Fn(usize, EventRecord) -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    run_decoded(decode_batch(raw), partitions_at_once, start_by, process).await
}

/// [`run_batch`] over records already read: the stream poller's and the local stack's, which
/// are typed from the start and never go through JSON.
pub async fn run_decoded<F, Fut>(
    decoded: Decoded,
    partitions_at_once: usize,
    start_by: Option<Instant>,
    process: F,
) -> BatchOutcome
where
    F: Fn(usize, EventRecord) -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut outcome = BatchOutcome::default();
    let mut groups: Vec<(String, Vec<(usize, EventRecord)>)> = Vec::new();
    for (position, decoded) in decoded.into_iter().enumerate() {
        match decoded {
            Ok(record) => {
                // A record without a key gets a group of its own; decoding it will say why.
                let key = partition_key(&record).map_or_else(|| format!("\0{position}"), str::to_string);
                match groups.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, group)) => group.push((position, record)),
                    None => groups.push((key, vec![(position, record)])),
                }
            }
            Err(malformed) => {
                tracing::warn!(position, event_id = %malformed.event_id, reason = %malformed.reason, "skipping malformed stream record");
                outcome.malformed.push(malformed);
            }
        }
    }

    let shared =
        Shared { failure: Mutex::new(None), processed: AtomicUsize::new(0), out_of_time: Default::default(), start_by };
    let partitions: Vec<_> = groups.into_iter().map(|(_, group)| run_partition(group, &shared, &process)).collect();
    futures::stream::iter(partitions).buffer_unordered(partitions_at_once.max(1)).collect::<Vec<()>>().await;
    let Shared { failure, processed, out_of_time, .. } = shared;
    outcome.out_of_time = out_of_time.into_inner();
    outcome.failure = failure.into_inner().unwrap_or_else(|p| p.into_inner());
    outcome.processed = processed.into_inner();
    outcome
}

struct Shared {
    /// The earliest platform failure so far: (position, sequence number).
    failure: Mutex<Option<(usize, String)>>,
    processed: AtomicUsize,
    out_of_time: std::sync::atomic::AtomicBool,
    /// No record starts after this.
    start_by: Option<Instant>,
}

impl Shared {
    fn report(&self, position: usize, sequence: String) {
        let mut earliest = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if earliest.as_ref().is_none_or(|(at, _)| position < *at) {
            *earliest = Some((position, sequence));
        }
    }

    fn failed_before(&self, position: usize) -> bool {
        self.failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|(at, _)| *at < position)
    }
}

/// One partition key's records, in order, until one fails for a platform reason.
async fn run_partition<F, Fut>(group: Vec<(usize, EventRecord)>, shared: &Shared, process: &F)
where
    F: Fn(usize, EventRecord) -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    for (position, record) in group {
        if shared.failed_before(position) {
            return;
        }
        let sequence = record.change.sequence_number.clone().unwrap_or_else(|| record.event_id.clone());
        if shared.start_by.is_some_and(|at| Instant::now() >= at) {
            tracing::warn!(position, %sequence, "no time left to start this record; reporting it for redelivery");
            shared.out_of_time.store(true, Ordering::Relaxed);
            shared.report(position, sequence);
            return;
        }
        match process(position, record).await {
            Ok(()) => {
                shared.processed.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) if err.is_platform() => {
                tracing::error!(position, %sequence, error = %err, "record failed; reporting it for redelivery");
                if matches!(err, StoreError::OutOfTime(_)) {
                    shared.out_of_time.store(true, Ordering::Relaxed);
                }
                shared.report(position, sequence);
                return;
            }
            Err(err) => {
                // Not the platform's fault (e.g. the connection vanished meanwhile): retrying
                // would not help.
                tracing::warn!(position, %sequence, error = %err, "record could not be applied; skipping it");
                shared.processed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn record(seq: u32, pk: &str) -> serde_json::Value {
        serde_json::json!({
            "eventID": format!("e{seq}"), "eventName": "INSERT", "awsRegion": "us-east-1",
            "eventSource": "aws:dynamodb",
            "dynamodb": {"Keys": {"pk": {"S": pk}, "sk": {"S": "x"}}, "SequenceNumber": format!("{seq:03}"), "SizeBytes": 10}
        })
    }

    #[tokio::test]
    async fn keeps_order_per_partition_and_reports_the_earliest_platform_failure() {
        let raw = vec![record(1, "a"), record(2, "b"), record(3, "a"), record(4, "b"), record(5, "a"), record(6, "c")];
        let seen = Arc::new(Mutex::new(Vec::new()));
        let outcome = run_batch(&raw, 1, None, |pos, rec| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(rec.event_id.clone());
                if pos == 3 { Err(StoreError::Unavailable("down".into())) } else { Ok(()) }
            }
        })
        .await;
        assert_eq!(outcome.failure, Some((3, "004".into())));
        let response = serde_json::to_value(outcome.response()).unwrap();
        assert_eq!(response, serde_json::json!({"batchItemFailures": [{"itemIdentifier": "004"}]}));
        // One partition at a time: a's records in order, then b's up to the failure; nothing
        // positioned after the failure (c's record 6) was started.
        assert_eq!(*seen.lock().unwrap(), vec!["e1", "e3", "e5", "e2", "e4"]);
    }

    #[tokio::test]
    async fn malformed_records_are_reported_and_the_rest_processed() {
        let raw = vec![record(1, "a"), serde_json::json!({"eventID": "bad", "eventName": "INSERT"}), record(3, "a")];
        let outcome = run_batch(&raw, 4, None, |_, _| async { Ok(()) }).await;
        assert_eq!(outcome.processed, 2);
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.malformed.len(), 1);
        assert_eq!(outcome.malformed[0].position, 1);
        assert_eq!(outcome.malformed[0].event_id, "bad");
        assert!(outcome.response().batch_item_failures.is_empty());
    }

    #[tokio::test]
    async fn no_record_starts_after_the_deadline_and_the_earliest_unstarted_is_reported() {
        let raw = vec![record(1, "a"), record(2, "a"), record(3, "b"), record(4, "a")];
        let start_by = Instant::now() + std::time::Duration::from_millis(200);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let outcome = run_batch(&raw, 1, Some(start_by), |pos, rec| {
            let seen = seen.clone();
            async move {
                seen.lock().unwrap().push(rec.event_id.clone());
                if pos == 0 {
                    // The first record uses up the batch's time.
                    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                }
                Ok(())
            }
        })
        .await;
        assert_eq!(*seen.lock().unwrap(), vec!["e1"]);
        assert_eq!(outcome.processed, 1);
        assert_eq!(outcome.failure, Some((1, "002".into())), "the earliest record not done");
    }

    #[tokio::test]
    async fn a_client_fault_does_not_fail_the_batch() {
        let raw = vec![record(1, "a"), record(2, "a")];
        let outcome = run_batch(&raw, 2, None, |pos, _| async move {
            if pos == 0 { Err(StoreError::NoConnection("c".into())) } else { Ok(()) }
        })
        .await;
        assert_eq!(outcome.failure, None);
        assert_eq!(outcome.processed, 2);
    }
}
