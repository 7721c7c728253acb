//! DynamoDB stream records in, typed changes out.
//!
//! * [`decode_record`] — one stream record (raw JSON, as the Lambda event carries it) into an
//!   `aws_lambda_events` [`EventRecord`]; a malformed one is an error value naming its position.
//! * [`Change::from_record`] — an `EventRecord` into a [`Change`] of a typed [`Record`], with
//!   [`Change::Unknown`] for anything we do not recognise (never a panic).
//! * [`batch`] — the batch runner: ordering per partition key, the earliest platform failure.
//! * [`poller`] — reads a real table's stream through the DynamoDB Streams API.
//! * [`shards`] — the stream as AWS delivers it: per-item order only, shards and batches at once.

pub mod batch;
pub mod log;
pub mod poller;
pub mod shards;

use aws_lambda_events::dynamodb::EventRecord;
use serde::de::DeserializeOwned;
use serde_dynamo::{AttributeValue, Item};

use crate::model::{Connection, Membership, Message, PluginActive, PluginMeta};
use crate::model::{ItemKind, TTL_PRINCIPAL};

/// A decoded table record.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Connection(Connection),
    Membership(Membership),
    Message(Message),
    /// An uploaded plugin version (its metadata).
    Plugin(PluginMeta),
    /// A piece of an uploaded component; its bytes are not decoded here.
    PluginChunk {
        tenant: String,
    },
    /// Which version a tenant runs.
    PluginActive(PluginActive),
    /// An ephemeral event for a room's members.
    Signal(crate::model::Signal),
    /// A backend's message to a user, naming their connections.
    UserMessage(crate::model::UserMessage),
    /// State the processor keeps for itself (a user's presence in a room, a room's count) or a
    /// tenant's settings: nothing to react to. Not decoded.
    State {
        tenant: String,
        kind: &'static str,
    },
}

impl Record {
    /// The tenant and room the record belongs to, if any (for spans and room views).
    pub fn tenant_room(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Record::Connection(c) => (Some(&c.tenant), None),
            Record::Membership(m) => (Some(&m.tenant), Some(&m.room)),
            Record::Message(m) => (Some(&m.tenant), Some(&m.room)),
            Record::Plugin(p) => (Some(&p.tenant), None),
            Record::PluginChunk { tenant } => (Some(tenant), None),
            Record::PluginActive(a) => (Some(&a.tenant), None),
            Record::State { tenant, .. } => (Some(tenant), None),
            Record::Signal(s) => (Some(&s.tenant), Some(&s.room)),
            Record::UserMessage(m) => (Some(&m.tenant), None),
        }
    }
}

/// Who removed an item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A client of the table: a handler, the processor, an operator.
    Client,
    /// DynamoDB's TTL process (`userIdentity {type: Service, principalId: dynamodb.amazonaws.com}`).
    TtlExpired,
}

/// What happened to the table, as the processor understands it.
#[derive(Clone, Debug, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "one short-lived Change per record: boxing the images would only add allocations"
)]
pub enum Change {
    Inserted(Record),
    Modified {
        old: Record,
        new: Record,
    },
    Removed {
        old: Record,
        cause: Cause,
    },
    /// A record we do not act on: an unknown item type or event name, or an image that does not
    /// decode. Skipped and counted, never fatal.
    Unknown {
        reason: String,
    },
}

impl Change {
    pub fn from_record(record: &EventRecord) -> Change {
        let change = &record.change;
        let result = match record.event_name.as_str() {
            "INSERT" => decode_image(&change.keys, &change.new_image, "NewImage").map(Change::Inserted),
            "MODIFY" => decode_image(&change.keys, &change.old_image, "OldImage").and_then(|old| {
                Ok(Change::Modified { old, new: decode_image(&change.keys, &change.new_image, "NewImage")? })
            }),
            "REMOVE" => decode_image(&change.keys, &change.old_image, "OldImage").map(|old| Change::Removed {
                old,
                cause: if is_ttl_deletion(record) { Cause::TtlExpired } else { Cause::Client },
            }),
            other => Err(format!("unknown eventName {other:?}")),
        };
        result.unwrap_or_else(|reason| Change::Unknown { reason })
    }

    pub fn tenant_room(&self) -> (Option<&str>, Option<&str>) {
        match self {
            Change::Inserted(r) | Change::Modified { new: r, .. } | Change::Removed { old: r, .. } => r.tenant_room(),
            Change::Unknown { .. } => (None, None),
        }
    }

    /// The tenant and room of a record that has both.
    pub fn tenant_room_pair(&self) -> Option<(&str, &str)> {
        match self.tenant_room() {
            (Some(tenant), Some(room)) => Some((tenant, room)),
            _ => None,
        }
    }

    /// The membership this change makes present: an INSERT that does not wait for the tenant's
    /// rules, or the MODIFY by which the processor allowed one that did.
    pub fn joined(&self) -> Option<&crate::model::Membership> {
        match self {
            Change::Inserted(Record::Membership(m)) if m.pending != Some(true) => Some(m),
            Change::Modified { old: Record::Membership(old), new: Record::Membership(new) }
                if old.pending == Some(true) && new.pending != Some(true) =>
            {
                Some(new)
            }
            _ => None,
        }
    }

