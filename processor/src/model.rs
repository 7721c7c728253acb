//! The single table's records and keys (docs/ARCHITECTURE.md, "The table").
//!
//! | record     | pk                      | sk                          |
//! |------------|-------------------------|-----------------------------|
//! | connection | `CONN#{connectionId}`   | `META`                      |
//! | membership | `ROOM#{tenant}#{room}`  | `CONN#{connectionId}`       |
//! | message    | `ROOM#{tenant}#{room}`  | `MSG#{timestamp}#{id}`      |
//! | signal     | `ROOM#{tenant}#{room}`  | `SIG#{id}`                  |
//! | presence   | `PRESENCE#{tenant}#{room}` | `USER#{userId}`          |
//! | room count | `PRESENCE#{tenant}#{room}` | `PRESENCE`               |
//! | roster     | `ROSTER#{tenant}#{room}`| `VERSION`                   |
//! | settings   | `TENANT#{tenant}`       | `SETTINGS`                  |
//!
//! The processor alone writes presence and room counts ([`crate::presence`]); handlers read them
//! for `who` and the `join` ack.
//!
//! Room keys carry the tenant, so two tenants' rooms of the same name never meet. Tenant and room
//! names are validated ([`Name`]) so that `#` can never appear inside a key component.
//! Attribute names are camelCase; every record also carries `type` for people reading the table.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

/// A tenant or room name: 1–64 of `A-Z a-z 0-9 _ - . :`. Never contains the key separator `#`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub const MAX_LEN: usize = 64;

    pub fn parse(what: &str, value: &str) -> Result<Name, String> {
        if value.is_empty() || value.len() > Self::MAX_LEN {
            return Err(format!("{what} must be 1 to {} characters, got {}", Self::MAX_LEN, value.len()));
        }
        if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))) {
            return Err(format!("{what} {value:?} contains {bad:?}; allowed are letters, digits and _ - . :"));
        }
        Ok(Name(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

pub const CONNECTION_SK: &str = "META";
pub const STATUS_CONNECTED: &str = "CONNECTED";

pub fn connection_pk(connection_id: &str) -> String {
    format!("CONN#{connection_id}")
}

pub fn room_pk(tenant: &str, room: &str) -> String {
    format!("ROOM#{tenant}#{room}")
}

/// The roster version: one small item per room, its `v` bumped by every write that adds, removes
/// or changes a membership of the room (not by a TTL refresh). A processor container that read the
/// room's members at version `v` may serve them again while `v` stands (see
/// `roomcast_core::roster`). On its own partition key, so that a join storm's bumps do not share
/// the room partition's write units with the memberships themselves.
pub fn roster_pk(tenant: &str, room: &str) -> String {
    format!("ROSTER#{tenant}#{room}")
}

pub const ROSTER_VERSION_SK: &str = "VERSION";

/// The sweeper's index spreads connections over this many keys (each key's index partition then
/// takes a sixteenth of the connects and pings).
pub const SWEEP_SHARDS: u32 = 16;

/// The `sweep` index key of a connection: `SWEEP#{shard}`, the shard a hash of its id.
pub fn sweep_pk(connection_id: &str) -> String {
    // FNV-1a: stable across processes and versions (the std hasher is not).
    let hash =
        connection_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    sweep_shard_pk((hash % u64::from(SWEEP_SHARDS)) as u32)
}

pub fn sweep_shard_pk(shard: u32) -> String {
    format!("SWEEP#{shard:02}")
}

/// The `sweep` index key of a present user's presence item: `SWEEP#P{shard}`, by room (the
/// item's `pk`), so that a sweep finds all of a room's present users in one shard and reads the
/// room's memberships once. (Items keyed by user before are found in their old shard until their
/// next write.)
///
/// The room's name is a tenant's choice, so the hash is salted with the deployment's
/// `ROOMCAST_SWEEP_SALT` (the template sets it to the stack's id): a tenant cannot choose room
/// names that all land in one index key to make it hot or one shard's reconciliation long.
/// Every function that writes presence reads the same salt; without it (local stacks, tests) the
/// hash is unsalted.
pub fn sweep_presence_pk(pk: &str) -> String {
    static SALT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let salt = SALT.get_or_init(|| std::env::var("ROOMCAST_SWEEP_SALT").unwrap_or_default());
    let hash = salt
        .bytes()
        .chain([b'/'])
        .chain(pk.bytes())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    format!("SWEEP#P{:02}", hash % u64::from(SWEEP_SHARDS))
}

/// An item as the stores write it, with the `sweep` index's keys where the sweeper reads it: a
/// presence item of a present user gets `sweepPk` (and its `since` as `lastSeenAt`, the index's
/// sort key); a tombstone gets none, so the index holds present users only. (A connection's are
/// its own fields.)
pub fn with_sweep_keys(mut item: serde_dynamo::Item) -> serde_dynamo::Item {
    use serde_dynamo::AttributeValue;
    let text = |item: &serde_dynamo::Item, name: &str| match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    };
    let present = matches!(item.get("connections"), Some(AttributeValue::Ss(set)) if !set.is_empty());
    if text(&item, "type").as_deref() == Some("presence") && present {
        let pk = text(&item, "pk").unwrap_or_default();
        item.insert("sweepPk".into(), AttributeValue::S(sweep_presence_pk(&pk)));
        if let Some(since) = text(&item, "since") {
            item.insert("lastSeenAt".into(), AttributeValue::S(since));
        }
    }
    item
}

/// The sweeper's lease and where its last run stopped.
pub const SWEEPER_PK: &str = "SWEEPER";
pub const SWEEPER_LEASE_SK: &str = "LEASE";

/// A rate limit's counter (`roomcast_core::limits`): one item per key and one-second window.
pub fn limit_pk(key: &str) -> String {
    format!("LIMIT#{key}")
}

/// A room's presence: its users' items and its count. On a key of its own, so that a join storm's
/// presence writes and the memberships themselves each have a partition key's write units (two
/// a join on each; see docs/PERFORMANCE.md, "A join storm"). Presence written before it lived
/// here (under the room's key) is copied over the first time the processor handles the room
/// (`Store::migrate_presence`).
pub fn presence_pk(tenant: &str, room: &str) -> String {
    format!("PRESENCE#{tenant}#{room}")
}

pub fn membership_sk(connection_id: &str) -> String {
    format!("CONN#{connection_id}")
}

pub fn message_sk(timestamp: &DateTime<Utc>, id: &str) -> String {
    format!("MSG#{}#{id}", format_ts(timestamp))
}

pub fn presence_sk(user_id: &str) -> String {
    format!("USER#{user_id}")
}

pub const ROOM_PRESENCE_SK: &str = "PRESENCE";
pub const SETTINGS_SK: &str = "SETTINGS";
/// A tenant's plugin configuration (`roomcast plugin config set`).
pub const PLUGIN_CONFIG_SK: &str = "CONFIG";

pub fn user_gsi1pk(tenant: &str, user_id: &str) -> String {
    format!("TENANT#{tenant}#USER#{user_id}")
}

/// Timestamps are stored as fixed-width RFC 3339 UTC strings with milliseconds, so that they sort
/// as strings (message sort keys depend on it) and read well in the console.
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub fn parse_ts(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("invalid timestamp {value:?}: {e}"))
}

