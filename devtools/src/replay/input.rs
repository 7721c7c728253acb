//! What `roomcast replay` reads, in any of three forms, into stream records in order:
//!
//! * a Lambda DynamoDB stream event: `{"Records": [...]}`;
//! * JSON lines, one stream record each (`roomcast capture`, `roomcast dev --stream-log`);
//! * the message the event source mapping's on-failure destination receives for a failed batch
//!   (`{"DDBStreamBatchInfo": {"shardId", "startSequenceNumber", "endSequenceNumber",
//!   "streamArn", …}, …}`), whose records are fetched from the live stream.
//!
//! A line that is not JSON, or a record that does not read as a stream record, becomes a
//! [`Item::Skipped`] naming its position and event id; reading goes on.

use aws_lambda_events::dynamodb::EventRecord;
use aws_sdk_dynamodbstreams::error::DisplayErrorContext;
use aws_sdk_dynamodbstreams::types::ShardIteratorType;
use serde::Deserialize;

use crate::stream::{decode_record, sequence_lt};

/// One entry of the input, in order.
#[derive(Debug)]
pub enum Item {
    Record { record: Box<EventRecord> },
    Skipped { source: String, event_id: String, reason: String },
}

/// Where a failed batch's records are (the on-failure destination's `DDBStreamBatchInfo`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedBatch {
    pub shard_id: String,
    pub start_sequence_number: String,
    pub end_sequence_number: String,
    pub stream_arn: String,
    #[serde(default)]
    pub batch_size: Option<usize>,
}

/// The input, read: the records (or skips), and the failed batches still to fetch.
#[derive(Debug, Default)]
pub struct Parsed {
    pub items: Vec<Item>,
    /// Positions in `items` where a failed batch's records go, with the batch.
    pub failed_batches: Vec<(usize, String, FailedBatch)>,
}

/// Reads the input text (any of the three forms).
pub fn parse(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    // One JSON document (an event, a failure message, or a single record) …
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
        && value.is_object()
    {
        read_value(&value, "input", &mut parsed);
        return parsed;
    }
    // … or JSON lines.
    for (index, line) in text.lines().enumerate() {
        let source = format!("line {}", index + 1);
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(value) if value.is_object() => read_value(&value, &source, &mut parsed),
            Ok(_) => {
                parsed.items.push(Item::Skipped { source, event_id: "?".into(), reason: "not a JSON object".into() })
            }
            Err(e) => {
                parsed.items.push(Item::Skipped { source, event_id: "?".into(), reason: format!("not JSON: {e}") })
            }
        }
    }
    parsed
}

fn read_value(value: &serde_json::Value, source: &str, parsed: &mut Parsed) {
    if let Some(records) = value.get("Records") {
        match records.as_array() {
            Some(records) => {
                for (index, raw) in records.iter().enumerate() {
                    let source = if source == "input" {
                        format!("record {}", index + 1)
                    } else {
                        format!("{source} record {}", index + 1)
                    };
                    read_record(raw, source, parsed);
                }
            }
            None => parsed.items.push(Item::Skipped {
                source: source.into(),
                event_id: "?".into(),
                reason: "\"Records\" is not an array".into(),
            }),
        }
    } else if let Some(info) = value.get("DDBStreamBatchInfo") {
        match FailedBatch::deserialize(info) {
            Ok(batch) => parsed.failed_batches.push((parsed.items.len(), source.to_string(), batch)),
            Err(e) => parsed.items.push(Item::Skipped {
                source: source.into(),
                event_id: "?".into(),
                reason: format!("DDBStreamBatchInfo does not read: {e}"),
            }),
        }
    } else {
        read_record(value, source.to_string(), parsed);
    }
}

fn read_record(raw: &serde_json::Value, source: String, parsed: &mut Parsed) {
    match decode_record(parsed.items.len(), raw) {
        Ok(record) => parsed.items.push(Item::Record { record: Box::new(record) }),
        Err(malformed) => {
            parsed.items.push(Item::Skipped { source, event_id: malformed.event_id, reason: malformed.reason })
        }
    }
}

