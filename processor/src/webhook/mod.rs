//! Webhooks: what happens in a tenant's rooms, told to its backend.
//!
//! A tenant that sets a webhook (`roomcast tenant set --webhook-url … --webhook-secret-env …`)
//! gets, at its URL, signed `POST`s of batches of [`WebhookEvent`]s:
//!
//! | type | when | id |
//! |------|------|----|
//! | `room.occupied` | a room's first user became present | the presence frame's id + `:occupied` |
//! | `room.vacated` | its last user left | the presence frame's id + `:vacated` |
//! | `member.joined` / `member.left` | a user became present in a room / stopped being (announced or not) | the presence frame's id |
//! | `connection.opened` / `connection.closed` | a connection's record was written / removed (`reason`) | the stream record's id |
//! | `message.sent` (opt-in) | a message was accepted by the tenant's rules | the stream record's id |
//! | `message.rejected` (opt-in) | the tenant's rules rejected one (`reason`) | the stream record's id |
//!
//! An event's id is the same however often its record is processed (a retry, a redelivery,
//! a replay): receivers deduplicate by it. [`events`] states a record's events purely;
//! [`sign`] is the signature and [`post`] one signed delivery, to a public address only
//! ([`guard`]). Two sinks deliver them, per tenant, in order, batched, retried with backoff, and
//! kept as dead letters when they cannot be delivered: [`sqs`] in AWS (a FIFO queue whose message
//! groups are the tenants, worked by the `webhook` function), [`local`] in `roomcast dev`.

pub mod guard;
pub mod local;
pub mod sign;
pub mod sqs;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::model::{Verdict, WebhookSettings, format_ts};
use crate::protocol::PresenceEvent;
use crate::react::{Effect, PresenceDecision};
use crate::store::StoreError;
use crate::stream::{Cause, Change, Record};

/// One event, as a tenant's endpoint receives it (in a batch: `{"events": […]}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// The same on every delivery of the same event: deduplicate by it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub tenant: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<String>,
    /// When it happened: the stream record's time (`ApproximateCreationDateTime`, to the second
    /// in AWS), RFC 3339.
    pub at: String,
    /// What else the type tells: `users` (the room's, after a member's change), `reason`,
    /// `message_id` and `message`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub data: Map<String, Value>,
}

/// Every event type.
pub const EVENT_TYPES: [&str; 8] = [
    "room.occupied",
    "room.vacated",
    "member.joined",
    "member.left",
    "connection.opened",
    "connection.closed",
    "message.sent",
    "message.rejected",
];

/// The types a webhook gets when it names none: all but the messages'.
pub const DEFAULT_EVENT_TYPES: [&str; 6] =
    ["room.occupied", "room.vacated", "member.joined", "member.left", "connection.opened", "connection.closed"];

/// One tenant's events, in order: a stream batch's, as queued for delivery.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Queued {
    pub tenant: String,
    pub events: Vec<WebhookEvent>,
    /// The stream records that made them, in order, with how many of the events each made (not
    /// sent): a queued message holds whole records' events and is named by them.
    #[serde(skip)]
    pub records: Vec<(String, usize)>,
}

/// Where a batch's events go: delivered later, never in the records' way.
#[async_trait::async_trait]
pub trait WebhookSink: Send + Sync {
    /// Takes a stream batch's events, a [`Queued`] per tenant, for delivery.
    async fn enqueue(&self, batch: Vec<Queued>) -> Result<(), StoreError>;
}

/// A stream batch's events while its records are processed (rooms at once, in any order): held
/// per record, then queued together once the batch is done, each tenant's in the batch's order
/// ([`Held::take`]). One queueing per batch, not per record: a tenant's events reach its
/// backend in as few requests as they can, and a busy tenant costs the queue one call a batch.
#[derive(Default)]
pub struct Held(std::sync::Mutex<Vec<(String, String, Vec<WebhookEvent>)>>);

impl Held {
    /// Holds `events` of `tenant`, made by the stream record `record_id`.
    pub fn hold(&self, record_id: &str, tenant: &str, events: Vec<WebhookEvent>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((record_id.into(), tenant.into(), events));
    }

