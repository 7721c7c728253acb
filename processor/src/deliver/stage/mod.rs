//! The fan-out stage: a frame for a big room leaves the stream batch as jobs on a queue, so that
//! the batch — and every other room and tenant on its shard — does not wait for it.
//!
//! Lambda hands a shard's batches to the processor one at a time. A message to 10,000 members
//! takes about a second at the account's quota, one to 100,000 about ten: every record behind it
//! on the shard waits that long. So a frame for at least [`HandOff::recipients`] members
//! ([`HANDOFF_RECIPIENTS`] by default) is cut into [`Job`]s of at most [`JOB_RECIPIENTS`] and
//! handed to a [`Stage`]: an SQS FIFO queue worked by parallel invocations of the `fanout`
//! function in AWS ([`sqs`]), worker tasks in `roomcast dev` and the tests ([`LocalStage`]). The
//! record is done once its jobs are durably queued.
//!
//! **Order.** A room's members are spread over [`LANES`] lanes by a stable hash of their
//! connection id ([`lane`]); a job holds one lane's recipients, and its queue group is
//! `{tenant}#{room}#{lane}`. Jobs of one group are worked one at a time, in the order queued
//! (FIFO message groups), and a room's records hand off in stream order, so each member receives
//! the room's staged frames in order, while up to [`LANES`] workers serve one room at once.
//!
//! **Exactly once, as far as queues go.** A job's id, `{eventId}#{frame}#{lane}#{part}`, is its
//! deduplication id: a stream record redelivered after a partial hand-off queues only what was
//! not queued (SQS drops a repeated id for five minutes; [`LocalStage`] keeps the ids it saw). A
//! job that fails is retried by the queue; a delivery that succeeded before the failure may then
//! be sent again, and clients drop repeats by the frame's `id`, as they do for any redelivery.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};

use super::{Deliverer, Outcome, Window};
use crate::protocol::ServerMessage;
use crate::react::{Effect, Recipient};
use crate::store::StoreError;

pub mod sqs;

pub use crate::config::HANDOFF_RECIPIENTS;

/// Recipients per job at most: ~150 bytes each, so a job with a frame of 128 KB stays under SQS's
/// 256 KB.
pub const JOB_RECIPIENTS: usize = 500;

/// A job's size at most, as queued: SQS takes a message of 256 KiB. Recipients with long
/// endpoints (a custom domain and stage) make smaller jobs, never a message SQS refuses.
pub const JOB_BYTES: usize = 240 * 1024;

/// Lanes per room: how many workers can serve one room at once.
pub const LANES: u64 = 32;

/// When a frame leaves the batch, and for where.
#[derive(Clone)]
pub struct HandOff {
    pub stage: Arc<dyn Stage>,
    /// Frames for at least this many recipients are handed off.
    pub recipients: usize,
}

/// One part of a big frame's fan-out: what a worker sends, to whom.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// The queue group, `{tenant}#{room}#{lane}`: worked one job at a time, in order.
    pub group: String,
    /// `{eventId}#{frame}#{lane}#{part}`: the deduplication id.
    pub id: String,
    pub tenant: String,
    pub room: String,
    pub payload: ServerMessage,
    pub recipients: Vec<JobRecipient>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRecipient {
    pub connection_id: String,
    pub endpoint: String,
    pub connected_at: DateTime<Utc>,
}

impl Job {
    /// Sends the job's frame to its recipients, as the batch itself would have: the same rules
    /// for 410, 429, slow consumers and the window. Young connections' set-aside retries are
    /// waited for (at most [`super::YOUNG_GRACE`]).
    pub async fn deliver(&self, deliverer: &Deliverer, window: &Window) -> Result<Vec<(String, Outcome)>, StoreError> {
        let recipients = self
            .recipients
            .iter()
            .map(|r| Recipient {
                connection_id: r.connection_id.clone(),
                endpoint: r.endpoint.clone(),
                connected_at: r.connected_at,
            })
            .collect();
        let effect = Effect::Send { payload: self.payload.clone(), recipients };
        let outcomes = deliverer.apply(std::slice::from_ref(&effect), window, None).await;
        window.settle().await;
        outcomes
    }
}

/// The lane of a room a connection is served in: FNV-1a of its id, the same in every process
/// and release (std's hasher is seeded per process).
pub fn lane(connection_id: &str) -> u64 {
    fnv1a(connection_id) % LANES
}