    /// The membership this change takes out of its room's presence: a REMOVE of one that was
    /// present (a denied join never was).
    pub fn left(&self) -> Option<&crate::model::Membership> {
        match self {
            Change::Removed { old: Record::Membership(m), .. } if m.pending != Some(true) => Some(m),
            _ => None,
        }
    }

    /// A membership written waiting for the tenant's rules.
    pub fn pending_join(&self) -> Option<&crate::model::Membership> {
        match self {
            Change::Inserted(Record::Membership(m)) if m.pending == Some(true) => Some(m),
            _ => None,
        }
    }

    /// A plugin version's metadata or a tenant's `ACTIVE` pointer: the tenant rules' business.
    pub fn is_plugin_record(&self) -> bool {
        match self {
            Change::Inserted(r) | Change::Modified { new: r, .. } | Change::Removed { old: r, .. } => {
                matches!(r, Record::Plugin(_) | Record::PluginActive(_))
            }
            Change::Unknown { .. } => false,
        }
    }
}

pub fn is_ttl_deletion(record: &EventRecord) -> bool {
    record.user_identity.as_ref().is_some_and(|id| id.type_ == "Service" && id.principal_id == TTL_PRINCIPAL)
}

fn key_string<'a>(keys: &'a Item, image: &'a Item, name: &str) -> Option<&'a str> {
    match keys.get(name).or_else(|| image.get(name)) {
        Some(AttributeValue::S(s)) => Some(s.as_str()),
        _ => None,
    }
}

fn decode_image(keys: &Item, image: &Item, which: &str) -> Result<Record, String> {
    let (Some(pk), Some(sk)) = (key_string(keys, image, "pk"), key_string(keys, image, "sk")) else {
        return Err("record has no string pk/sk keys".into());
    };
    if image.is_empty() {
        return Err(format!("{pk}/{sk}: {which} is missing (is the stream NEW_AND_OLD_IMAGES?)"));
    }
    fn typed<T: DeserializeOwned>(image: &Item, pk: &str, sk: &str, which: &str) -> Result<T, String> {
        serde_dynamo::from_item(image.clone()).map_err(|e| format!("{pk}/{sk}: {which} does not decode: {e}"))
    }
    let Some(kind) = ItemKind::of(pk, sk) else {
        return Err(format!("{pk}/{sk}: not a record type this processor handles"));
    };
    let state = |kind: &'static str, tenant: &str| Ok(Record::State { tenant: tenant.to_string(), kind });
    match kind {
        ItemKind::Connection => typed(image, pk, sk, which).map(Record::Connection),
        ItemKind::Membership => typed(image, pk, sk, which).map(Record::Membership),
        // A routed message's copy, kept for another room's history: delivered already.
        ItemKind::Message if image.contains_key("keptIn") => state("kept-copy", kind.tenant(pk)),
        ItemKind::Message => typed(image, pk, sk, which).map(Record::Message),
        ItemKind::Signal => typed(image, pk, sk, which).map(Record::Signal),
        ItemKind::UserMessage => typed(image, pk, sk, which).map(Record::UserMessage),
        ItemKind::PluginActive => typed(image, pk, sk, which).map(Record::PluginActive),
        ItemKind::PluginMeta => typed(image, pk, sk, which).map(Record::Plugin),
        ItemKind::PluginChunk => Ok(Record::PluginChunk { tenant: kind.tenant(pk).to_string() }),
        // State the processor keeps for itself, or a tenant's settings: nothing to react to.
        ItemKind::Presence
        | ItemKind::RoomPresence
        | ItemKind::Roster
        | ItemKind::Limit
        | ItemKind::Sweeper
        | ItemKind::Fanout
        | ItemKind::Idempotency
        | ItemKind::Settings
        | ItemKind::Identity
        | ItemKind::PluginConfig => state(kind.name(), kind.tenant(pk)),
    }
}

/// A stream record that could not even be read as one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("malformed stream record at position {position} (eventID {event_id}): {reason}")]
pub struct MalformedRecord {
    pub position: usize,
    pub event_id: String,
    pub reason: String,
}

/// Reads one raw stream record. Records are read one by one, so one bad record never makes the
/// whole batch unreadable.
pub fn decode_record(position: usize, raw: &serde_json::Value) -> Result<EventRecord, MalformedRecord> {
    serde_json::from_value::<EventRecord>(raw.clone()).map_err(|e| MalformedRecord {
        position,
        event_id: raw.get("eventID").and_then(|v| v.as_str()).unwrap_or("?").to_string(),
        reason: e.to_string(),
    })
}

/// `a` comes before `b` in a shard: sequence numbers are decimal strings of varying length.
pub fn sequence_lt(a: &str, b: &str) -> bool {
    (a.len(), a) < (b.len(), b)
}

/// The `pk` of a record: records of one partition key keep their order.
pub fn partition_key(record: &EventRecord) -> Option<&str> {
    match record.change.keys.get("pk") {
        Some(AttributeValue::S(pk)) => Some(pk),
        _ => None,
    }
}

/// The kind of item a record is about, from its keys alone (nothing of its images is read).
pub fn item_kind(record: &EventRecord) -> Option<ItemKind> {
    match (partition_key(record), record.change.keys.get("sk")) {
        (Some(pk), Some(AttributeValue::S(sk))) => ItemKind::of(pk, sk),
        _ => None,
    }
}