    /// Takes what is held, by the records' positions in the batch (`position` of a record id;
    /// one it does not know comes last): a [`Queued`] per tenant, in the order of each tenant's
    /// first event, and the earliest of those records. Every record that made events is here,
    /// those after a record reported for redelivery too: their effects are done, and a retry
    /// would make their members' events again but not their rooms' (receivers drop the repeats
    /// by id).
    pub fn take(&self, position: impl Fn(&str) -> Option<usize>) -> (Vec<Queued>, Option<String>) {
        let mut held: Vec<(usize, usize, String, String, Vec<WebhookEvent>)> =
            std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .enumerate()
                .map(|(i, (id, tenant, events))| (position(&id).unwrap_or(usize::MAX), i, id, tenant, events))
                .collect();
        held.sort_by_key(|(at, i, ..)| (*at, *i));
        let earliest = held.first().map(|(_, _, id, ..)| id.clone());
        let mut queued: Vec<Queued> = Vec::new();
        for (_, _, record, tenant, events) in held {
            let made = (record, events.len());
            match queued.iter_mut().find(|q| q.tenant == tenant) {
                Some(q) => {
                    q.events.extend(events);
                    q.records.push(made);
                }
                None => queued.push(Queued { tenant, events, records: vec![made] }),
            }
        }
        (queued, earliest)
    }
}

/// The most bytes of one event as queued: a `message.sent` whose message would pass it carries
/// `message_truncated: true` instead of the message (the backend reads it with `history`).
pub const EVENT_BYTES: usize = 64 * 1024;

/// Keeps `event` within [`EVENT_BYTES`].
pub fn bounded(mut event: WebhookEvent) -> WebhookEvent {
    let size = serde_json::to_vec(&event).map_or(usize::MAX, |b| b.len());
    if size > EVENT_BYTES && event.data.remove("message").is_some() {
        event.data.insert("message_truncated".into(), Value::Bool(true));
    }
    event
}

/// One signed `POST` of `events` (`{"events": […]}`) to `webhook`'s URL with `http` (made by
/// [`guard::client`]); any answer but 2xx, or none within the client's timeout, is an error that
/// names the URL.
pub async fn post(
    http: &reqwest::Client,
    webhook: &WebhookSettings,
    events: &[WebhookEvent],
    allow_private: bool,
) -> Result<(), String> {
    guard::check_url(&webhook.url, allow_private)?;
    let body = serde_json::to_vec(&json!({ "events": events })).map_err(|e| e.to_string())?;
    let header = sign::signature(&webhook.secret, chrono::Utc::now().timestamp(), &body);
    let answer = http
        .post(&webhook.url)
        .header("content-type", "application/json")
        .header(sign::HEADER, header)
        .body(body)
        .send()
        .await
        .map_err(|e| format!("POST {}: {}", webhook.url, error_chain(&e)))?;
    match answer.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("POST {}: {status}", webhook.url)),
    }
}

/// An error with its causes (reqwest's own says only "error sending request").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Whether a webhook's settings can be used: its URL and secret ([`WebhookSettings::check`]), and
/// event types this processor knows.
pub fn check(webhook: &WebhookSettings) -> Result<(), String> {
    webhook.check()?;
    match webhook.events.iter().find(|e| !EVENT_TYPES.contains(&e.as_str())) {
        Some(unknown) => Err(format!("no event type is called {unknown:?}; the types are {}", EVENT_TYPES.join(", "))),
        None => Ok(()),
    }
}

/// Whether `webhook` wants events of `kind`.
pub fn wants(webhook: &WebhookSettings, kind: &str) -> bool {
    if webhook.events.is_empty() {
        DEFAULT_EVENT_TYPES.contains(&kind)
    } else {
        webhook.events.iter().any(|e| e == kind)
    }
}