pub mod ts_format {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_ts(ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        parse_ts(&raw).map_err(serde::de::Error::custom)
    }
}

/// An open WebSocket connection, written by `$connect`, deleted by `$disconnect` (or by TTL, or by
/// the processor when API Gateway answers 410 Gone for it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub gsi1pk: String,
    pub gsi1sk: String,
    pub connection_id: String,
    pub tenant: String,
    pub user_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// A DynamoDB string set; absent when empty (DynamoDB has no empty sets).
    #[serde(default, with = "serde_dynamo::string_set", skip_serializing_if = "BTreeSet::is_empty")]
    pub rooms: BTreeSet<String>,
    #[serde(with = "ts_format")]
    pub connected_at: DateTime<Utc>,
    /// Its last `ping` (or connect), or when the sweeper last found it open at API Gateway: the
    /// `sweep` index's sort key.
    #[serde(with = "ts_format")]
    pub last_seen_at: DateTime<Utc>,
    pub status: String,
    /// The management API endpoint to reach this connection: `https://{domainName}/{stage}`.
    pub endpoint: String,
    /// Epoch seconds; DynamoDB's TTL deletes the record some time after it.
    pub ttl: i64,
    /// Set just before the processor deletes a stale connection, so the REMOVE record says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_reason: Option<String>,
    /// The sweeper's index key ([`sweep_pk`]): with `lastSeenAt` as its sort key, the `sweep`
    /// index holds connections (and present users' presence items, under keys of their own),
    /// so the sweeper reads the stale ones and nothing else. A connection written before the
    /// index gets it on its next ping; one that never pings again is left to its TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_pk: Option<String>,
    /// `?since=` at connect: per room, the id of the last message the client saw. The processor
    /// sends what came after, right after the welcome.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub recover: std::collections::BTreeMap<String, String>,
    /// The token's claims the `$connect` authorizer passed on (a tenant's `authorize-join` hook
    /// sees them).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub claims: std::collections::BTreeMap<String, String>,
    /// The tenant's plugin decided joins when this connection opened: its joins wait for the
    /// processor's decision (`pendingRooms`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub authorize_joins: bool,
    /// Rooms joined (in `rooms`) whose join waits for the tenant's rules: nothing of them may be
    /// read or sent until the processor allows it.
    #[serde(default, with = "serde_dynamo::string_set", skip_serializing_if = "BTreeSet::is_empty")]
    pub pending_rooms: BTreeSet<String>,
    /// Rooms the tenant's rules denied this connection: a message or signal it sent to one of
    /// them before the decision reaches no one.
    #[serde(default, with = "serde_dynamo::string_set", skip_serializing_if = "BTreeSet::is_empty")]
    pub denied_rooms: BTreeSet<String>,
    /// Rooms asked for at `$connect` that the token's `rooms` claim does not allow, with why:
    /// the processor sends `join_denied` for each after the welcome.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub denied: std::collections::BTreeMap<String, String>,
}

