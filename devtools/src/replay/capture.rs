//! `roomcast capture`: a live table's stream, read through the DynamoDB Streams API (every shard,
//! parents before children, in order per shard), written as JSON lines in the Lambda's record
//! format — what `roomcast replay` reads.

use std::io::Write;
use std::time::Duration;

use tokio::sync::watch;

use crate::stream::poller::StreamPoller;

/// When capturing stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Until {
    /// After this many records.
    pub limit: Option<usize>,
    /// As soon as no shard has anything new.
    pub idle: bool,
}

/// Reads records into `out` until `until` (or `stop`) says so; reports progress through
/// `progress(records so far, shard, last sequence number)`. Returns how many were written.
pub async fn capture(
    poller: &mut StreamPoller,
    out: &mut dyn Write,
    until: Until,
    mut stop: watch::Receiver<bool>,
    mut progress: impl FnMut(usize, &str, &str),
) -> anyhow::Result<usize> {
    poller.prime().await?;
    let mut written = 0;
    while until.limit.is_none_or(|limit| written < limit) && !*stop.borrow() {
        let batch = poller.poll().await?;
        if batch.records.is_empty() {
            if until.idle {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let room = until.limit.map_or(batch.records.len(), |limit| limit - written);
        let taken = &batch.records[..room.min(batch.records.len())];
        for record in taken {
            serde_json::to_writer(&mut *out, record)?;
            out.write_all(b"\n")?;
            written += 1;
        }
        out.flush()?;
        let last = taken.last().and_then(|r| r.change.sequence_number.as_deref());
        progress(written, &batch.shard_id, last.unwrap_or(""));
    }
    Ok(written)
}