/// 64-bit FNV-1a: a hash fixed across processes and releases.
pub(crate) fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// One frame's jobs: its recipients by lane, at most [`JOB_RECIPIENTS`] and [`JOB_BYTES`] a job,
/// lanes in order. `frame` names the frame within its stream record (`{eventId}#{index}`). The
/// same frame and recipients always make the same jobs (their ids deduplicate).
pub fn jobs(tenant: &str, room: &str, frame: &str, payload: &ServerMessage, recipients: &[Recipient]) -> Vec<Job> {
    let mut lanes: Vec<Vec<&Recipient>> = vec![Vec::new(); LANES as usize];
    for r in recipients {
        lanes[lane(&r.connection_id) as usize].push(r);
    }
    // What a job costs besides its recipients (the frame, twice escaped at worst, and the
    // envelope), and what each recipient adds (its id, endpoint, time and JSON).
    let fixed = serde_json::to_vec(payload).map_or(JOB_BYTES / 2, |b| b.len() * 2) + 1024;
    let size = |r: &Recipient| r.connection_id.len() + r.endpoint.len() + 96;
    let mut jobs = Vec::new();
    for (index, members) in lanes.iter().enumerate() {
        let mut chunks: Vec<&[&Recipient]> = Vec::new();
        let (mut start, mut bytes) = (0, fixed);
        for (i, r) in members.iter().enumerate() {
            if i > start && (i - start == JOB_RECIPIENTS || bytes + size(r) > JOB_BYTES) {
                chunks.push(&members[start..i]);
                (start, bytes) = (i, fixed);
            }
            bytes += size(r);
        }
        if start < members.len() {
            chunks.push(&members[start..]);
        }
        for (part, chunk) in chunks.into_iter().enumerate() {
            jobs.push(Job {
                group: format!("{tenant}#{room}#{index}"),
                id: format!("{frame}#{index}#{part}"),
                tenant: tenant.to_string(),
                room: room.to_string(),
                payload: payload.clone(),
                recipients: chunk
                    .iter()
                    .map(|r| JobRecipient {
                        connection_id: r.connection_id.clone(),
                        endpoint: r.endpoint.clone(),
                        connected_at: r.connected_at,
                    })
                    .collect(),
            });
        }
    }
    jobs
}

/// Where big frames' jobs go.
#[async_trait::async_trait]
pub trait Stage: Send + Sync {
    /// Queues every job durably, in order within each group, or fails (the record is then
    /// retried, and the jobs already queued are dropped as repeats).
    async fn hand_off(&self, jobs: Vec<Job>) -> Result<(), StoreError>;
}

/// The stage in one process (`roomcast dev`, the tests): a worker task per group, working its
/// jobs in order with a [`Deliverer`] of its own, as the `fanout` function's containers would.
pub struct LocalStage {
    deliverer: Deliverer,
    groups: Mutex<HashMap<String, mpsc::UnboundedSender<Job>>>,
    /// Job ids seen, oldest first (at most [`LocalStage::REMEMBER`]): SQS FIFO's deduplication.
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
    unfinished: Arc<AtomicUsize>,
    idle: Arc<Notify>,
}

impl LocalStage {
    const REMEMBER: usize = 100_000;

    pub fn new(deliverer: Deliverer) -> Arc<LocalStage> {
        Arc::new(LocalStage {
            deliverer,
            groups: Mutex::new(HashMap::new()),
            seen: Mutex::new((HashSet::new(), VecDeque::new())),
            unfinished: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(Notify::new()),
        })
    }

    /// Jobs queued or being worked.
    pub fn unfinished(&self) -> usize {
        self.unfinished.load(Ordering::SeqCst)
    }

    /// Waits until every job queued so far has been worked.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.unfinished() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn first_time(&self, id: &str) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let (ids, order) = &mut *seen;
        if !ids.insert(id.to_string()) {
            return false;
        }
        order.push_back(id.to_string());
        if order.len() > Self::REMEMBER
            && let Some(oldest) = order.pop_front()
        {
            ids.remove(&oldest);
        }
        true
    }

    fn worker(&self) -> mpsc::UnboundedSender<Job> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
        let (deliverer, unfinished, idle) = (self.deliverer.clone(), self.unfinished.clone(), self.idle.clone());
        tokio::spawn(async move {
            while let Some(job) = rx.recv().await {
                // No deadline in one process: a worker serves its job to the end.
                let window = Window::unbounded();
                if let Err(e) = job.deliver(&deliverer, &window).await {
                    tracing::warn!(job = %job.id, error = %e, "fan-out job failed");
                }
                if unfinished.fetch_sub(1, Ordering::SeqCst) == 1 {
                    idle.notify_waiters();
                }
            }
        });
        tx
    }
}