pub struct NewConnection<'a> {
    pub connection_id: &'a str,
    pub tenant: &'a Name,
    pub user_id: &'a str,
    pub connection_type: Option<String>,
    pub deployment_id: Option<String>,
    pub rooms: BTreeSet<String>,
    pub endpoint: String,
    pub now: DateTime<Utc>,
    pub ttl_seconds: i64,
}

impl Connection {
    pub fn new(n: NewConnection<'_>) -> Connection {
        Connection {
            pk: connection_pk(n.connection_id),
            sk: CONNECTION_SK.to_string(),
            record_type: "connection".into(),
            gsi1pk: user_gsi1pk(n.tenant.as_str(), n.user_id),
            gsi1sk: connection_pk(n.connection_id),
            connection_id: n.connection_id.to_string(),
            tenant: n.tenant.to_string(),
            user_id: n.user_id.to_string(),
            connection_type: n.connection_type,
            deployment_id: n.deployment_id,
            rooms: n.rooms,
            connected_at: n.now,
            last_seen_at: n.now,
            status: STATUS_CONNECTED.into(),
            endpoint: n.endpoint,
            ttl: expiry(n.now, n.ttl_seconds),
            close_reason: None,
            sweep_pk: Some(sweep_pk(n.connection_id)),
            recover: std::collections::BTreeMap::new(),
            claims: std::collections::BTreeMap::new(),
            authorize_joins: false,
            pending_rooms: BTreeSet::new(),
            denied_rooms: BTreeSet::new(),
            denied: std::collections::BTreeMap::new(),
        }
    }

    /// A membership of this connection in `room`, with the connection's facts copied in so that
    /// a room fan-out needs one query, not one read per member.
    pub fn membership(&self, room: &str, reason: JoinReason, now: DateTime<Utc>) -> Membership {
        Membership {
            pk: room_pk(&self.tenant, room),
            sk: membership_sk(&self.connection_id),
            record_type: "membership".into(),
            tenant: self.tenant.clone(),
            room: room.to_string(),
            connection_id: self.connection_id.clone(),
            user_id: self.user_id.clone(),
            joined_at: now,
            connected_at: self.connected_at,
            endpoint: self.endpoint.clone(),
            join_reason: reason,
            ttl: self.ttl,
            left_reason: None,
            joined_ns: Some(join_order()),
            pending: self.authorize_joins.then_some(true),
            claims: if self.authorize_joins { self.claims.clone() } else { Default::default() },
        }
    }

    /// Whether the connection may use `room` now: joined, and not waiting for the tenant's rules.
    pub fn in_room(&self, room: &str) -> bool {
        self.rooms.contains(room) && !self.pending_rooms.contains(room)
    }
}

pub fn expiry(now: DateTime<Utc>, ttl_seconds: i64) -> i64 {
    (now + Duration::seconds(ttl_seconds)).timestamp()
}

/// A record whose `ttl` has passed is gone, whether or not DynamoDB has deleted it yet (it
/// deletes lazily, up to about 48 hours later).
pub fn is_expired(ttl: i64, now: DateTime<Utc>) -> bool {
    ttl <= now.timestamp()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinReason {
    /// Named in the `rooms` query parameter at connect time.
    Connect,
    /// A `join` action.
    Join,
}

/// Why a user left a room; the `reason` of a presence `left` event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeftReason {
    /// A `leave` action.
    Leave,
    /// The connection closed (`$disconnect`).
    Disconnect,
    /// DynamoDB's TTL removed the connection or the membership.
    Expired,
    /// API Gateway answered 410 Gone: the connection had silently died.
    Gone,
    /// The tenant's rules denied the join.
    Denied,
    /// The connection kept going over its rate limit after it was told (`roomcast_core::limits`):
    /// the processor closes it.
    RateLimited,
}

impl LeftReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeftReason::Leave => "leave",
            LeftReason::Disconnect => "disconnect",
            LeftReason::Expired => "expired",
            LeftReason::Gone => "gone",
            LeftReason::Denied => "denied",
            LeftReason::RateLimited => "rate_limited",
        }
    }

    pub fn parse(value: &str) -> Option<LeftReason> {
        [
            LeftReason::Leave,
            LeftReason::Disconnect,
            LeftReason::Expired,
            LeftReason::Gone,
            LeftReason::Denied,
            LeftReason::RateLimited,
        ]
        .into_iter()
        .find(|r| r.as_str() == value)
    }
}

