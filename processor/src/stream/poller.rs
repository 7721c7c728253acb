//! Reads a real table's stream through the DynamoDB Streams API (`aws-sdk-dynamodbstreams`) and
//! hands the records on in the Lambda's own shape: the path `roomcast dev --dynamodb-endpoint`
//! uses, and what `capture` builds on.
//!
//! What it takes care of, as Lambda's event source mapping does:
//! * every shard, found with paginated `DescribeStream`, re-described as the stream splits;
//! * a child shard only after its parent is read to its end (order per key survives a split);
//! * an expired iterator is re-acquired after the last sequence number read;
//! * trimmed data (older than 24 h) is reported and reading restarts at the trim horizon;
//! * after a failed batch, [`StreamPoller::rewind`] re-reads from the failed record.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_lambda_events::dynamodb::{EventRecord, StreamRecord, StreamViewType, UserIdentity};
use aws_sdk_dynamodbstreams::Client;
use aws_sdk_dynamodbstreams::error::DisplayErrorContext;
use aws_sdk_dynamodbstreams::operation::get_records::GetRecordsError;
use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use chrono::{TimeZone, Utc};

/// Where reading starts in a shard that has not been read yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartAt {
    TrimHorizon,
    Latest,
    /// At this sequence number in the shard that holds it; shards that begin after it are read
    /// from their start, shards that ended before it are not read.
    Sequence(String),
}

