//! Messages and signals, their ids and sort keys, and what a tenant's rules made of one.

use super::*;

/// A chat message, kept for history until its TTL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    /// Empty: messages are not indexed (nothing reads messages by user; an index entry was a second
    /// write of every message). Messages written before still carry `TENANT#…#USER#…` here.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gsi1pk: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub gsi1sk: String,
    pub id: String,
    pub tenant: String,
    /// The room it was sent to (a copy kept in another room's history says the same, as its
    /// members got it).
    pub room: String,
    pub user_id: String,
    pub sender_connection_id: String,
    pub body: String,
    #[serde(with = "ts_format")]
    pub timestamp: DateTime<Utc>,
    pub ttl: i64,
    /// Set by the processor when the tenant's rules rejected it: history never lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
    /// Set by the processor when the tenant's rules rewrote it: what members got, and history gives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_body: Option<String>,
    /// The users a tenant's rules sent it to, when they chose some (a direct message; the
    /// sender sees it too): `history` and `recover` give it to them only, as it was delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub only_users: Option<Vec<String>>,
    /// Set on the copy the processor keeps in a room the tenant's rules routed the message into
    /// (`extra-rooms`): under that room's key, so its history and recovery give what its members
    /// were sent. The stream's INSERT of a copy is nothing to react to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_in: Option<String>,
}

impl Message {
    pub fn new(sender: &Connection, room: &str, body: String, now: DateTime<Utc>, ttl_seconds: i64) -> Message {
        Message::from(&sender.tenant, room, &sender.user_id, &sender.connection_id, body, now, ttl_seconds)
    }

    /// A message from a backend (`publish`): no connection sent it (`senderConnectionId` is
    /// empty), so it reaches every member of the room.
    pub fn published(tenant: &str, room: &str, user_id: &str, body: String, now: DateTime<Utc>, ttl: i64) -> Message {
        Message::from(tenant, room, user_id, "", body, now, ttl)
    }

    fn from(
        tenant: &str,
        room: &str,
        user_id: &str,
        sender_connection_id: &str,
        body: String,
        now: DateTime<Utc>,
        ttl_seconds: i64,
    ) -> Message {
        let id = message_id_at(now);
        Message {
            pk: room_pk(tenant, room),
            sk: message_sk(&now, &id),
            record_type: "message".into(),
            gsi1pk: String::new(),
            gsi1sk: String::new(),
            id,
            tenant: tenant.to_string(),
            room: room.to_string(),
            user_id: user_id.to_string(),
            sender_connection_id: sender_connection_id.to_string(),
            body,
            timestamp: now,
            ttl: expiry(now, ttl_seconds),
            rejected: None,
            delivered_body: None,
            only_users: None,
            kept_in: None,
        }
    }

    /// The copy of this message, as delivered, kept in `room`'s history (a room the tenant's rules
    /// routed it into): the same sort key and id, the delivered body and audience, not indexed.
    pub fn kept_copy(&self, room: &str, delivered_body: Option<String>, only_users: Option<Vec<String>>) -> Message {
        Message {
            pk: room_pk(&self.tenant, room),
            gsi1pk: String::new(),
            gsi1sk: String::new(),
            delivered_body,
            only_users,
            kept_in: Some(room.to_string()),
            ..self.clone()
        }
    }

    /// Whether `history` and `recover` give this message to `viewer` (`None`: anyone): a direct
    /// message only to the users it was sent to, and to its sender.
    pub fn visible_to(&self, viewer: Option<&str>) -> bool {
        match (viewer, &self.only_users) {
            (None, _) | (_, None) => true,
            (Some(user), Some(users)) => user == self.user_id || users.iter().any(|u| u == user),
        }
    }
}

/// An ephemeral event (typing, a cursor): delivered to the room like a message, never listed
/// by history, gone within a minute (its TTL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Signal {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub id: String,
    pub tenant: String,
    pub room: String,
    pub user_id: String,
    pub sender_connection_id: String,
    /// The client's `data`, as JSON text.
    pub data: String,
    #[serde(with = "ts_format")]
    pub timestamp: DateTime<Utc>,
    pub ttl: i64,
}

/// How long a signal's record lives: it is delivered from its INSERT, never read again.
pub const SIGNAL_TTL_SECONDS: i64 = 60;