/// A connection's membership in a room.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Membership {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub room: String,
    pub connection_id: String,
    pub user_id: String,
    #[serde(with = "ts_format")]
    pub joined_at: DateTime<Utc>,
    #[serde(with = "ts_format")]
    pub connected_at: DateTime<Utc>,
    pub endpoint: String,
    pub join_reason: JoinReason,
    pub ttl: i64,
    /// Set just before the processor deletes the membership, so the REMOVE record says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub left_reason: Option<String>,
    /// The join waits for the tenant's `authorize-join`: the member gets nothing of the room,
    /// and is not present, until the processor allows it (removing this) — or denies it
    /// (deleting the membership).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<bool>,
    /// A pending join's copy of its connection's claims: what `authorize-join` is asked with, in
    /// the stream record itself (a replay decides from the record alone).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub claims: std::collections::BTreeMap<String, String>,
    /// When the join happened in nanoseconds since the epoch, strictly increasing within a
    /// process. Presence no longer ranks joins by time ([`crate::presence`] keeps it as state);
    /// kept so that records stay readable by processors of either version during a deploy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_ns: Option<i64>,
}

/// A join's place in time at nanosecond resolution: the wall clock's nanoseconds, or one more
/// than the last this process handed out, whichever is later.
fn join_order() -> i64 {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

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

/// Where "now" comes from. Handlers, the processor and the local gateway's socket timers take
/// it from here so that tests can move time (TTL expiry, young connections, idle sockets)
/// without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> DateTime<Utc>;

    /// Resolves once this clock shows `at` or later. The wall clock sleeps; a [`ManualClock`]
    /// waits for a test to move it there.
    fn sleep_until(&self, at: DateTime<Utc>) -> futures::future::BoxFuture<'static, ()> {
        let wait = (at - self.now()).to_std().unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        truncate_ms(Utc::now())
    }
}

/// A clock that only moves when told to; whoever waits on it ([`Clock::sleep_until`]) wakes
/// when it is moved past their time.
#[derive(Debug)]
pub struct ManualClock(tokio::sync::watch::Sender<DateTime<Utc>>);

impl ManualClock {
    pub fn at(t: DateTime<Utc>) -> Arc<ManualClock> {
        Arc::new(ManualClock(tokio::sync::watch::Sender::new(truncate_ms(t))))
    }

    pub fn starting_now() -> Arc<ManualClock> {
        Self::at(Utc::now())
    }

    pub fn advance(&self, by: Duration) {
        self.0.send_modify(|t| *t += by);
    }