#[async_trait::async_trait]
impl Stage for LocalStage {
    async fn hand_off(&self, jobs: Vec<Job>) -> Result<(), StoreError> {
        for job in jobs {
            if !self.first_time(&job.id) {
                continue;
            }
            self.unfinished.fetch_add(1, Ordering::SeqCst);
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            let sender = match groups.get(&job.group) {
                Some(sender) if !sender.is_closed() => sender.clone(),
                _ => {
                    let sender = self.worker();
                    groups.insert(job.group.clone(), sender.clone());
                    sender
                }
            };
            if sender.send(job).is_err() {
                self.unfinished.fetch_sub(1, Ordering::SeqCst);
                return Err(StoreError::Unavailable("the local fan-out stage has stopped".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipient(id: &str) -> Recipient {
        Recipient { connection_id: id.into(), endpoint: "http://x".into(), connected_at: Utc::now() }
    }

    #[test]
    fn jobs_cover_every_recipient_once_in_lanes_that_do_not_move() {
        let recipients: Vec<Recipient> = (0..5_000).map(|i| recipient(&format!("conn-{i:05}"))).collect();
        let payload = ServerMessage::Pong;
        let jobs = jobs("acme", "lobby", "ev1#0", &payload, &recipients);
        let mut seen: Vec<&str> =
            jobs.iter().flat_map(|j| j.recipients.iter().map(|r| r.connection_id.as_str())).collect();
        seen.sort();
        let mut want: Vec<&str> = recipients.iter().map(|r| r.connection_id.as_str()).collect();
        want.sort();
        assert_eq!(seen, want);
        for job in &jobs {
            assert!(job.recipients.len() <= JOB_RECIPIENTS);
            for r in &job.recipients {
                assert_eq!(job.group, format!("acme#lobby#{}", lane(&r.connection_id)));
            }
        }
        let ids: HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids.len(), jobs.len(), "ids are unique");
        // Spread over every lane, and the same lanes for the next frame.
        assert_eq!(jobs.iter().map(|j| &j.group).collect::<HashSet<_>>().len(), LANES as usize);
        let again = super::jobs("acme", "lobby", "ev2#0", &payload, &recipients);
        let groups = |js: &[Job]| js.iter().map(|j| (j.group.clone(), j.recipients.len())).collect::<Vec<_>>();
        assert_eq!(groups(&jobs), groups(&again));
        // The hash is fixed: a release that changed it would reorder a room's frames mid-deploy.
        assert_eq!(lane("a"), 0xaf63_dc4c_8601_ec8c % LANES, "FNV-1a");
    }

    #[test]
    fn recipients_with_long_endpoints_make_smaller_jobs_never_one_sqs_refuses() {
        let long = format!("https://{}.example.com/{}", "realtime-".repeat(20), "production-stage".repeat(10));
        let recipients: Vec<Recipient> = (0..5_000)
            .map(|i| Recipient {
                connection_id: format!("L0Xw8cZnIAMCJ{i:05}="),
                endpoint: long.clone(),
                connected_at: Utc::now(),
            })
            .collect();
        let body = "x".repeat(crate::protocol::MAX_MESSAGE_FRAME_BYTES - 1024);
        let payload =
            ServerMessage::Signal { id: "s".into(), room: "lobby".into(), user_id: "u".into(), data: body.into() };
        let jobs = jobs("acme", "lobby", "ev#0", &payload, &recipients);
        assert_eq!(jobs.iter().map(|j| j.recipients.len()).sum::<usize>(), 5_000, "every recipient once");
        for job in &jobs {
            let size = serde_json::to_vec(job).unwrap().len();
            assert!(size <= JOB_BYTES, "a job of {size} bytes ({} recipients)", job.recipients.len());
        }
        assert!(jobs.len() > LANES as usize, "long endpoints split lanes into more jobs: {}", jobs.len());
        let again = super::jobs("acme", "lobby", "ev#0", &payload, &recipients);
        assert_eq!(jobs, again, "the same frame makes the same jobs");
    }

    #[test]
    fn a_job_with_a_full_frame_fits_an_sqs_message() {
        let recipients: Vec<Recipient> = (0..JOB_RECIPIENTS)
            .map(|i| Recipient {
                connection_id: format!("L0Xw8cZnIAMCJ{i:03}="),
                endpoint: "https://abcdef1234.execute-api.eu-central-1.amazonaws.com/production".into(),
                connected_at: Utc::now(),
            })
            .collect();
        let body = "x".repeat(120 * 1024);
        let payload =
            ServerMessage::Signal { id: "s".into(), room: "lobby".into(), user_id: "u".into(), data: body.into() };
        let job = Job {
            group: "g".into(),
            id: "i".into(),
            tenant: "acme".into(),
            room: "lobby".into(),
            payload,
            recipients: jobs("acme", "lobby", "f", &ServerMessage::Pong, &recipients)
                .into_iter()
                .flat_map(|j| j.recipients)
                .collect(),
        };
        let size = serde_json::to_vec(&job).unwrap().len();
        assert!(size < 256 * 1024, "{size} bytes");
    }
}