impl Signal {
    pub fn new(sender: &Connection, room: &str, data: String, now: DateTime<Utc>) -> Signal {
        let id = message_id_at(now);
        Signal {
            pk: room_pk(&sender.tenant, room),
            sk: format!("SIG#{id}"),
            record_type: "signal".into(),
            id,
            tenant: sender.tenant.clone(),
            room: room.to_string(),
            user_id: sender.user_id.clone(),
            sender_connection_id: sender.connection_id.clone(),
            data,
            timestamp: now,
            ttl: expiry(now, SIGNAL_TTL_SECONDS),
        }
    }
}

/// A backend's message to one user, in whatever rooms they are (`send_to_user`): every
/// connection the user had when it was written gets it once, as a `user_message` frame. The
/// write path resolves the connections (one `Query` of the user's index key) and names them
/// here, so the processor reads nothing to deliver it, and a replay sends to the same ones.
/// Never listed by history; gone within minutes (its TTL).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserMessage {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub id: String,
    pub tenant: String,
    /// Who it is to.
    pub user_id: String,
    /// Who the backend says it is from.
    pub from: String,
    pub body: String,
    pub recipients: Vec<UserRecipient>,
    #[serde(with = "ts_format")]
    pub timestamp: DateTime<Utc>,
    pub ttl: i64,
}

/// One of the user's connections, as delivery needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserRecipient {
    pub connection_id: String,
    pub endpoint: String,
    #[serde(with = "ts_format")]
    pub connected_at: DateTime<Utc>,
}

/// How long a message to a user is kept: it is delivered from its INSERT, never read again.
pub const USER_MESSAGE_TTL_SECONDS: i64 = 300;

/// The most connections one message to a user names (a user with more gets it on the first
/// this many, by connection id; the answer says how many were found).
pub const MAX_USER_MESSAGE_RECIPIENTS: usize = 1_000;

impl UserMessage {
    pub fn new(tenant: &str, user_id: &str, from: &str, body: String, to: &[Connection], now: DateTime<Utc>) -> Self {
        let id = message_id_at(now);
        let mut recipients: Vec<UserRecipient> = to
            .iter()
            .map(|c| UserRecipient {
                connection_id: c.connection_id.clone(),
                endpoint: c.endpoint.clone(),
                connected_at: c.connected_at,
            })
            .collect();
        recipients.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        recipients.dedup_by(|a, b| a.connection_id == b.connection_id);
        recipients.truncate(MAX_USER_MESSAGE_RECIPIENTS);
        UserMessage {
            pk: user_message_pk(tenant, user_id),
            sk: format!("MSG#{id}"),
            record_type: "user-message".into(),
            id,
            tenant: tenant.to_string(),
            user_id: user_id.to_string(),
            from: from.to_string(),
            body,
            recipients,
            timestamp: now,
            ttl: expiry(now, USER_MESSAGE_TTL_SECONDS),
        }
    }
}

/// A message id: a UUID v7 whose millisecond is the message's own time (its sort key's), with a
/// counter that keeps this process's messages of one millisecond in order. So an id alone gives
/// the message's sort key ([`message_sk_of_id`]): a client's last-seen id is a history cursor.
pub fn message_id_at(at: DateTime<Utc>) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let ms = u64::try_from(at.timestamp_millis()).unwrap_or(0);
    let counter = u128::from(COUNTER.fetch_add(1, Ordering::Relaxed) & ((1 << 42) - 1));
    let ts = uuid::Timestamp::from_unix_time(ms / 1000, ((ms % 1000) * 1_000_000) as u32, counter, 42);
    uuid::Uuid::new_v7(ts).to_string()
}

/// The sort key of the message with this id, if the id is a UUID v7 (ids of messages written
/// before ids carried their message's time give a key that finds nothing).
pub fn message_sk_of_id(id: &str) -> Option<String> {
    let uuid = uuid::Uuid::parse_str(id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = uuid.get_timestamp()?.to_unix();
    let at = Utc.timestamp_opt(i64::try_from(secs).ok()?, nanos).single()?;
    Some(message_sk(&at, &uuid.hyphenated().to_string()))
}

/// What a tenant's rules made of a message, as history keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Rejected(String),
    Rewritten(String),
    /// Sent only to these users (a direct message): history gives it to them and the sender only.
    Audience(Vec<String>),
}