    /// Sets the time (replay: each record's own time).
    pub fn set(&self, to: DateTime<Utc>) {
        self.0.send_replace(truncate_ms(to));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.borrow()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> futures::future::BoxFuture<'static, ()> {
        let mut time = self.0.subscribe();
        Box::pin(async move {
            while *time.borrow_and_update() < at {
                if time.changed().await.is_err() {
                    // The clock is gone: it will never get there.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis()).single().unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rooms_present_users_share_one_sweep_shard_and_tombstones_have_none() {
        let now = Utc::now();
        let keyed = |user: &str, present: bool| {
            let mut p = Presence::new("acme", "lobby", user, now);
            if present {
                p.connections.insert(format!("c-{user}"));
            }
            let item = with_sweep_keys(serde_dynamo::to_item(&p).unwrap());
            match item.get("sweepPk") {
                Some(serde_dynamo::AttributeValue::S(key)) => Some(key.clone()),
                _ => None,
            }
        };
        let shards: BTreeSet<Option<String>> = (0..50).map(|i| keyed(&format!("u{i}"), true)).collect();
        assert_eq!(shards.len(), 1, "one room, one shard: its memberships are read once a sweep");
        assert!(shards.iter().all(|k| k.as_deref().is_some_and(|k| k.starts_with("SWEEP#P"))));
        assert_eq!(keyed("gone", false), None, "a tombstone is not in the index");
        let rooms: BTreeSet<String> =
            (0..64).map(|i| sweep_presence_pk(&presence_pk("acme", &format!("r{i}")))).collect();
        assert!(rooms.len() > 8, "rooms spread over the shards: {rooms:?}");
    }

    #[test]
    fn a_message_writes_no_index_entry_and_one_written_with_one_still_reads() {
        let now = Utc::now();
        let message = Message::published("acme", "general", "ann", "hi".into(), now, 60);
        let item: serde_dynamo::Item = serde_dynamo::to_item(&message).unwrap();
        assert!(!item.contains_key("gsi1pk") && !item.contains_key("gsi1sk"), "{item:?}");
        let mut old = item.clone();
        old.insert("gsi1pk".into(), serde_dynamo::AttributeValue::S(user_gsi1pk("acme", "ann")));
        old.insert("gsi1sk".into(), serde_dynamo::AttributeValue::S("MSG#x".into()));
        let read: Message = serde_dynamo::from_item(old).unwrap();
        assert_eq!(read.id, message.id);
    }

    #[test]
    fn names_reject_key_separators_and_bad_lengths() {
        assert!(Name::parse("room", "general").is_ok());
        assert!(Name::parse("room", "team-1.chat:ops_x").is_ok());
        let err = Name::parse("room", "a#b").unwrap_err();
        assert!(err.contains("'#'"), "{err}");
        assert!(Name::parse("room", "").is_err());
        assert!(Name::parse("room", &"x".repeat(65)).is_err());
        assert!(Name::parse("room", "caf\u{e9}").is_err());
    }

    #[test]
    fn a_message_id_gives_its_sort_key_and_ids_of_one_millisecond_keep_their_order() {
        let at = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
        let ids: Vec<String> = (0..50).map(|_| message_id_at(at)).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "one millisecond, in order");
        for id in &ids {
            assert_eq!(message_sk_of_id(id), Some(message_sk(&at, id)));
        }
        assert_eq!(message_sk_of_id("not-a-uuid"), None);
        assert_eq!(message_sk_of_id(&uuid::Uuid::new_v4().to_string()), None);
    }

    #[test]
    fn timestamps_are_fixed_width_and_sort_as_strings() {
        let a = Utc.timestamp_millis_opt(1_700_000_000_000).unwrap();
        let b = a + Duration::milliseconds(5);
        assert_eq!(format_ts(&a), "2023-11-14T22:13:20.000Z");
        assert!(message_sk(&a, "z") < message_sk(&b, "a"));
        assert_eq!(parse_ts(&format_ts(&b)).unwrap(), b);
    }

    #[test]
    fn connection_round_trips_through_a_dynamodb_item_with_rooms_as_a_string_set() {
        let tenant = Name::parse("tenant", "acme").unwrap();
        let now = Utc.timestamp_millis_opt(1_700_000_000_123).unwrap();
        let conn = Connection::new(NewConnection {
            connection_id: "abc=",
            tenant: &tenant,
            user_id: "u1",
            connection_type: Some("client".into()),
            deployment_id: None,
            rooms: ["general".to_string(), "ops".to_string()].into(),
            endpoint: "https://x/prod".into(),
            now,
            ttl_seconds: 60,
        });
        let item: serde_dynamo::Item = serde_dynamo::to_item(&conn).unwrap();
        assert!(matches!(item.get("rooms"), Some(serde_dynamo::AttributeValue::Ss(_))), "{item:?}");
        assert!(item.get("deploymentId").is_none());
        assert_eq!(item.get("ttl"), Some(&serde_dynamo::AttributeValue::N("1700000060".into())));
        let back: Connection = serde_dynamo::from_item(item).unwrap();
        assert_eq!(back, conn);

        let lonely = Connection { rooms: BTreeSet::new(), ..conn };
        let item: serde_dynamo::Item = serde_dynamo::to_item(&lonely).unwrap();
        assert!(item.get("rooms").is_none(), "DynamoDB rejects empty sets");
        assert_eq!(serde_dynamo::from_item::<_, Connection>(item).unwrap(), lonely);
    }
}

// ---------------------------------------------------------------------------------------------
// Tenant plugins, as records: `TENANT#{tenant}` holds each uploaded version's metadata
// (`PLUGIN#{version}#META`), its chunks under a prefix of their own (`CHUNK#{version}#{index}`:
// a component can be 4 MiB, an item at most 400 KB) and the `ACTIVE` pointer. Finding a version
// is one `GetItem`; listing versions reads metadata only, never a chunk.

/// The largest chunk of a component in one item, leaving room under DynamoDB's 400 KB.
pub const PLUGIN_CHUNK_BYTES: usize = 300 * 1024;

pub fn tenant_pk(tenant: &str) -> String {
    format!("TENANT#{tenant}")
}

pub fn plugin_meta_sk(version: &str) -> String {
    format!("PLUGIN#{version}#META")
}

pub fn plugin_chunk_sk(version: &str, index: usize) -> String {
    format!("CHUNK#{version}#{index:04}")
}

/// Where versions uploaded before chunks had their own prefix keep them (read, never written).
pub fn legacy_plugin_chunk_sk(version: &str, index: usize) -> String {
    format!("PLUGIN#{version}#CHUNK#{index:04}")
}

pub const PLUGIN_ACTIVE_SK: &str = "ACTIVE";

/// Where an uploaded version stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginStatus {
    /// Written; the processor has not activated it yet.
    Uploaded,
    /// Compiled and checked by the processor; the tenant's plugin.
    Active,
    /// The processor refused it (`reason` says why).
    Rejected,
    /// Was active; another version is, or the tenant's plugin is disabled.
    Inactive,
}

/// What a tenant does when its plugin faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Deliver by the default rules.
    Open,
    /// Reject the message.
    Closed,
}

/// One uploaded version of a tenant's plugin (its bytes are in the chunks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginMeta {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub version: String,
    pub sha256: String,
    pub size: usize,
    pub chunks: usize,
    pub status: PluginStatus,
    pub policy: FailurePolicy,
    #[serde(with = "ts_format")]
    pub uploaded_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Per-tenant limits set at upload; unset, the deployment's apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitOverrides>,
}

