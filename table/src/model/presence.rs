//! Presence as state: one item per user and room, one count per room.

use super::*;

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
    /// [`crate::presence::RECONCILE_GRACE_SECONDS`] later is taken out (`roomcast_handlers::admin`).
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
