//! The table, behind small ports by concern, each with two adapters (docs/ARCHITECTURE.md, "The
//! table"):
//!
//! | port | concern |
//! |---|---|
//! | [`ConnectionStore`] | open sockets' records: connect, look up, disconnect, touch, by user, scan |
//! | [`MembershipStore`] | who has joined which room; pending joins settled; the roster version |
//! | [`HistoryStore`] | messages and signals written to rooms; verdicts; history pages; idempotent sends |
//! | [`PresenceStore`] | presence as state: transitions, runs, `who`, counts |
//! | [`PluginStore`] | plugin versions, their bytes, the active one, configuration |
//! | [`TenantStore`] | tenants' settings and identity |
//! | [`UpkeepStore`] | rate-limit counters, the sweeper's shards and lease, fan-out progress |
//!
//! [`Store`] is all of them (`Arc<dyn Store>` calls any port's methods). The adapters:
//!
//! * [`dynamodb::DynamoStore`] — the real DynamoDB API through `aws-sdk-dynamodb` + `serde_dynamo`
//!   (AWS, or any local endpoint: moto, DynamoDB Local, LocalStack);
//! * [`memory::MemoryStore`] — the embedded default: in memory, and it emits stream records in
//!   DynamoDB Streams' own shape, in write order, including TTL deletions by the service identity.
//!
//! [`parts::Parts`] makes a table of ports from different stores: a wrapper that changes one
//! concern (a fault injected into one read) implements that port alone. Which item a key names
//! is [`crate::model::ItemKind`], the one list the stream decoder and the reads go by.
//!
//! Both pass the same contract suite (`tests/contract.rs`). The operations are the domain's
//! (connect, join, leave, …), not raw item calls, so that each is atomic in both adapters.
//! Every read takes `now` and treats `ttl <= now` as gone: DynamoDB deletes expired items lazily.
//!
//! An item read from the table that does not decode (a field value this processor does not know,
//! written by a newer handler during a rolling deployment or by a console edit; a wrong type; a
//! missing field) is not a platform failure: `decode_or_skip` logs it with its key, counts it
//! (`corrupt_items`), and the read goes on without it. A list leaves it out; a single-item read
//! answers as if it were absent (each method says what its caller sees). Unknown *fields* decode:
//! no record denies them.

pub mod dynamodb;
pub mod memory;
pub mod parts;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_dynamo::{AttributeValue, Item};

use crate::metrics::Metrics;
use crate::model::{
    Connection, IdempotencyRecord, LeftReason, Membership, Message, PluginActive, PluginChunk, PluginMeta,
    PluginStatus, RoomPresence, TenantSettings,
};
use crate::presence::{PresenceOutcome, PresenceUpdate, WhoPage};
pub use crate::protocol::HistoryFrom;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The connection record does not exist (or has expired): the client's fault or a race with
    /// its disconnect, never retried.
    #[error("connection {0} is not connected")]
    NoConnection(String),
    /// The table could not be reached or refused the call: our fault, worth retrying.
    #[error("table unavailable: {0}")]
    Unavailable(String),
    /// The invocation's time ran out before the record's deliveries finished: redeliver it.
    #[error("out of time: {0}")]
    OutOfTime(String),
}

