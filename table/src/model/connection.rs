//! Connections and their memberships, with why a connection or membership ended.

use super::*;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JoinReason {
    /// Named in the `rooms` query parameter at connect time.
    Connect,
    /// A `join` action.
    Join,
    /// The tenant's backend put the user's connections into the room (`join_user`).
    Server,
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
    /// The connection kept going over its rate limit after it was told ([`crate::limits`]):
    /// the processor closes it.
    RateLimited,
    /// The tenant's backend disconnected the user (`disconnect_user`): the processor closes it.
    Terminated,
    /// The tenant's backend took the connection out of the room (`leave_user`): the processor
    /// tells the connection (an `ack` for `leave` it did not ask for). Kept as text on the
    /// membership, so a processor that predates it reads it as a plain leave.
    Server,
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
            LeftReason::Terminated => "terminated",
            LeftReason::Server => "server",
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
            LeftReason::Terminated,
            LeftReason::Server,
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