/// Pure: a record's events, from its change, what it did to presence and its effects. `event_id`
/// is the stream record's id; `at` the time it is processed.
pub fn events(
    change: &Change,
    presence: Option<&PresenceDecision>,
    effects: &[Effect],
    event_id: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> Vec<WebhookEvent> {
    let at = format_ts(&at);
    let event = |kind: &str, id: String, tenant: &str, room: Option<&str>, data: Map<String, Value>| WebhookEvent {
        id,
        kind: kind.into(),
        tenant: tenant.into(),
        room: room.map(str::to_string),
        user_id: None,
        connection_id: None,
        at: at.clone(),
        data,
    };
    let data = |value: Value| match value {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    match change {
        Change::Inserted(Record::Connection(c)) => vec![WebhookEvent {
            user_id: Some(c.user_id.clone()),
            connection_id: Some(c.connection_id.clone()),
            ..event("connection.opened", event_id.into(), &c.tenant, None, Map::new())
        }],
        Change::Removed { old: Record::Connection(c), cause } => {
            let reason = match cause {
                Cause::TtlExpired => "expired".to_string(),
                Cause::Client => c.close_reason.clone().unwrap_or_else(|| "disconnect".into()),
            };
            vec![WebhookEvent {
                user_id: Some(c.user_id.clone()),
                connection_id: Some(c.connection_id.clone()),
                ..event("connection.closed", event_id.into(), &c.tenant, None, data(json!({ "reason": reason })))
            }]
        }
        Change::Inserted(Record::Membership(m))
        | Change::Modified { new: Record::Membership(m), .. }
        | Change::Removed { old: Record::Membership(m), .. } => {
            let Some(p) = presence else { return Vec::new() };
            let (member, room, empty) = match p.event {
                Some(PresenceEvent::Joined) => ("member.joined", "room.occupied", Some(1)),
                Some(PresenceEvent::Left) => ("member.left", "room.vacated", Some(0)),
                None => return Vec::new(),
            };
            let users = data(json!({ "users": p.users }));
            let mut out = vec![WebhookEvent {
                user_id: Some(m.user_id.clone()),
                ..event(member, p.id.clone(), &m.tenant, Some(&m.room), users)
            }];
            // A redelivered transition's count is the room's now, not at the transition: it
            // cannot tell whether the room began or ended then, so it says nothing of the room.
            if p.users == empty && !p.redelivered {
                let id = format!("{}:{}", p.id, room.trim_start_matches("room."));
                let room = event(room, id, &m.tenant, Some(&m.room), Map::new());
                // A room's start comes before its first member's event, its end after its last's.
                match p.event {
                    Some(PresenceEvent::Joined) => out.insert(0, room),
                    _ => out.push(room),
                }
            }
            out
        }
        Change::Inserted(Record::Message(m)) => {
            let rejected = effects.iter().find_map(|e| match e {
                Effect::MarkMessage { verdict: Verdict::Rejected(reason), .. } => Some(reason.clone()),
                _ => None,
            });
            let rewritten = effects.iter().find_map(|e| match e {
                Effect::MarkMessage { verdict: Verdict::Rewritten(body), .. } => Some(body.clone()),
                _ => None,
            });
            let (kind, extra) = match rejected {
                Some(reason) => ("message.rejected", json!({ "message_id": m.id, "reason": reason })),
                None => (
                    "message.sent",
                    json!({ "message_id": m.id, "message": rewritten.unwrap_or_else(|| m.body.clone()) }),
                ),
            };
            vec![WebhookEvent {
                user_id: Some(m.user_id.clone()),
                ..event(kind, event_id.into(), &m.tenant, Some(&m.room), data(extra))
            }]
        }
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::tests::{conn, member, t};

    fn decision(event: PresenceEvent, users: u64) -> PresenceDecision {
        PresenceDecision {
            event: Some(event),
            id: "ev-9".into(),
            users: Some(users),
            connections: 0,
            redelivered: false,
            announce: false,
            version: 3,
        }
    }

    fn kinds(events: &[WebhookEvent]) -> Vec<(&str, &str)> {
        events.iter().map(|e| (e.kind.as_str(), e.id.as_str())).collect()
    }

    #[test]
    fn a_rooms_first_and_last_member_open_and_close_it_with_the_presence_frames_id() {
        let ann = Change::Inserted(Record::Membership(member("c1", "ann", 0)));
        let first = events(&ann, Some(&decision(PresenceEvent::Joined, 1)), &[], "rec-1", t(0));
        assert_eq!(kinds(&first), vec![("room.occupied", "ev-9:occupied"), ("member.joined", "ev-9")]);
        assert_eq!(first[1].data["users"], 1);
        let second = events(&ann, Some(&decision(PresenceEvent::Joined, 2)), &[], "rec-1", t(0));
        assert_eq!(kinds(&second), vec![("member.joined", "ev-9")], "announced or not, one event");
        let gone = Change::Removed { old: Record::Membership(member("c1", "ann", 0)), cause: Cause::TtlExpired };
        let last = events(&gone, Some(&decision(PresenceEvent::Left, 0)), &[], "rec-2", t(0));
        assert_eq!(kinds(&last), vec![("member.left", "ev-9"), ("room.vacated", "ev-9:vacated")]);
        // A membership record that changed no presence tells nothing.
        assert!(events(&ann, None, &[], "rec-1", t(0)).is_empty());
        // Redelivered: the member's event again (same id), never a room's.
        let again = PresenceDecision { redelivered: true, ..decision(PresenceEvent::Joined, 1) };
        assert_eq!(kinds(&events(&ann, Some(&again), &[], "rec-1", t(0))), vec![("member.joined", "ev-9")]);
    }

    #[test]
    fn connections_and_messages_carry_the_records_id_and_what_happened() {
        let c = conn("c1", "ann", &["general"], 0);
        let expired = Change::Removed { old: Record::Connection(c.clone()), cause: Cause::TtlExpired };
        let closed = events(&expired, None, &[], "rec-3", t(0));
        assert_eq!(kinds(&closed), vec![("connection.closed", "rec-3")]);
        assert_eq!((closed[0].data["reason"].as_str(), closed[0].user_id.as_deref()), (Some("expired"), Some("ann")));

        let message = crate::model::Message::new(&c, "general", "buy spam".into(), t(0), 60);
        let inserted = Change::Inserted(Record::Message(message.clone()));
        let sent = events(&inserted, None, &[], "rec-4", t(0));
        assert_eq!(kinds(&sent), vec![("message.sent", "rec-4")]);
        assert_eq!(sent[0].data["message"], "buy spam");
        let mark = Effect::MarkMessage {
            tenant: "acme".into(),
            room: "general".into(),
            sk: message.sk.clone(),
            verdict: Verdict::Rejected("spam".into()),
        };
        let rejected = events(&inserted, None, &[mark], "rec-4", t(0));
        assert_eq!(kinds(&rejected), vec![("message.rejected", "rec-4")]);
        assert_eq!(
            (rejected[0].data["reason"].as_str(), rejected[0].data["message_id"].as_str()),
            (Some("spam"), Some(message.id.as_str()))
        );
    }

    #[test]
    fn a_batchs_events_are_queued_per_tenant_in_the_batchs_order() {
        let event = |id: &str| WebhookEvent {
            id: id.into(),
            kind: "member.joined".into(),
            tenant: String::new(),
            room: None,
            user_id: None,
            connection_id: None,
            at: String::new(),
            data: Map::new(),
        };
        let held = Held::default();
        // Rooms run at once: records are held in any order.
        held.hold("r3", "acme", vec![event("e3")]);
        held.hold("r0", "globex", vec![event("e0")]);
        held.hold("r1", "acme", vec![event("e1a"), event("e1b")]);
        held.hold("r4", "acme", vec![event("e4")]);
        let position = |id: &str| id[1..].parse().ok();
        let ids = |q: &Queued| q.events.iter().map(|e| e.id.clone()).collect::<Vec<_>>();
        let (queued, earliest) = held.take(position);
        assert_eq!(earliest.as_deref(), Some("r0"));
        assert_eq!(queued.iter().map(|q| q.tenant.as_str()).collect::<Vec<_>>(), vec!["globex", "acme"]);
        assert_eq!(ids(&queued[1]), vec!["e1a", "e1b", "e3", "e4"], "in the batch's order, not the processing's");
        let records: Vec<(&str, usize)> = queued[1].records.iter().map(|(r, n)| (r.as_str(), *n)).collect();
        assert_eq!(records, vec![("r1", 2), ("r3", 1), ("r4", 1)]);
        assert!(held.take(position).0.is_empty(), "taken once");
    }

    #[test]
    fn a_webhook_gets_what_it_names_or_all_but_the_messages() {
        let mut webhook = WebhookSettings {
            url: "https://example.com/hook".into(),
            secret: "0123456789abcdef".into(),
            events: Vec::new(),
        };
        assert!(wants(&webhook, "room.vacated") && !wants(&webhook, "message.sent"));
        webhook.events = vec!["message.rejected".into()];
        assert!(wants(&webhook, "message.rejected") && !wants(&webhook, "room.vacated"));
        assert_eq!(check(&webhook), Ok(()));
        webhook.events = vec!["room.emptied".into()];
        assert!(check(&webhook).unwrap_err().contains("no event type"));
        webhook.events.clear();
        webhook.secret = "short".into();
        assert!(check(&webhook).is_err());
        webhook.secret = "0123456789abcdef".into();
        webhook.url = "ftp://example.com".into();
        assert!(check(&webhook).is_err());
    }
}