impl StoreError {
    /// A platform fault, or a record the invocation had no time to finish: the stream processor
    /// reports the record in `batchItemFailures`.
    pub fn is_platform(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::OutOfTime(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The table's connections: the records of open sockets.
#[async_trait]
pub trait ConnectionStore: Send + Sync {
    /// Writes a new connection and its memberships in one transaction.
    async fn put_connection(&self, conn: &Connection, memberships: &[Membership]) -> Result<()>;

    /// The live connection, or `None` if it does not exist, its TTL has passed, or its record
    /// does not decode (logged and counted): a handler answers "not connected", the client
    /// reconnects and writes a new record.
    async fn get_connection(&self, connection_id: &str, now: DateTime<Utc>) -> Result<Option<Connection>>;

    /// Deletes the connection and returns what was deleted. Idempotent: a second call returns
    /// `None`. With a `reason`, the record is first marked (`closeReason`) so that the stream's
    /// REMOVE record carries why the processor removed it. A record that does not decode is
    /// deleted all the same and answered as `None` (logged and counted).
    async fn delete_connection(&self, connection_id: &str, reason: Option<LeftReason>) -> Result<Option<Connection>>;

    /// Refreshes `lastSeenAt` and the TTL of the connection and of its memberships.
    async fn touch(&self, conn: &Connection, now: DateTime<Utc>, ttl: i64) -> Result<()>;

    /// A user's live connections in a tenant, through the `gsi1` index (eventually consistent,
    /// as any GSI read). One that does not decode is left out (logged and counted).
    async fn user_connections(&self, tenant: &str, user_id: &str, now: DateTime<Utc>) -> Result<Vec<Connection>>;

    /// One page of connection records, expired ones included (the sweeper wants those), after
    /// the connection id `after`. The next page starts after the last one returned; fewer than
    /// `limit` means the end. A record that does not decode is passed over (logged and counted):
    /// the page is filled from the records after it.
    async fn scan_connections(&self, limit: usize, after: Option<&str>) -> Result<Vec<Connection>>;

    /// Sets `status` on a connection; `None` when there is no such connection, or when its record
    /// does not decode (logged and counted; the status is set all the same).
    async fn set_status(&self, connection_id: &str, status: &str) -> Result<Option<Connection>>;

    /// Replaces a connection's token claims (a `refresh`); `false` when there is no such
    /// connection (nothing is written).
    async fn set_claims(
        &self,
        connection_id: &str,
        claims: &std::collections::BTreeMap<String, String>,
    ) -> Result<bool>;
}

/// The table's rooms: who has joined which room, and the room's roster version.
#[async_trait]
pub trait MembershipStore: Send + Sync {
    /// Adds the membership and the room to the connection's `rooms`, atomically, unless the
    /// connection already has a live membership of that room: then nothing is written and the
    /// answer is `false`. API Gateway runs one connection's frames concurrently, so two `join`s
    /// of one room may both find the room missing from the connection they read; only the first
    /// writes, so its INSERT is the one the tenant's rules decide (a second write, a MODIFY with
    /// another `joinedNs`, made the first decision fail and nothing ask again: pending for good).
    /// [`StoreError::NoConnection`] when the connection is gone (in the embedded store, also when
    /// its record does not decode).
    async fn join(&self, membership: &Membership) -> Result<bool>;

    /// Removes the membership and the room from the connection's `rooms`, atomically.
    async fn leave(&self, connection_id: &str, tenant: &str, room: &str) -> Result<()>;

    /// The processor's decision on a join, applied only to the very membership it was made for
    /// (the same `joinedNs`, still pending — or, for a connection that did not wait, still not
    /// pending): a redelivered or stale decision changes nothing and returns false. Allowed: the
    /// membership loses `pending` (its MODIFY record makes the user present), then the room
    /// leaves the connection's `pendingRooms`. Denied: the membership is deleted (`leftReason`
    /// denied) and the room leaves the connection.
    async fn settle_join(&self, membership: &Membership, allowed: bool) -> Result<bool>;

    /// The live memberships of a room, ordered by connection id; one that does not decode is
    /// left out (logged and counted), and the rest of the room is served.
    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>>;

    /// Moves the room's roster version ([`crate::model::roster_pk`]) on. Every write of a
    /// membership here (connect, join, leave, settling a join, removing a membership) does it
    /// itself after the write and before answering; a redelivered settlement does it again. One
    /// plain update (`ADD v 1`), never in a transaction.
    async fn bump_roster(&self, tenant: &str, room: &str) -> Result<()>;

    /// The room's roster version, read strongly consistent. `None`: the room has none yet (no
    /// membership written since versions exist), and its members must be read.
    async fn roster_version(&self, tenant: &str, room: &str) -> Result<Option<u64>>;

    /// Marks the membership with `leftReason` and deletes it (the processor's cascade when a
    /// connection goes), whether or not it decodes. Idempotent.
    async fn remove_membership(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()>;

    /// Marks the membership with `leftReason` (if it is there), so that the REMOVE of a later
    /// `leave` says why: a server-side leave (`leave_user`) marks, then leaves in one transaction.
    async fn mark_left(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()>;
}

/// The table's history: messages (and signals) written to rooms, and what the tenant's rules decided of them.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    async fn put_message(&self, message: &Message) -> Result<()>;

    /// Writes an ephemeral signal (its INSERT is delivered; its TTL removes it).
    async fn put_signal(&self, signal: &crate::model::Signal) -> Result<()>;
    /// Writes a backend's message to a user (`send_to_user`); the processor delivers it.
    async fn put_user_message(&self, message: &crate::model::UserMessage) -> Result<()>;

    /// Writes `message` unless `record`'s key already stands for one within its window. The key is
    /// claimed with one conditional put of `record` (an expired claim counts as absent), then the
    /// message is written. A repeat answers the claimed message (whose room and body the caller
    /// compares: a key reused for another message is the caller's error), and writes it if the
    /// first send died between its two writes. No transaction: a repeat is the common case, and a
    /// cancelled transaction still costs its writes.
    async fn put_message_once(
        &self,
        message: &Message,
        record: &IdempotencyRecord,
        now: DateTime<Utc>,
    ) -> Result<Message>;

    /// Records what the tenant's rules decided about a message (`rejected` or `deliveredBody`);
    /// a message that is gone is not an error.
    async fn mark_message(&self, tenant: &str, room: &str, sk: &str, verdict: &crate::model::Verdict) -> Result<()>;

    /// One message by its sort key, if it is there and live (rejected ones included).
    async fn message(&self, tenant: &str, room: &str, sk: &str, now: DateTime<Utc>) -> Result<Option<Message>>;

    /// Up to `limit` live messages of the room on the side of `from` it names, oldest first in
    /// the answer either way; one that does not decode is left out (logged and counted) and does
    /// not count to `limit`. With a `viewer`, only the messages that user was sent
    /// ([`Message::visible_to`]: a direct message to others is left out, and not counted).
    async fn history(
        &self,
        tenant: &str,
        room: &str,
        from: &HistoryFrom,
        limit: usize,
        now: DateTime<Utc>,
        viewer: Option<&str>,
    ) -> Result<Vec<Message>> {
        self.history_page(tenant, room, from, limit, now, viewer, usize::MAX).await
    }

    /// [`HistoryStore::history`] that also stops once the messages' text (as delivered) passes
    /// `max_bytes`: the message that passes it is the last one read and given, so a caller that
    /// fits the answer in a frame of `max_bytes` always finds more than fits and says `next`.
    /// DynamoDB reads in pages of 4, 8, 16, … items, so a page of big messages reads about what
    /// one frame returns rather than `limit` of them.
    #[allow(clippy::too_many_arguments, reason = "history's arguments and the byte budget")]
    async fn history_page(
        &self,
        tenant: &str,
        room: &str,
        from: &HistoryFrom,
        limit: usize,
        now: DateTime<Utc>,
        viewer: Option<&str>,
        max_bytes: usize,
    ) -> Result<Vec<Message>>;
}

/// The table's presence: who is present in a room, as state.
#[async_trait]
pub trait PresenceStore: Send + Sync {
    /// One page of present users' presence items (tombstones left out), every room's, after the
    /// item key `after` (`pk`, `sk`); fewer than `limit` means the end. For the sweeper's
    /// reconciliation; an item that does not decode is passed over (logged and counted).
    async fn scan_presence(&self, limit: usize, after: Option<(String, String)>)
    -> Result<Vec<crate::model::Presence>>;

    /// Writes the sweeper's suspects onto a presence item (`p`, its `ver` one more than the
    /// one read), if the item is still as read. `Ok(false)`: it changed meanwhile.
    async fn put_presence_suspects(&self, p: &crate::model::Presence) -> Result<bool>;

    /// Applies one membership record to the room's presence state, atomically (see
    /// [`crate::presence`]): the processor's, never a handler's.
    async fn apply_presence(&self, update: &PresenceUpdate) -> Result<PresenceOutcome>;

    /// Copies a room's presence written before it had a key of its own (under the room's key)
    /// to `PRESENCE#{tenant}#{room}`; true when there was such a room count to copy. The
    /// processor asks once per batch for a room with no count. Stores that never held presence
    /// under the room's key have nothing to copy.
    async fn migrate_presence(&self, _tenant: &str, _room: &str) -> Result<bool> {
        Ok(false)
    }

    /// Records that a present user's `joined` was not told after all (the room was past its
    /// limit when the record was handled), so that their `left` is not told either. Nothing when
    /// the user is not present.
    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> Result<()>;

    /// Applies a run of one room's membership records, in stream order, as
    /// [`crate::presence::plan_run`] folds them: the outcomes of a prefix of `updates` (at least
    /// the first record), ending after the first announced transition. DynamoDB writes a run in
    /// one transaction; by default each record is applied on its own.
    async fn apply_presence_run(&self, updates: &[PresenceUpdate]) -> Result<Vec<PresenceOutcome>> {
        let mut outcomes = Vec::new();
        for update in updates {
            let outcome = self.apply_presence(update).await?;
            let announced = outcome.transition.is_some() && outcome.announce;
            outcomes.push(outcome);
            if announced {
                break;
            }
        }
        Ok(outcomes)
    }

    /// Up to `limit` present users of a room in id order, after the user id `after`, each with
    /// their connection count, and the room's count. One query and one read; a presence item
    /// that does not decode is left out (logged and counted).
    async fn who(&self, tenant: &str, room: &str, limit: usize, after: Option<&str>) -> Result<WhoPage>;

    /// One user's presence item in a room; `None` when there is none (or it does not decode:
    /// logged and counted). A tombstone ([`crate::model::Presence::present`] false) is a user who
    /// left.
    async fn presence(&self, tenant: &str, room: &str, user_id: &str) -> Result<Option<crate::model::Presence>>;

    /// The room's count of present users; `None` when no one has been present yet (or the item does
    /// not decode: logged and counted).
    async fn room_presence(&self, tenant: &str, room: &str) -> Result<Option<RoomPresence>>;
}

/// The table's plugins: uploaded versions, their bytes, the tenant's active one and its configuration.
#[async_trait]
pub trait PluginStore: Send + Sync {
    /// Records on the `ACTIVE` pointer whether the version it names decides joins (only if it
    /// still names `version`).
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> Result<()>;

    /// Writes an uploaded plugin: its chunks first, then its metadata (whose INSERT the processor
    /// activates on, so every chunk is there by then).
    async fn put_plugin(&self, meta: &PluginMeta, chunks: &[PluginChunk]) -> Result<()>;

    /// The component's bytes, reassembled from its chunks; `None` when any chunk is missing or
    /// does not decode (logged and counted): the version is refused as incomplete.
    async fn plugin_bytes(&self, tenant: &str, version: &str, chunks: usize) -> Result<Option<Vec<u8>>>;

    /// One uploaded version's metadata, by key (strongly consistent); `None` when there is no
    /// such version or its record does not decode.
    async fn plugin(&self, tenant: &str, version: &str) -> Result<Option<PluginMeta>>;

    /// Every uploaded version of a tenant's plugin, oldest first; one whose record does not
    /// decode is left out (logged and counted), as if it had never been uploaded.
    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginMeta>>;

    /// Records the processor's verdict on a version (on its record as it is, decoding or not).
    async fn set_plugin_status(
        &self,
        tenant: &str,
        version: &str,
        status: PluginStatus,
        reason: Option<&str>,
    ) -> Result<()>;

    /// The tenant's active version, if any. A pointer that does not decode is `None` (logged and
    /// counted): the tenant runs without a plugin, by the default rules, until the pointer is
    /// written again, as when the active version's record or chunks are missing.
    async fn active_plugin(&self, tenant: &str) -> Result<Option<PluginActive>>;

    /// Points the tenant at a version, or (with `None`) at no plugin.
    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> Result<()>;

    /// Writes `pointer` only if the tenant's pointer is still the one `expected` names
    /// ([`crate::model::PluginActive::token`]), in one conditional write; whether it did.
    async fn set_active_plugin_if(&self, pointer: &PluginActive, expected: &str) -> Result<bool>;

    /// The tenant's plugin configuration, if any (strongly consistent: read with the `ACTIVE`
    /// pointer).
    async fn plugin_config(&self, tenant: &str) -> Result<Option<crate::model::PluginConfig>>;

    /// Replaces the tenant's plugin configuration; an empty one deletes the item.
    async fn put_plugin_config(&self, config: &crate::model::PluginConfig) -> Result<()>;
}

/// The table's tenants: settings and identity (token keys).
#[async_trait]
pub trait TenantStore: Send + Sync {
    /// A tenant's settings; `None` when unset (or the item does not decode: logged and counted).
    async fn tenant_settings(&self, tenant: &str) -> Result<Option<TenantSettings>>;

    /// A tenant's own identity (`roomcast_handlers::identity`), strongly consistent; `None` when it has
    /// none (or the item does not decode: logged and counted).
    async fn tenant_identity(&self, tenant: &str) -> Result<Option<crate::model::TenantIdentity>>;

    async fn put_tenant_identity(&self, identity: &crate::model::TenantIdentity) -> Result<()>;

    async fn put_tenant_settings(&self, settings: &TenantSettings) -> Result<()>;
}

/// The table's upkeep: rate-limit counters, the sweeper's shards and lease, fan-out progress.
#[async_trait]
pub trait UpkeepStore: Send + Sync {
    /// Counts one more under a rate limit's `key` in `window` (a whole second since the epoch)
    /// and answers the count, atomically across every caller ([`crate::limits`]). One
    /// `UpdateItem ADD` on `LIMIT#{key}` / `W#{window}`, its TTL two minutes on.
    async fn count_in_window(&self, key: &str, window: i64) -> Result<u64>;

    /// The connections of one sweep shard last seen before `cutoff`, through the sparse `sweep`
    /// index (connections only, by `lastSeenAt`): the stale ones, and nothing else is read.
    async fn stale_connections(&self, shard: u32, cutoff: DateTime<Utc>) -> Result<Vec<Connection>>;

    /// The present users' presence items of one sweep shard, through the `sweep` index (present
    /// users only: no message, connection or tombstone is read). Items written before the index
    /// are not there until their next write.
    async fn present_users(&self, shard: u32) -> Result<Vec<crate::model::Presence>>;

    /// Takes the sweeper's lease for run `owner` until `until` (epoch seconds) if no run holds
    /// it at `now`, and answers the shard the last run stopped at; `None`: another run holds it.
    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> Result<Option<u32>>;

    /// Records that run `owner` has swept up to `next_shard` (the shard the next run starts at),
    /// and with `release` gives the lease back. Only while `owner` holds it: false, and nothing
    /// written, when the lease ran out and another run took it.
    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> Result<bool>;

    /// The sweeper found the connection open at API Gateway: it is seen now (`lastSeenAt`), so
    /// the next runs do not ask about it again until it has been silent for the idle limit.
    async fn mark_seen(&self, connection_id: &str, now: DateTime<Utc>) -> Result<()>;

    /// How far a big fan-out got ([`crate::model::FanoutProgress`]), strongly consistent.
    async fn fanout_progress(&self, key: &str) -> Result<Option<crate::model::FanoutProgress>>;

    async fn put_fanout_progress(&self, progress: &crate::model::FanoutProgress) -> Result<()>;
}

/// The whole table: every port, as both adapters (and any wrapper of them) implement it. Code
/// that needs one concern takes that port; most take `Arc<dyn Store>` and call any of them.
pub trait Store:
    ConnectionStore + MembershipStore + HistoryStore + PresenceStore + PluginStore + TenantStore + UpkeepStore + 'static
{
}

impl<
    T: ConnectionStore
        + MembershipStore
        + HistoryStore
        + PresenceStore
        + PluginStore
        + TenantStore
        + UpkeepStore
        + 'static,
> Store for T
{
}

/// Who is in a room. The table answers (every [`Store`] is one); replay may answer from the
/// connection and membership records of its own input instead.
#[async_trait]
pub trait Rooms: Send + Sync {
    /// The live memberships of a room, ordered by connection id.
    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>>;
}

/// The users present in each of a new connection's rooms, `user_id` counted whether or not its
/// own membership has been applied yet (it is in the same batch, on another partition): so a
/// welcome's counts depend only on the records before it, however the batch was scheduled.
pub async fn room_counts(
    store: &dyn Store,
    tenant: &str,
    user_id: &str,
    rooms: &[String],
) -> Result<Vec<(String, u64)>> {
    use futures::StreamExt;
    let reads: Vec<_> = rooms
        .iter()
        .map(|room| async move {
            let (count, mine) =
                tokio::try_join!(store.room_presence(tenant, room), store.presence(tenant, room, user_id))?;
            let users = count.map_or(0, |r| r.users);
            let counted = mine.is_some_and(|p| p.present());
            Ok::<_, StoreError>((room.clone(), if counted { users } else { users + 1 }))
        })
        .collect();
    futures::stream::iter(reads).buffered(8).collect::<Vec<_>>().await.into_iter().collect()
}

/// Where a recovery after `since` starts: a margin before it, because a message's key is its
/// handler's time, and a slow write can land just behind a message a client has already seen.
/// The client keeps one copy per id.
pub fn recovery_start(since: &Message) -> HistoryFrom {
    let margin = since.timestamp - chrono::Duration::seconds(RECOVERY_MARGIN_SECONDS);
    HistoryFrom::After(format!("MSG#{}", crate::model::format_ts(&margin)))
}

pub const RECOVERY_MARGIN_SECONDS: i64 = 5;

/// Every message key is within `MSG#` .. `MSG$` ('$' sorts right after '#').
pub(crate) const MESSAGES_FROM: &str = "MSG#";
pub(crate) const MESSAGES_TO: &str = "MSG$";

/// Decodes an item read from the table. One that does not decode is logged with its key and the
/// serde error, counted in `metrics.corrupt_items`, and `None`: the caller goes on without it.
pub(crate) fn decode_or_skip<T: DeserializeOwned>(item: impl Into<Item>, metrics: &Metrics) -> Option<T> {
    let item: Item = item.into();
    let key = |name: &str| match item.get(name) {
        Some(AttributeValue::S(value)) => value.clone(),
        _ => String::new(),
    };
    let (pk, sk) = (key("pk"), key("sk"));
    match serde_dynamo::from_item(item) {
        Ok(record) => Some(record),
        Err(error) => {
            tracing::warn!(%pk, %sk, %error, "skipping an item of the table that does not decode");
            Metrics::add(&metrics.corrupt_items, 1);
            None
        }
    }
}