/// Fetches a failed batch's records from the stream: from its first sequence number to its
/// last, inclusive, in order.
pub async fn fetch(
    client: &aws_sdk_dynamodbstreams::Client,
    batch: &FailedBatch,
    source: &str,
) -> anyhow::Result<Vec<Item>> {
    let iterator = client
        .get_shard_iterator()
        .stream_arn(&batch.stream_arn)
        .shard_id(&batch.shard_id)
        .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
        .sequence_number(&batch.start_sequence_number)
        .send()
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{source}: cannot read shard {} of {} at {}: {}",
                batch.shard_id,
                batch.stream_arn,
                batch.start_sequence_number,
                DisplayErrorContext(&e)
            )
        })?;
    let mut iterator = iterator.shard_iterator;
    let mut items = Vec::new();
    // A bound on empty reads: an open shard answers empty pages with a next iterator forever.
    let mut empty_reads = 0;
    while let Some(current) = iterator.take() {
        let out =
            client.get_records().shard_iterator(current).limit(1000).send().await.map_err(|e| {
                anyhow::anyhow!("{source}: reading shard {}: {}", batch.shard_id, DisplayErrorContext(&e))
            })?;
        let records = out.records.unwrap_or_default();
        if records.is_empty() {
            empty_reads += 1;
            if empty_reads >= 3 {
                break;
            }
        }
        for record in records {
            let record = crate::stream::poller::to_lambda_record(record, &batch.stream_arn);
            let seq = record.change.sequence_number.clone().unwrap_or_default();
            if sequence_lt(&batch.end_sequence_number, &seq) {
                return Ok(items);
            }
            items.push(Item::Record { record: Box::new(record) });
            if seq == batch.end_sequence_number {
                return Ok(items);
            }
        }
        iterator = out.next_shard_iterator;
    }
    if items.is_empty() {
        anyhow::bail!(
            "{source}: no records from {} to {} in shard {} (trimmed after 24 h, or another stream?)",
            batch.start_sequence_number,
            batch.end_sequence_number,
            batch.shard_id
        );
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        assert!(sequence_lt("99", "100"));
        assert!(sequence_lt("100", "101"));
        assert!(!sequence_lt("101", "101"));
        assert!(!sequence_lt("1000", "999"));
    }

    #[test]
    fn the_failure_destination_message_is_recognised() {
        let message = r#"{
          "requestContext": {"requestId": "r", "functionArn": "arn:aws:lambda:us-east-1:1:function:p",
                             "condition": "RetryAttemptsExhausted", "approximateInvokeCount": 6},
          "responseContext": {"statusCode": 200, "executedVersion": "$LATEST", "functionError": "Unhandled"},
          "version": "1.0", "timestamp": "2026-11-21T10:00:00.000Z",
          "DDBStreamBatchInfo": {"shardId": "shardId-1", "startSequenceNumber": "100",
            "endSequenceNumber": "105", "approximateArrivalOfFirstRecord": "2026-11-21T09:59:00Z",
            "approximateArrivalOfLastRecord": "2026-11-21T09:59:01Z", "batchSize": 6,
            "streamArn": "arn:aws:dynamodb:us-east-1:1:table/roomcast/stream/2026"}
        }"#;
        let parsed = parse(message);
        assert!(parsed.items.is_empty());
        let (at, source, batch) = &parsed.failed_batches[0];
        assert_eq!((*at, source.as_str()), (0, "input"));
        assert_eq!((batch.start_sequence_number.as_str(), batch.end_sequence_number.as_str()), ("100", "105"));
        assert_eq!(batch.batch_size, Some(6));
    }

    #[test]
    fn bad_lines_are_skipped_with_their_position() {
        let parsed = parse("not json\n\n[1]\n{\"eventID\": \"e4\", \"eventName\": 7}\n");
        let skipped: Vec<_> = parsed
            .items
            .iter()
            .map(|i| match i {
                Item::Skipped { source, event_id, .. } => (source.as_str(), event_id.as_str()),
                Item::Record { .. } => ("record", ""),
            })
            .collect();
        assert_eq!(skipped, [("line 1", "?"), ("line 3", "?"), ("line 4", "e4")]);
    }
}
