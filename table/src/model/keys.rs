//! Every record's partition and sort keys, and the sweep index's keys.

use super::*;

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
/// `roomcast_processor::roster`). On its own partition key, so that a join storm's bumps do not share
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

/// A rate limit's counter ([`crate::limits`]): one item per key and one-second window.
pub fn limit_pk(key: &str) -> String {
    format!("LIMIT#{key}")
}

/// A room's presence: its users' items and its count. On a key of its own, so that a join storm's
/// presence writes and the memberships themselves each have a partition key's write units (two
/// a join on each; see docs/PERFORMANCE.md, "A join storm"). Presence written before it lived
/// here (under the room's key) is copied over the first time the processor handles the room
/// (`PresenceStore::migrate_presence`).
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

/// A backend's message to a user ([`UserMessage`]): `USER#{tenant}#{user}` / `MSG#{id}`.
pub fn user_message_pk(tenant: &str, user_id: &str) -> String {
    format!("USER#{tenant}#{user_id}")
}

pub fn user_gsi1pk(tenant: &str, user_id: &str) -> String {
    format!("TENANT#{tenant}#USER#{user_id}")
}

/// The principal DynamoDB's stream names in the `userIdentity` of a record that TTL removed
/// (its `type` is `Service`). The embedded store writes the same.
pub const TTL_PRINCIPAL: &str = "dynamodb.amazonaws.com";

/// Every kind of item the table holds, told apart by its keys alone: the one list the stream
/// decoder (`roomcast_processor::stream`) and the stores' reads go by. A new record kind is added here
/// first (its keys), then to the decoder's one match on it; forgetting the second is a compile
/// error, not an item that streams in as unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ItemKind {
    /// `CONN#{id}` / `META`.
    Connection,
    /// `ROOM#{tenant}#{room}` / `CONN#{id}`.
    Membership,
    /// `ROOM#…` / `MSG#…`: a message, or a routed message's copy kept for another room.
    Message,
    /// `ROOM#…` / `SIG#…`.
    Signal,
    /// `USER#{tenant}#{user}` / `MSG#…`: a backend's message to a user.
    UserMessage,
    /// `PRESENCE#{tenant}#{room}` / `USER#{user}` (and the same under `ROOM#`, from before).
    Presence,
    /// `PRESENCE#…` / `PRESENCE`: a room's count (and the same under `ROOM#`, from before).
    RoomPresence,
    /// `ROSTER#…` / `VERSION`.
    Roster,
    /// `LIMIT#{key}` / `W#{window}`.
    Limit,
    /// `SWEEPER` / `LEASE`.
    Sweeper,
    /// `FANOUT#{key}` / `PROGRESS`.
    Fanout,
    /// `IDEM#{tenant}#…` / `IDEM`.
    Idempotency,
    /// `TENANT#{tenant}` / `SETTINGS`.
    Settings,
    /// `TENANT#{tenant}` / `IDENTITY`.
    Identity,
    /// `TENANT#{tenant}` / `CONFIG`.
    PluginConfig,
    /// `TENANT#{tenant}` / `ACTIVE`.
    PluginActive,
    /// `TENANT#{tenant}` / `PLUGIN#{version}#META`.
    PluginMeta,
    /// `TENANT#{tenant}` / `PLUGIN#{version}#CHUNK#{n}` (or `CHUNK#…`, from before).
    PluginChunk,
}

impl ItemKind {
    /// The kind of the item with these keys; `None` for keys no record of ours has.
    pub fn of(pk: &str, sk: &str) -> Option<ItemKind> {
        use ItemKind::*;
        let prefix = match pk.split_once('#') {
            Some((prefix, _)) => prefix,
            None if pk == SWEEPER_PK => pk,
            None => return None,
        };
        Some(match (prefix, sk) {
            ("CONN", CONNECTION_SK) => Connection,
            ("ROOM", sk) if sk.starts_with("CONN#") => Membership,
            ("ROOM", sk) if sk.starts_with("MSG#") => Message,
            ("ROOM", sk) if sk.starts_with("SIG#") => Signal,
            ("USER", sk) if sk.starts_with("MSG#") => UserMessage,
            ("PRESENCE" | "ROOM", sk) if sk.starts_with("USER#") => Presence,
            ("PRESENCE" | "ROOM", ROOM_PRESENCE_SK) => RoomPresence,
            ("ROSTER", ROSTER_VERSION_SK) => Roster,
            ("LIMIT", _) => Limit,
            (SWEEPER_PK, _) if pk == SWEEPER_PK => Sweeper,
            ("FANOUT", FANOUT_PROGRESS_SK) => Fanout,
            ("IDEM", IDEMPOTENCY_SK) => Idempotency,
            ("TENANT", SETTINGS_SK) => Settings,
            ("TENANT", IDENTITY_SK) => Identity,
            ("TENANT", PLUGIN_CONFIG_SK) => PluginConfig,
            ("TENANT", PLUGIN_ACTIVE_SK) => PluginActive,
            ("TENANT", sk) if sk.starts_with("PLUGIN#") && sk.ends_with("#META") => PluginMeta,
            ("TENANT", sk) if sk.starts_with("CHUNK#") || (sk.starts_with("PLUGIN#") && sk.contains("#CHUNK#")) => {
                PluginChunk
            }
            _ => return None,
        })
    }

    /// The tenant an item of this kind belongs to, from its `pk` (empty for the deployment's own).
    pub fn tenant(self, pk: &str) -> &str {
        let rest = pk.split_once('#').map_or("", |(_, rest)| rest);
        match self {
            ItemKind::Connection | ItemKind::Sweeper | ItemKind::Fanout => "",
            ItemKind::Settings
            | ItemKind::Identity
            | ItemKind::PluginConfig
            | ItemKind::PluginActive
            | ItemKind::PluginMeta
            | ItemKind::PluginChunk => rest,
            _ => rest.split('#').next().unwrap_or_default(),
        }
    }

    /// Its name in logs and replay.
    pub fn name(self) -> &'static str {
        match self {
            ItemKind::Connection => "connection",
            ItemKind::Membership => "membership",
            ItemKind::Message => "message",
            ItemKind::Signal => "signal",
            ItemKind::UserMessage => "user-message",
            ItemKind::Presence => "presence",
            ItemKind::RoomPresence => "room-presence",
            ItemKind::Roster => "roster",
            ItemKind::Limit => "limit",
            ItemKind::Sweeper => "sweeper",
            ItemKind::Fanout => "fanout",
            ItemKind::Idempotency => "idempotency",
            ItemKind::Settings => "settings",
            ItemKind::Identity => "identity",
            ItemKind::PluginConfig => "plugin-config",
            ItemKind::PluginActive => "plugin-active",
            ItemKind::PluginMeta => "plugin",
            ItemKind::PluginChunk => "plugin-chunk",
        }
    }
}