impl PluginMeta {
    /// Versions are content-addressed: the first 16 hex digits of the sha256.
    pub fn new(tenant: &str, sha256: &str, size: usize, policy: FailurePolicy, now: DateTime<Utc>) -> PluginMeta {
        let version = sha256[..16.min(sha256.len())].to_string();
        PluginMeta {
            pk: tenant_pk(tenant),
            sk: plugin_meta_sk(&version),
            record_type: "plugin".into(),
            tenant: tenant.to_string(),
            version,
            sha256: sha256.to_string(),
            size,
            chunks: size.div_ceil(PLUGIN_CHUNK_BYTES),
            status: PluginStatus::Uploaded,
            policy,
            uploaded_at: now,
            reason: None,
            limits: None,
        }
    }
}

/// One piece of a component.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginChunk {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub index: usize,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The chunks of a component, in order.
pub fn plugin_chunks(tenant: &str, version: &str, bytes: &[u8]) -> Vec<PluginChunk> {
    bytes
        .chunks(PLUGIN_CHUNK_BYTES)
        .enumerate()
        .map(|(index, data)| PluginChunk {
            pk: tenant_pk(tenant),
            sk: plugin_chunk_sk(version, index),
            record_type: "plugin-chunk".into(),
            index,
            data: data.to_vec(),
        })
        .collect()
}

/// Which version a tenant runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginActive {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub version: String,
    /// New on every write of the pointer (an activation, a rollback, a re-upload of the active
    /// version with other settings): every processor container compares it once per batch and
    /// reloads when it changed. Absent on pointers written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Whether the version it names decides joins (`authorize-join`), as the processor found
    /// when it loaded it: `$connect` reads it to know whether joins must wait for a decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorizes_joins: Option<bool>,
}

impl PluginActive {
    pub fn new(tenant: &str, version: &str) -> PluginActive {
        PluginActive {
            pk: tenant_pk(tenant),
            sk: PLUGIN_ACTIVE_SK.into(),
            record_type: "plugin-active".into(),
            tenant: tenant.to_string(),
            version: version.to_string(),
            revision: Some(uuid::Uuid::now_v7().to_string()),
            authorizes_joins: None,
        }
    }
}

/// Per-tenant plugin limits, stored with an uploaded version (`roomcast plugin upload --fuel …`).
/// Unset fields take the deployment's value; set ones are capped at
/// [`CEILING`](crate::rules::CEILING).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_extra_rooms: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_only_users: Option<usize>,
}

impl LimitOverrides {
    pub fn is_empty(&self) -> bool {
        *self == LimitOverrides::default()
    }
}

/// The principal DynamoDB's stream names in the `userIdentity` of a record that TTL removed
/// (its `type` is `Service`). The embedded store writes the same.
pub const TTL_PRINCIPAL: &str = "dynamodb.amazonaws.com";

// ---------------------------------------------------------------------------------------------
// Presence, as state (docs/ARCHITECTURE.md, "Presence"): one item per user and room holding
// that user's live connections there, and one per room holding its count of users. Only the
// processor writes them, one membership record at a time ([`crate::presence`]).

/// One user's presence in one room: the set of their connections in it, and for each connection
/// the stream sequence number of the last membership record applied for it.
///
/// DynamoDB Streams orders records per item only: the records of one membership (one connection
/// in one room) arrive in order, those of two memberships in any order, on two shards at once.
/// So a record is a redelivery exactly when its sequence number is at or below its own
/// connection's mark, whatever other connections' records did meanwhile. When the set empties the
/// item stays, with the marks of the connections that left, as a tombstone until its `ttl`: a
/// redelivered INSERT of a connection that left is recognised as old and adds nothing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Presence {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub room: String,
    pub user_id: String,
    /// The user's live connections here: a DynamoDB string set, absent when empty (a tombstone:
    /// the user is not present).
    #[serde(with = "serde_dynamo::string_set", default, skip_serializing_if = "BTreeSet::is_empty")]
    pub connections: BTreeSet<String>,
    /// Per connection, live or gone, the sequence number (as [`sequence_key`]) of the last
    /// membership record applied for it. A gone connection's mark is kept a while
    /// ([`crate::presence::MAX_GONE_MARKS`]), so that its redelivered INSERT adds nothing.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub marks: std::collections::BTreeMap<String, String>,
    /// When the user became present (the joining record's time).
    #[serde(with = "ts_format")]
    pub since: DateTime<Utc>,
    /// Written by processors before marks per connection: the last record applied to this user.
    /// Read only (an item without marks), never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<String>,
    /// The event id of the record that made this user's last transition (`joined` or `left`): a
    /// redelivery of that record announces it again, with the same frame id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    /// Whether this user's `joined` was announced; their `left` is announced exactly when it was.
    #[serde(default)]
    pub announced: bool,
    /// The version of this user's last transition here, the `version` of its presence frame: the
    /// record's time in milliseconds, or one more than the last when that is not later (so
    /// it only grows while the item lives, and a tombstone that expired two days ago was far
    /// below any new one). Two processors handling two shards send frames at the same time, so a
    /// client may get a `left` after the `joined` that followed it; it keeps the higher version.
    #[serde(default)]
    pub version: u64,
    /// Live connections the sweeper found without a live membership in the room, with when it
    /// first did (epoch seconds): its REMOVE was lost, or is still on its way. One still suspect
    /// [`crate::presence::RECONCILE_GRACE_SECONDS`] later is taken out ([`crate::admin`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub suspects: std::collections::BTreeMap<String, i64>,
    /// Set while the user is not present (a tombstone): DynamoDB's TTL deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    /// Bumped on every write: the adapters' optimistic lock.
    pub ver: u64,
}

