//! Webhooks as AWS runs them: the processor queues each record's events on an SQS FIFO queue
//! ([`SqsWebhooks`]) and the `webhook` function delivers them ([`Deliveries`]).
//!
//! Why SQS and a function, not EventBridge API destinations: a destination is one URL and one
//! connection (credentials) made ahead of time, so each tenant would need its own pair created by
//! the operator, and EventBridge signs nothing with a per-tenant secret nor batches; its retries
//! last up to 24 hours but cannot be paced per tenant. A FIFO queue whose message groups are the
//! tenants gives what the feature needs with one queue:
//!
//! * **Order and isolation.** A group's messages are delivered in order, one batch at a time;
//!   while a tenant's batch waits for its retry, its group waits, and every other group (tenant)
//!   goes on. The function posts the tenants of one invocation concurrently, each bounded by the
//!   request timeout.
//! * **Batching.** A stream batch's events of one tenant are one message (up to
//!   [`super::local::MAX_BATCH`] events and 200 KiB; more make more), all of a batch's tenants
//!   queued in one `SendMessageBatch` of up to ten; the function posts each message as one
//!   request.
//! * **Retries with backoff.** A refused delivery's messages are reported in `batchItemFailures`;
//!   the first one's visibility is set to the backoff for its receive count ([`backoff`]:
//!   `ROOMCAST_WEBHOOK_RETRY_SECONDS`, doubling, up to five minutes) and the others wait behind
//!   it in their group; after the
//!   queue's `maxReceiveCount` receives (in `template.yaml`, ten: about 30 minutes of retries),
//!   SQS moves them to the dead-letter queue, which an operator re-drives
//!   (`roomcast webhooks redrive`, or the console's "Start DLQ redrive").
//! * **No duplicates from redelivery.** A message's deduplication id is a digest of the stream
//!   records that made its events, so a batch processed twice within five minutes queues its
//!   events once; a batch retried
//!   in part queues the records from the retried one on only (what came before was queued), and
//!   receivers deduplicate by the events' ids whatever else happens.
//! * **What can never succeed is not retried.** A URL the tenant set that is not a public address
//!   (or not a URL) is logged and its events given up on at once (`webhook_dead`), not retried for
//!   half an hour into the shared dead-letter queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::sqs::{SqsBatchResponse, SqsEvent, SqsMessage};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::types::SendMessageBatchRequestEntry;

use super::{Queued, WebhookEvent, WebhookSink};
use crate::deliver::stage::sqs::{BATCH_BYTES, BATCH_ENTRIES, fit};
use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// A queued message's body at most: under SQS's 256 KiB with room for the batch's other entries.
const MESSAGE_BYTES: usize = 200 * 1024;

/// The longest backoff between deliveries of one tenant's batch.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long a batch received `receive_count` times waits before its next delivery: `first`,
/// doubling each time, up to [`MAX_BACKOFF`].
pub fn backoff(first: Duration, receive_count: u32) -> Duration {
    let doublings = receive_count.saturating_sub(1).min(16);
    (first * 2u32.pow(doublings)).min(MAX_BACKOFF)
}

/// The processor's webhook sink in AWS: each record's events on the FIFO queue, in the tenant's
/// message group.
pub struct SqsWebhooks {
    client: Client,
    queue_url: String,
}

impl SqsWebhooks {
    pub fn new(client: Client, queue_url: impl Into<String>) -> SqsWebhooks {
        SqsWebhooks { client, queue_url: queue_url.into() }
    }
}