impl std::str::FromStr for StartAt {
    type Err = String;
    /// `trim-horizon`, `latest` or `at:SEQ`.
    fn from_str(s: &str) -> Result<StartAt, String> {
        match s {
            "trim-horizon" => Ok(StartAt::TrimHorizon),
            "latest" => Ok(StartAt::Latest),
            _ => match s.strip_prefix("at:") {
                Some(seq) if !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit()) => {
                    Ok(StartAt::Sequence(seq.to_string()))
                }
                _ => Err(format!("{s:?} is not trim-horizon, latest or at:SEQUENCE_NUMBER")),
            },
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Position {
    Start,
    After(String),
    At(String),
}

#[derive(Debug)]
struct Shard {
    parent: Option<String>,
    /// The shard's sequence number range, as described (the end only once it is closed).
    first: Option<String>,
    last: Option<String>,
    iterator: Option<String>,
    position: Position,
    /// Read to its end: `GetRecords` gave no next iterator.
    closed: bool,
}

/// Records of one shard, in order.
#[derive(Debug, Default)]
pub struct Batch {
    pub shard_id: String,
    pub records: Vec<EventRecord>,
}

#[derive(Debug)]
pub struct StreamPoller {
    client: Client,
    stream_arn: String,
    start: StartAt,
    shards: BTreeMap<String, Shard>,
    described_at: Option<Instant>,
    /// Records per `GetRecords` call (the API allows up to 1,000).
    pub limit: i32,
}

impl StreamPoller {
    pub fn new(client: Client, stream_arn: impl Into<String>, start: StartAt) -> StreamPoller {
        StreamPoller {
            client,
            stream_arn: stream_arn.into(),
            start,
            shards: BTreeMap::new(),
            described_at: None,
            limit: 1000,
        }
    }

    pub fn stream_arn(&self) -> &str {
        &self.stream_arn
    }

    /// The next records available, from the first shard (parents first) that has any. An empty
    /// batch means nothing new anywhere right now.
    pub async fn poll(&mut self) -> anyhow::Result<Batch> {
        if self.described_at.is_none_or(|at| at.elapsed() > Duration::from_secs(1)) {
            self.describe().await?;
        }
        for shard_id in ready_shards(&self.shards) {
            let records = self.read_shard(&shard_id).await?;
            if !records.is_empty() {
                return Ok(Batch { shard_id, records });
            }
        }
        Ok(Batch::default())
    }

    /// Describes the stream and takes an iterator for every readable shard, so that a poller
    /// starting at `Latest` sees every record written after this returns.
    pub async fn prime(&mut self) -> anyhow::Result<()> {
        self.describe().await?;
        for shard_id in ready_shards(&self.shards) {
            let Some(shard) = self.shards.get(&shard_id) else { continue };
            if shard.iterator.is_none() {
                let (position, has_parent) = (shard.position.clone(), shard.parent.is_some());
                let iterator = self.iterator(&shard_id, &position, has_parent).await?;
                if let Some(shard) = self.shards.get_mut(&shard_id) {
                    shard.iterator = iterator;
                }
            }
        }
        Ok(())
    }

    /// Re-read `shard_id` from `sequence_number` (inclusive), as Lambda does after a batch
    /// reported that record in `batchItemFailures`.
    pub fn rewind(&mut self, shard_id: &str, sequence_number: &str) {
        if let Some(shard) = self.shards.get_mut(shard_id) {
            shard.iterator = None;
            shard.closed = false;
            shard.position = Position::At(sequence_number.to_string());
        }
    }

    async fn describe(&mut self) -> anyhow::Result<()> {
        let mut start: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start.take())
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("describing stream {}: {}", self.stream_arn, DisplayErrorContext(&e)))?;
            let Some(description) = out.stream_description else { break };
            for shard in description.shards.unwrap_or_default() {
                let Some(id) = shard.shard_id else { continue };
                let range = shard.sequence_number_range;
                self.shards.entry(id).or_insert(Shard {
                    parent: shard.parent_shard_id,
                    first: range.as_ref().and_then(|r| r.starting_sequence_number.clone()),
                    last: range.and_then(|r| r.ending_sequence_number),
                    iterator: None,
                    position: Position::Start,
                    closed: false,
                });
            }
            match description.last_evaluated_shard_id {
                Some(next) => start = Some(next),
                None => break,
            }
        }
        self.described_at = Some(Instant::now());
        Ok(())
    }

    async fn iterator(&self, shard_id: &str, position: &Position, has_parent: bool) -> anyhow::Result<Option<String>> {
        let request = self.client.get_shard_iterator().stream_arn(&self.stream_arn).shard_id(shard_id);
        let position = match (&self.start, position, self.shards.get(shard_id)) {
            (StartAt::Sequence(seq), Position::Start, Some(shard)) => {
                let lt = super::sequence_lt;
                if shard.last.as_deref().is_some_and(|last| lt(last, seq)) {
                    return Ok(None); // the shard ended before: nothing to read in it
                }
                if shard.first.as_deref().is_none_or(|first| !lt(seq, first)) {
                    &Position::At(seq.clone())
                } else {
                    position // it begins after the sequence number: all of it
                }
            }
            _ => position,
        };
        let request = match position {
            // A child shard is read from its start: its parent was read to the end already.
            Position::Start if has_parent || self.start != StartAt::Latest => {
                request.shard_iterator_type(ShardIteratorType::TrimHorizon)
            }
            Position::Start => request.shard_iterator_type(ShardIteratorType::Latest),
            Position::After(seq) => {
                request.shard_iterator_type(ShardIteratorType::AfterSequenceNumber).sequence_number(seq)
            }
            Position::At(seq) => request.shard_iterator_type(ShardIteratorType::AtSequenceNumber).sequence_number(seq),
        };
        let out = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("getting an iterator for shard {shard_id}: {}", DisplayErrorContext(&e)))?;
        Ok(out.shard_iterator)
    }

    async fn read_shard(&mut self, shard_id: &str) -> anyhow::Result<Vec<EventRecord>> {
        let Some(shard) = self.shards.get(shard_id) else { return Ok(Vec::new()) };
        let iterator = match &shard.iterator {
            Some(it) => it.clone(),
            None => {
                let (position, has_parent) = (shard.position.clone(), shard.parent.is_some());
                match self.iterator(shard_id, &position, has_parent).await? {
                    Some(it) => it,
                    None => {
                        self.mark_closed(shard_id);
                        return Ok(Vec::new());
                    }
                }
            }
        };
        let result = self.client.get_records().shard_iterator(&iterator).limit(self.limit).send().await;
        let Some(shard) = self.shards.get_mut(shard_id) else { return Ok(Vec::new()) };
        match result {
            Ok(out) => {
                let records: Vec<EventRecord> = out
                    .records
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| to_lambda_record(r, &self.stream_arn))
                    .collect();
                if let Some(last) = records.last().and_then(|r| r.change.sequence_number.clone()) {
                    shard.position = Position::After(last);
                }
                shard.iterator = out.next_shard_iterator;
                if shard.iterator.is_none() {
                    shard.closed = true;
                }
                Ok(records)
            }
            Err(err) => match err.as_service_error() {
                Some(GetRecordsError::ExpiredIteratorException(_)) => {
                    tracing::info!(shard_id, "shard iterator expired; re-acquiring it after the last record read");
                    shard.iterator = None;
                    Ok(Vec::new())
                }
                Some(GetRecordsError::TrimmedDataAccessException(_)) => {
                    tracing::warn!(
                        shard_id,
                        "records were trimmed from the stream (older than 24 h) before they were read; \
                                              continuing at the trim horizon"
                    );
                    shard.iterator = None;
                    shard.position = Position::Start;
                    self.start = StartAt::TrimHorizon;
                    Ok(Vec::new())
                }
                Some(GetRecordsError::ResourceNotFoundException(_)) => {
                    tracing::warn!(shard_id, "shard no longer exists; skipping it");
                    shard.closed = true;
                    Ok(Vec::new())
                }
                _ => Err(anyhow::anyhow!("reading shard {shard_id}: {}", DisplayErrorContext(&err))),
            },
        }
    }

    fn mark_closed(&mut self, shard_id: &str) {
        if let Some(shard) = self.shards.get_mut(shard_id) {
            shard.closed = true;
        }
    }
}