impl Presence {
    pub fn new(tenant: &str, room: &str, user_id: &str, since: DateTime<Utc>) -> Presence {
        Presence {
            pk: presence_pk(tenant, room),
            sk: presence_sk(user_id),
            record_type: "presence".into(),
            tenant: tenant.to_string(),
            room: room.to_string(),
            user_id: user_id.to_string(),
            connections: BTreeSet::new(),
            marks: Default::default(),
            since,
            seq: None,
            last_event: None,
            announced: false,
            version: 0,
            suspects: Default::default(),
            ttl: None,
            ver: 0,
        }
    }

    /// Whether the user is present (a tombstone is not).
    pub fn present(&self) -> bool {
        !self.connections.is_empty()
    }
}

/// A room's count of present users. (Processors before per-connection marks also kept a
/// watermark here, `seq` and `lastEvent`: read, never written.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomPresence {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub room: String,
    pub users: u64,
    /// The watermark's sequence number, zero-padded so that it compares as a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<String>,
    /// The event id of the record at the watermark: the id of the presence frame it announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    /// Whether the record at the watermark announced its transition (a redelivery repeats it).
    #[serde(default)]
    pub last_announced: bool,
    /// Set while the room is empty: DynamoDB's TTL deletes the count of a room no one uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<i64>,
    /// Bumped on every write: the adapters' optimistic lock.
    pub ver: u64,
}

impl RoomPresence {
    pub fn new(tenant: &str, room: &str) -> RoomPresence {
        RoomPresence {
            pk: presence_pk(tenant, room),
            sk: ROOM_PRESENCE_SK.into(),
            record_type: "room-presence".into(),
            tenant: tenant.to_string(),
            room: room.to_string(),
            users: 0,
            seq: None,
            last_event: None,
            last_announced: false,
            ttl: None,
            ver: 0,
        }
    }
}

/// A stream sequence number as a fixed-width string: DynamoDB's are decimal numbers of up to 40
/// digits, which compare correctly as strings only at one width.
pub fn sequence_key(sequence: &str) -> String {
    format!("{sequence:0>40}")
}

/// A tenant's settings (`roomcast tenant set`); unset fields take the deployment's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantSettings {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    /// Rooms with more users than this announce no `joined`/`left`; they offer counts and `who`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_announce_max_users: Option<u64>,
    /// Rate limits of its own over the deployment's, by name (`messages_per_connection`, …;
    /// `roomcast_core::limits::NAMES`), 0 meaning none.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub rate_limits: std::collections::BTreeMap<String, u32>,
}

impl TenantSettings {
    pub fn new(tenant: &str) -> TenantSettings {
        TenantSettings {
            pk: tenant_pk(tenant),
            sk: SETTINGS_SK.into(),
            record_type: "settings".into(),
            tenant: tenant.to_string(),
            presence_announce_max_users: None,
            rate_limits: Default::default(),
        }
    }
}

/// A tenant's configuration for its plugin: key/value pairs the plugin reads through
/// `host.config` (`roomcast plugin config set --tenant T KEY=VALUE`). One item per tenant, at
/// most [`PluginConfig::MAX_BYTES`]; every processor reads it with the tenant's `ACTIVE` pointer,
/// once per batch, so a change takes effect everywhere from the next batch on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    #[serde(default)]
    pub values: std::collections::BTreeMap<String, String>,
    #[serde(with = "ts_format")]
    pub updated_at: DateTime<Utc>,
}

impl PluginConfig {
    /// Keys and values together, in bytes.
    pub const MAX_BYTES: usize = 16 << 10;
    /// The longest key.
    pub const MAX_KEY_BYTES: usize = 128;