/// A tenant's events as message bodies of at most [`MESSAGE_BYTES`] and
/// [`super::local::MAX_BATCH`] events (each event is at most [`super::EVENT_BYTES`]), in order,
/// cut only between records (a record's few events stay together), each with its deduplication
/// id: a digest of the stream records whose events it holds. The same records processed again
/// within SQS's five minutes (a redelivered batch) name the same message and queue nothing
/// twice; a part that holds other records (fewer events moved the cut) has another name, so an
/// event may be queued twice — receivers drop it by id — but never dropped as a repeat.
fn parts(queued: &Queued) -> Result<Vec<(String, String)>, StoreError> {
    let encode = |records: &[&str], events: &[WebhookEvent]| -> Result<(String, String), StoreError> {
        let dedup = format!("{}:{:016x}", queued.tenant, crate::deliver::stage::fnv1a(&records.join("\n")));
        let body = serde_json::to_string(&Queued {
            tenant: queued.tenant.clone(),
            events: events.to_vec(),
            records: Vec::new(),
        })
        .map_err(|e| StoreError::Unavailable(format!("webhook events: {e}")))?;
        Ok((dedup, body))
    };
    // The events by record; events no record names (a re-drive's) are one record of their own.
    let named: usize = queued.records.iter().map(|(_, n)| n).sum();
    let mut records: Vec<(&str, usize)> = queued.records.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    if named < queued.events.len() {
        records.push(("", queued.events.len() - named));
    }
    let mut out = Vec::new();
    let (mut part, mut part_records, mut bytes) = (Vec::new(), Vec::new(), 0);
    let mut next = 0;
    for (record, count) in records {
        let count = count.min(queued.events.len() - next);
        let made = &queued.events[next..next + count];
        next += count;
        let size: usize = made.iter().map(|e| serde_json::to_vec(e).map_or(0, |b| b.len()) + 1).sum();
        if !part.is_empty() && (bytes + size > MESSAGE_BYTES || part.len() + made.len() > super::local::MAX_BATCH) {
            out.push(encode(&part_records, &part)?);
            part.clear();
            part_records.clear();
            bytes = 0;
        }
        bytes += size;
        part.extend_from_slice(made);
        part_records.push(record);
    }
    if !part.is_empty() {
        out.push(encode(&part_records, &part)?);
    }
    Ok(out)
}

impl SqsWebhooks {
    /// One `SendMessageBatch`, whole or an error (the batch is processed again, and what SQS
    /// took is dropped as a repeat).
    async fn send(&self, entries: Vec<SendMessageBatchRequestEntry>) -> Result<(), StoreError> {
        let count = entries.len();
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.queue_url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| {
            StoreError::Unavailable(format!("sqs send_message_batch (webhooks): {}", DisplayErrorContext(&e)))
        })?;
        match out.failed.first() {
            None => Ok(()),
            Some(failed) => Err(StoreError::Unavailable(format!(
                "sqs send_message_batch (webhooks): {} of {count} refused, first {}: {}",
                out.failed.len(),
                failed.code,
                failed.message.as_deref().unwrap_or("")
            ))),
        }
    }
}

#[async_trait::async_trait]
impl WebhookSink for SqsWebhooks {
    /// A stream batch's events: each tenant's as few messages as fit, sent ten (and at most
    /// 256 KiB) a request, in order (SQS keeps a request's entries of one group in order).
    async fn enqueue(&self, batch: Vec<Queued>) -> Result<(), StoreError> {
        let mut entries: Vec<SendMessageBatchRequestEntry> = Vec::new();
        let mut bytes = 0;
        for queued in &batch {
            for (dedup, body) in parts(queued)? {
                if entries.len() == BATCH_ENTRIES || (!entries.is_empty() && bytes + body.len() > BATCH_BYTES) {
                    self.send(std::mem::take(&mut entries)).await?;
                    bytes = 0;
                }
                bytes += body.len();
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(entries.len().to_string())
                    .message_body(body)
                    .message_group_id(fit(&queued.tenant))
                    .message_deduplication_id(fit(&dedup))
                    .build()
                    .map_err(|e| StoreError::Unavailable(format!("sqs entry: {e}")))?;
                entries.push(entry);
            }
        }
        if !entries.is_empty() {
            self.send(entries).await?;
        }
        Ok(())
    }
}

/// The `webhook` function's work: one invocation's messages, delivered per tenant.
pub struct Deliveries {
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    /// The queue's client and URL, to set a refused batch's backoff.
    pub sqs: Client,
    pub queue_url: String,
    /// The first backoff (`ROOMCAST_WEBHOOK_RETRY_SECONDS`).
    pub first_backoff: Duration,
    /// Whether loopback and private addresses may be posted to (`ROOMCAST_WEBHOOK_ALLOW_PRIVATE`).
    pub allow_private: bool,
    pub metrics: Arc<Metrics>,
}