/// Shards that may be read now: open, and whose parent is read to its end or no longer listed
/// (trimmed away).
fn ready_shards(shards: &BTreeMap<String, Shard>) -> Vec<String> {
    shards
        .iter()
        .filter(|(_, s)| !s.closed)
        .filter(|(_, s)| s.parent.as_ref().is_none_or(|p| shards.get(p).is_none_or(|parent| parent.closed)))
        .map(|(id, _)| id.clone())
        .collect()
}

/// A DynamoDB Streams API record in the shape a Lambda receives it.
pub fn to_lambda_record(record: Record, stream_arn: &str) -> EventRecord {
    let mut out = EventRecord::default();
    out.aws_region = record.aws_region.unwrap_or_default();
    out.event_id = record.event_id.unwrap_or_default();
    out.event_name = record.event_name.map(|n| n.as_str().to_string()).unwrap_or_default();
    out.event_source = record.event_source;
    out.event_version = record.event_version;
    out.event_source_arn = Some(stream_arn.to_string());
    out.user_identity = record.user_identity.map(|identity| {
        let mut u = UserIdentity::default();
        u.type_ = identity.r#type.unwrap_or_default();
        u.principal_id = identity.principal_id.unwrap_or_default();
        u
    });
    if let Some(change) = record.dynamodb {
        let mut c = StreamRecord::default();
        if let Some(t) = change.approximate_creation_date_time {
            c.approximate_creation_date_time =
                Utc.timestamp_opt(t.secs(), t.subsec_nanos()).single().unwrap_or_default();
        }
        c.keys = change.keys.map(serde_dynamo::Item::from).unwrap_or_default();
        c.new_image = change.new_image.map(serde_dynamo::Item::from).unwrap_or_default();
        c.old_image = change.old_image.map(serde_dynamo::Item::from).unwrap_or_default();
        c.sequence_number = change.sequence_number;
        c.size_bytes = change.size_bytes.unwrap_or_default();
        c.stream_view_type = change.stream_view_type.map(|v| match v.as_str() {
            "NEW_IMAGE" => StreamViewType::NewImage,
            "OLD_IMAGE" => StreamViewType::OldImage,
            "KEYS_ONLY" => StreamViewType::KeysOnly,
            _ => StreamViewType::NewAndOldImages,
        });
        out.change = c;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(parent: Option<&str>, closed: bool) -> Shard {
        Shard {
            parent: parent.map(str::to_string),
            first: None,
            last: None,
            iterator: None,
            position: Position::Start,
            closed,
        }
    }

    #[test]
    fn children_wait_for_their_parents_to_be_read_to_the_end() {
        let mut shards = BTreeMap::new();
        shards.insert("a-parent".to_string(), shard(None, false));
        shards.insert("b-child".to_string(), shard(Some("a-parent"), false));
        shards.insert("c-orphan".to_string(), shard(Some("trimmed-away"), false));
        assert_eq!(ready_shards(&shards), vec!["a-parent", "c-orphan"]);
        shards.get_mut("a-parent").unwrap().closed = true;
        assert_eq!(ready_shards(&shards), vec!["b-child", "c-orphan"]);
    }
}