    pub fn new(
        tenant: &str,
        values: std::collections::BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> Result<PluginConfig, String> {
        for key in values.keys() {
            let fine = !key.is_empty()
                && key.len() <= Self::MAX_KEY_BYTES
                && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
            if !fine {
                return Err(format!(
                    "configuration key {key:?}: 1 to {} characters of A-Z, a-z, 0-9, '_', '-' and '.'",
                    Self::MAX_KEY_BYTES
                ));
            }
        }
        let size: usize = values.iter().map(|(k, v)| k.len() + v.len()).sum();
        if size > Self::MAX_BYTES {
            return Err(format!("the configuration would be {size} bytes; a tenant's is at most {}", Self::MAX_BYTES));
        }
        Ok(PluginConfig {
            pk: tenant_pk(tenant),
            sk: PLUGIN_CONFIG_SK.into(),
            record_type: "plugin-config".into(),
            tenant: tenant.to_string(),
            values,
            updated_at: now,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Idempotent sends: `IDEM#{tenant}#{scope}#{key}` remembers, until its TTL, which message a key
// wrote. The scope is the sender (`u:{userId}`, user ids never hold `#`) or `publish` for
// backends, so one user can never claim, or learn, another's key.

pub const IDEMPOTENCY_SK: &str = "IDEM";

pub fn idempotency_pk(tenant: &str, scope: &str, key: &str) -> String {
    format!("IDEM#{tenant}#{scope}#{key}")
}

/// Whose keys a message's key is among: its sender's, or the backends'.
pub fn idempotency_scope(message: &Message) -> String {
    if message.sender_connection_id.is_empty() { "publish".to_string() } else { format!("u:{}", message.user_id) }
}

/// An idempotency key: 1–128 of `A-Z a-z 0-9 _ - . :` (never the key separator `#`).
pub fn parse_idempotency_key(key: &str) -> Result<String, String> {
    if key.is_empty() || key.len() > 128 {
        return Err(format!("idempotency_key must be 1 to 128 characters, got {}", key.len()));
    }
    if let Some(bad) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))) {
        return Err(format!("idempotency_key contains {bad:?}; allowed are letters, digits and _ - . :"));
    }
    Ok(key.to_string())
}

/// Which message a key wrote, until `ttl` (the idempotency window). It holds the message itself,
/// so a repeat can finish a first send that claimed the key and died before writing it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub key: String,
    pub message_id: String,
    pub room: String,
    pub ttl: i64,
    pub message: Message,
}

impl IdempotencyRecord {
    pub fn new(message: &Message, key: &str, now: DateTime<Utc>, window_seconds: i64) -> IdempotencyRecord {
        IdempotencyRecord {
            pk: idempotency_pk(&message.tenant, &idempotency_scope(message), key),
            sk: IDEMPOTENCY_SK.into(),
            record_type: "idempotency".into(),
            tenant: message.tenant.clone(),
            key: key.to_string(),
            message_id: message.id.clone(),
            room: message.room.clone(),
            ttl: expiry(now, window_seconds),
            message: message.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fan-out progress: `FANOUT#{key}` / `PROGRESS` says how far a big fan-out got, so that a record
// redelivered after a cut-off (the invocation's deadline, a crash, a later record's failure)
// resumes where it stopped instead of serving the room again from its first member.

pub const FANOUT_PROGRESS_SK: &str = "PROGRESS";

/// How long progress is kept: longer than Lambda retries a stream record before giving up on it.
pub const FANOUT_PROGRESS_TTL_SECONDS: i64 = 24 * 3600;

pub fn fanout_pk(key: &str) -> String {
    format!("FANOUT#{key}")
}

/// How far one frame's fan-out got. Its recipients are served in connection-id order: every one
/// whose id sorts at or below `through` was served or settled (delivered, gone, given up on,
/// set aside as young), except those in `pending`, still being sent when this was written.
/// Recipients above `through` were not started. `complete`: every recipient was settled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FanoutProgress {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    #[serde(default)]
    pub through: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    #[serde(default)]
    pub complete: bool,
    pub ttl: i64,
}

impl FanoutProgress {
    pub fn new(key: &str, through: String, pending: Vec<String>, complete: bool, now: DateTime<Utc>) -> FanoutProgress {
        FanoutProgress {
            pk: fanout_pk(key),
            sk: FANOUT_PROGRESS_SK.into(),
            record_type: "fanout".into(),
            through,
            pending,
            complete,
            ttl: expiry(now, FANOUT_PROGRESS_TTL_SECONDS),
        }
    }

    /// Whether `connection_id` was already served or settled.
    pub fn settled(&self, connection_id: &str) -> bool {
        self.settled_lookup()(connection_id)
    }

    /// [`FanoutProgress::settled`] for many connections: the pending ids looked up in a set.
    pub fn settled_lookup(&self) -> impl Fn(&str) -> bool + '_ {
        let pending: std::collections::HashSet<&str> = self.pending.iter().map(String::as_str).collect();
        move |id| self.complete || (id <= self.through.as_str() && !pending.contains(id))
    }
}

/// What a tenant's rules made of a message, as history keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Rejected(String),
    Rewritten(String),
    /// Sent only to these users (a direct message): history gives it to them and the sender only.
    Audience(Vec<String>),
}

/// A tenant's identity settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TenantIdentity {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    /// An HS256 secret of the tenant's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<String>,
    /// The identity provider's JWKS (`https://…/.well-known/jwks.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Tokens issued (`iat`) at or before this (epoch seconds) are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_before: Option<i64>,
    /// Per user: tokens issued at or before this are refused.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub users_revoked_before: std::collections::BTreeMap<String, i64>,
    /// Revoked token ids (`jti`), each kept until the expiry given with it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub revoked_ids: std::collections::BTreeMap<String, i64>,
}

pub const IDENTITY_SK: &str = "IDENTITY";