/// One received message, decoded.
struct Received<'a> {
    message: &'a SqsMessage,
    receive_count: u32,
    events: Vec<WebhookEvent>,
}

impl Deliveries {
    /// Delivers an invocation's messages: each tenant's in order, the tenants at once, all by
    /// `finish_by` (a second before the invocation's deadline). The messages of a tenant whose
    /// endpoint refused are reported, with their next delivery put off by [`backoff`]; so are
    /// those of a tenant still being delivered at `finish_by` (a stalled table or queue call), so
    /// that the invocation answers and the other tenants' deliveries stand. A message that is
    /// not events is logged and dropped.
    pub async fn handle(&self, event: &SqsEvent, finish_by: Option<std::time::Instant>) -> SqsBatchResponse {
        let mut tenants: Vec<(String, Vec<Received<'_>>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for message in &event.records {
            let id = message.message_id.as_deref().unwrap_or_default();
            let queued: Queued = match message.body.as_deref().map(serde_json::from_str) {
                Some(Ok(queued)) => queued,
                other => {
                    let error = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "no body".into(),
                    };
                    Metrics::add(&self.metrics.webhook_dropped, 1);
                    tracing::error!(message_id = %id, %error, "a message on the webhook queue is not events: dropped");
                    continue;
                }
            };
            let receive_count =
                message.attributes.get("ApproximateReceiveCount").and_then(|c| c.parse().ok()).unwrap_or(1);
            let at = *index.entry(queued.tenant.clone()).or_insert_with(|| {
                tenants.push((queued.tenant.clone(), Vec::new()));
                tenants.len() - 1
            });
            tenants[at].1.push(Received { message, receive_count, events: queued.events });
        }
        let failed = futures::future::join_all(tenants.iter().map(|(tenant, received)| {
            let span = tracing::info_span!("webhook", tenant = %tenant, messages = received.len());
            async move {
                // How many of the tenant's messages were delivered: at the deadline, the rest
                // are reported, not what was already posted.
                let done = std::sync::atomic::AtomicUsize::new(0);
                let delivery = tracing::Instrument::instrument(self.deliver(tenant, received, &done), span);
                let Some(at) = finish_by else { return delivery.await };
                match tokio::time::timeout_at(at.into(), delivery).await {
                    Ok(failed) => failed,
                    Err(_) => {
                        let from = done.load(std::sync::atomic::Ordering::SeqCst).min(received.len());
                        tracing::warn!(tenant = %tenant, delivered = from, "still delivering at the deadline: the rest reported");
                        Metrics::add(&self.metrics.webhook_retried, 1);
                        received[from..].iter().map(|r| r.message.message_id.clone().unwrap_or_default()).collect()
                    }
                }
            }
        }))
        .await;
        crate::deliver::stage::sqs::reported(failed.into_iter().flatten())
    }

    /// One tenant's messages, in order, in requests of up to `MAX_BATCH` events; from the first
    /// refused request on, every message is reported (a later one must not overtake it). The ids
    /// reported.
    async fn deliver(
        &self,
        tenant: &str,
        received: &[Received<'_>],
        done: &std::sync::atomic::AtomicUsize,
    ) -> Vec<String> {
        let everything = || received.iter().map(|r| r.message.message_id.clone().unwrap_or_default()).collect();
        let webhook = match self.store.tenant_settings(tenant).await {
            Ok(settings) => settings.and_then(|s| s.webhook),
            Err(e) => {
                tracing::warn!(error = %e, "the tenant's settings could not be read: retried");
                self.put_off(&received.iter().collect::<Vec<_>>()).await;
                return everything();
            }
        };
        let Some(webhook) = webhook else {
            let events: usize = received.iter().map(|r| r.events.len()).sum();
            tracing::info!(events, "the tenant has no webhook now: its events are dropped");
            return Vec::new();
        };
        // A URL that can never be posted to: given up on now, not after half an hour of retries.
        if let Err(why) = super::guard::check_url(&webhook.url, self.allow_private) {
            let events: usize = received.iter().map(|r| r.events.len()).sum();
            Metrics::add(&self.metrics.webhook_dead, events as u64);
            tracing::error!(events, error = %why, "the tenant's webhook URL is refused: its events are given up on");
            return Vec::new();
        }
        let mut start = 0;
        while start < received.len() {
            let mut end = start;
            let mut events: Vec<WebhookEvent> = Vec::new();
            while end < received.len()
                && (events.is_empty() || events.len() + received[end].events.len() <= super::local::MAX_BATCH)
            {
                events.extend(received[end].events.iter().cloned());
                end += 1;
            }
            match super::post(&self.http, &webhook, &events, self.allow_private).await {
                Ok(()) => {
                    Metrics::add(&self.metrics.webhook_delivered, events.len() as u64);
                    tracing::debug!(events = events.len(), "webhook delivered");
                    start = end;
                    done.store(end, std::sync::atomic::Ordering::SeqCst);
                }
                Err(error) => {
                    let rest: Vec<&Received<'_>> = received[start..].iter().collect();
                    let attempts = rest[0].receive_count;
                    let retry_in = backoff(self.first_backoff, attempts);
                    tracing::warn!(%error, attempts, retry_in_s = retry_in.as_secs(), messages = rest.len(), "webhook refused: retried");
                    Metrics::add(&self.metrics.webhook_retried, 1);
                    self.put_off(&rest).await;
                    return rest.iter().map(|r| r.message.message_id.clone().unwrap_or_default()).collect();
                }
            }
        }
        Vec::new()
    }

    /// Puts off the next delivery of `received` (a tenant's, in order): the first message by the
    /// backoff of its receive count, the later ones not at all. While the first is in flight (not
    /// visible), SQS returns no other message of its group, so the later ones wait behind it and
    /// come back with it, in order. (Had each its own timeout, they would become visible one by
    /// one, and a receiver could meet a later one first.) A failure to set a timeout is only
    /// logged: the message comes back after the queue's visibility timeout instead.
    async fn put_off(&self, received: &[&Received<'_>]) {
        let Some(first) = received.first() else { return };
        let wait = backoff(self.first_backoff, first.receive_count);
        // The first before the others: its group is never without a message in flight.
        for (i, r) in received.iter().enumerate() {
            let Some(handle) = r.message.receipt_handle.as_deref() else { continue };
            let seconds = if i == 0 { wait.as_secs() as i32 } else { 0 };
            let changed = self
                .sqs
                .change_message_visibility()
                .queue_url(&self.queue_url)
                .receipt_handle(handle)
                .visibility_timeout(seconds)
                .send()
                .await;
            if let Err(e) = changed {
                tracing::warn!(error = %DisplayErrorContext(&e), "the webhook's backoff could not be set");
            }
        }
    }
}

/// Moves every message of the webhook dead-letter queue `from` back to the webhook queue `to`
/// (`roomcast webhooks redrive`), in each tenant's order and in its tenant's group; the webhook
/// function then delivers them to the tenant's URL as it is now. Each is sent again before it is
/// deleted, so a failure part-way repeats a message rather than losing one (receivers
/// deduplicate by the events' ids). The messages moved.
pub async fn redrive(client: &Client, from: &str, to: &str) -> Result<usize, String> {
    let mut moved = 0;
    loop {
        let received = client
            .receive_message()
            .queue_url(from)
            .max_number_of_messages(10)
            .visibility_timeout(60)
            .send()
            .await
            .map_err(|e| format!("receive from {from}: {}", DisplayErrorContext(&e)))?;
        let messages = received.messages.unwrap_or_default();
        if messages.is_empty() {
            return Ok(moved);
        }
        for message in messages {
            let body = message.body.clone().unwrap_or_default();
            let queued: Queued = serde_json::from_str(&body)
                .map_err(|e| format!("message {:?} on {from} is not webhook events: {e}", message.message_id))?;
            let id = message.message_id.clone().unwrap_or_default();
            client
                .send_message()
                .queue_url(to)
                .message_body(body)
                .message_group_id(fit(&queued.tenant))
                .message_deduplication_id(fit(&format!("redrive-{id}")))
                .send()
                .await
                .map_err(|e| format!("send to {to}: {}", DisplayErrorContext(&e)))?;
            if let Some(handle) = message.receipt_handle.as_deref() {
                client
                    .delete_message()
                    .queue_url(from)
                    .receipt_handle(handle)
                    .send()
                    .await
                    .map_err(|e| format!("delete from {from}: {}", DisplayErrorContext(&e)))?;
            }
            moved += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_first_up_to_five_minutes() {
        let first = Duration::from_secs(10);
        let waits: Vec<u64> = (1..=10).map(|n| backoff(first, n).as_secs()).collect();
        assert_eq!(waits, vec![10, 20, 40, 80, 160, 300, 300, 300, 300, 300]);
        // Ten receives in template.yaml, each refusal followed by its wait: at least ten minutes
        // of retries before the dead letters (1,810 s).
        assert_eq!(waits.iter().sum::<u64>(), 1810);
        assert_eq!(backoff(first, 0), first);
        assert_eq!(backoff(first, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_tenants_events_are_parts_under_sqs_size_in_order_each_named_by_its_events() {
        let event = |i: usize, bytes: usize| WebhookEvent {
            id: format!("ev-{i}"),
            kind: "message.sent".into(),
            tenant: "acme".into(),
            room: Some("general".into()),
            user_id: None,
            connection_id: None,
            at: "2026-12-07T00:00:00Z".into(),
            data: [("message".to_string(), serde_json::Value::String("x".repeat(bytes)))].into_iter().collect(),
        };
        let queued = |events: Vec<WebhookEvent>| {
            let records = events.iter().map(|e| (format!("record-of-{}", e.id), 1)).collect();
            Queued { tenant: "acme".into(), events, records }
        };
        let small = parts(&queued(vec![event(0, 10), event(1, 10)])).unwrap();
        assert_eq!(small.len(), 1);
        // The same records, the same deduplication id, even with fewer events (a redelivered
        // transition makes no room event); other records, another.
        let two =
            Queued { tenant: "acme".into(), events: vec![event(0, 10), event(1, 10)], records: vec![("r0".into(), 2)] };
        let fewer = Queued { events: vec![event(1, 10)], records: vec![("r0".into(), 1)], ..two.clone() };
        assert_eq!(parts(&two).unwrap()[0].0, parts(&fewer).unwrap()[0].0);
        assert_ne!(small[0].0, parts(&queued(vec![event(1, 10)])).unwrap()[0].0);
        // A record's events are never cut apart: three of 40 KiB together.
        let whole = Queued {
            tenant: "acme".into(),
            events: (0..6).map(|i| event(i, 40 * 1024)).collect(),
            records: vec![("r0".into(), 3), ("r1".into(), 3)],
        };
        let cut: Vec<Queued> = parts(&whole).unwrap().iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect();
        assert_eq!(cut.iter().map(|q| q.events.len()).collect::<Vec<_>>(), vec![3, 3]);
        let big = parts(&queued((0..8).map(|i| event(i, 60 * 1024)).collect())).unwrap();
        assert!(big.len() >= 3, "{}", big.len());
        assert!(big.iter().all(|(_, body)| body.len() <= MESSAGE_BYTES + 1024));
        let many = parts(&queued((0..250).map(|i| event(i, 10)).collect())).unwrap();
        assert_eq!(many.len(), 3, "at most MAX_BATCH events a message");
        for split in [big, many] {
            let back: Vec<Queued> = split.iter().map(|(_, b)| serde_json::from_str(b).unwrap()).collect();
            let ids: Vec<String> = back.iter().flat_map(|q| q.events.iter().map(|e| e.id.clone())).collect();
            let n = ids.len();
            assert_eq!(ids, (0..n).map(|i| format!("ev-{i}")).collect::<Vec<_>>(), "nothing lost, in order");
        }
    }
}
