//! The embedded store: the table in memory, with a stream.
//!
//! Every write appends a stream record in DynamoDB Streams' own shape (the `aws_lambda_events`
//! types, `NEW_AND_OLD_IMAGES`), in write order, with increasing sequence numbers. Items are kept
//! as DynamoDB items (`serde_dynamo::Item`), so the images are exactly what DynamoDB would emit.
//! [`MemoryStore::expire_due`] plays DynamoDB's TTL process: it deletes expired items and emits
//! REMOVE records with the service identity (`userIdentity {type: Service, principalId:
//! dynamodb.amazonaws.com}`).

// The ports, a file each.
mod connections;
mod history;
mod memberships;
mod plugins;
mod presence;
mod tenants;
mod upkeep;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_lambda_events::dynamodb::{EventRecord, StreamRecord, StreamViewType, UserIdentity};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_dynamo::{AttributeValue, Item};
use tokio::sync::mpsc;

use super::{
    ConnectionStore, HistoryFrom, HistoryStore, MESSAGES_FROM, MESSAGES_TO, MembershipStore, PluginStore,
    PresenceStore, Result, StoreError, TenantStore, UpkeepStore, decode_or_skip,
};
use crate::metrics::Metrics;
use crate::model::{
    self, Clock, Connection, IdempotencyRecord, ItemKind, LeftReason, Membership, Message, PluginActive, PluginChunk,
    PluginMeta, PluginStatus, Presence, RoomPresence, TenantSettings, is_expired,
};
use crate::presence::{Plan, PresenceOutcome, PresenceUpdate, WhoPage};

pub use crate::model::TTL_PRINCIPAL;

type Key = (String, String);

#[derive(Debug)]
struct Table {
    items: BTreeMap<Key, Item>,
    next_sequence: u128,
    subscriber: Option<mpsc::UnboundedSender<EventRecord>>,
    /// Records written before anyone subscribed, as a stream keeps them (24 h in DynamoDB).
    backlog: Vec<EventRecord>,
    /// Each room's roster version, by room pk, moved on by every membership write but a TTL
    /// refresh (`MembershipStore::bump_roster`): kept out of the item map, so that bumps make no stream
    /// records here (on DynamoDB they make records the processor skips as state).
    rosters: std::collections::HashMap<String, u64>,
    /// Rate-limit counters by key and window (`UpkeepStore::count_in_window`), likewise kept out of the
    /// item map: only the current and the last window are kept.
    counters: std::collections::HashMap<(String, i64), u64>,
    /// The sweeper's lease: until when (epoch seconds), and the shard the next run starts at.
    /// The sweeper's lease: until when, the shard the next run starts at, and its holder.
    sweep_lease: (i64, u32, String),
}

#[derive(Debug)]
pub struct MemoryStore {
    table: Mutex<Table>,
    clock: Arc<dyn Clock>,
    table_name: String,
    /// Where items that do not decode are counted (`corrupt_items`).
    metrics: Arc<Metrics>,
    /// False: writes emit no stream records (a dry run's scratch table, which no one reads).
    streams: bool,
}

/// Who made a change, as the stream record's `userIdentity` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Actor {
    Client,
    TtlService,
}

impl MemoryStore {
    /// A store that counts items that do not decode on its own (only the log line tells);
    /// [`MemoryStore::with_metrics`] counts them with a processor's.
    pub fn new(clock: Arc<dyn Clock>) -> Arc<MemoryStore> {
        Self::with_metrics(clock, Arc::default())
    }

    /// Counts items that do not decode in `metrics`: the processor's, when it reads through this
    /// store.
    pub fn with_metrics(clock: Arc<dyn Clock>, metrics: Arc<Metrics>) -> Arc<MemoryStore> {
        Arc::new(MemoryStore {
            table: Mutex::new(Table {
                items: BTreeMap::new(),
                next_sequence: 1,
                subscriber: None,
                backlog: Vec::new(),
                rosters: Default::default(),
                counters: Default::default(),
                sweep_lease: (0, 0, String::new()),
            }),
            clock,
            table_name: "roomcast".into(),
            metrics,
            streams: true,
        })
    }

    /// A table without a stream: a dry run's scratch state (replay's presence), never read as a
    /// stream, so it keeps no records.
    pub fn scratch(clock: Arc<dyn Clock>) -> Arc<MemoryStore> {
        let mut store = Self::with_metrics(clock, Arc::default());
        if let Some(store) = Arc::get_mut(&mut store) {
            store.streams = false;
        }
        store
    }

    /// The table's stream: every record written so far and from now on, in write order. One
    /// reader at a time, like one event source mapping; a new subscription replaces the old.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<EventRecord> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut table = self.lock();
        for record in table.backlog.drain(..) {
            let _ = tx.send(record);
        }
        table.subscriber = Some(tx);
        rx
    }

    /// Deletes every item whose TTL has passed, as DynamoDB's TTL process does, emitting REMOVE
    /// records with the service identity. Returns how many items it deleted.
    pub fn expire_due(&self, now: DateTime<Utc>) -> usize {
        let mut table = self.lock();
        let due: Vec<Key> = table
            .items
            .iter()
            .filter(|(_, item)| item_ttl(item).is_some_and(|ttl| is_expired(ttl, now)))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &due {
            self.delete_item(&mut table, key, Actor::TtlService);
        }
        due.len()
    }

    /// Writes an item as it is, bypassing the records' types, with its stream record: what a
    /// newer handler or a console edit does to the table. For tests of items that do not decode.
    pub fn put_raw(&self, item: Item) {
        let mut table = self.lock();
        self.put_item(&mut table, item);
    }

    /// Every item, for tests and the dev stack's inspection.
    pub fn item_count(&self) -> usize {
        self.lock().items.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the map half-written: every mutation is
        // one insert or remove. So a poisoned lock is still a consistent table.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one record as it is (a message, a signal, a message to a user).
    fn put_record<T: serde::Serialize>(&self, record: &T) -> Result<()> {
        let item = encode(record)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }

    fn put_item(&self, table: &mut Table, item: Item) {
        let key = item_key(&item);
        let old = table.items.insert(key.clone(), item.clone());
        self.emit(table, &key, old, Some(item), Actor::Client);
    }

    fn delete_item(&self, table: &mut Table, key: &Key, actor: Actor) -> Option<Item> {
        let old = table.items.remove(key)?;
        self.emit(table, key, Some(old.clone()), None, actor);
        Some(old)
    }

    fn emit(&self, table: &mut Table, key: &Key, old: Option<Item>, new: Option<Item>, actor: Actor) {
        if !self.streams {
            return;
        }
        let event_name = match (&old, &new) {
            (None, Some(_)) => "INSERT",
            (Some(_), Some(_)) => "MODIFY",
            (Some(_), None) => "REMOVE",
            (None, None) => return,
        };
        let sequence = table.next_sequence;
        table.next_sequence += 1;

        let mut change = StreamRecord::default();
        change.approximate_creation_date_time = self.clock.now();
        change.keys = Item::from(std::collections::HashMap::from([
            ("pk".to_string(), AttributeValue::S(key.0.clone())),
            ("sk".to_string(), AttributeValue::S(key.1.clone())),
        ]));
        change.size_bytes = [&old, &new].iter().filter_map(|i| i.as_ref()).map(approximate_size).sum::<usize>() as i64;
        change.new_image = new.unwrap_or_default();
        change.old_image = old.unwrap_or_default();
        change.sequence_number = Some(format!("{sequence:021}"));
        change.stream_view_type = Some(StreamViewType::NewAndOldImages);

        let mut record = EventRecord::default();
        record.aws_region = "local".into();
        record.event_id = uuid::Uuid::new_v4().simple().to_string();
        record.event_name = event_name.into();
        record.event_source = Some("aws:dynamodb".into());
        record.event_version = Some("1.1".into());
        record.event_source_arn =
            Some(format!("arn:aws:dynamodb:local:000000000000:table/{}/stream/embedded", self.table_name));
        if actor == Actor::TtlService {
            let mut identity = UserIdentity::default();
            identity.type_ = "Service".into();
            identity.principal_id = TTL_PRINCIPAL.into();
            record.user_identity = Some(identity);
        }
        record.change = change;

        let delivered = match &table.subscriber {
            Some(tx) => tx.send(record.clone()).is_ok(),
            None => false,
        };
        if !delivered {
            table.subscriber = None;
            table.backlog.push(record);
        }
    }

    /// The record, or `None` (logged and counted) when the item does not decode.
    fn decode<T: DeserializeOwned>(&self, item: &Item) -> Option<T> {
        decode_or_skip(item.clone(), &self.metrics)
    }

    /// The record under `key`; `None` when there is none or it does not decode.
    fn get<T: DeserializeOwned>(&self, table: &Table, key: &Key) -> Option<T> {
        table.items.get(key).and_then(|item| self.decode(item))
    }

    /// Sets (or, with `None`, removes) attributes of an existing item as it is, decoding or not,
    /// as DynamoDB's update expressions do; returns the new item, or `None` when there is none.
    fn update(&self, table: &mut Table, key: &Key, set: &[(&str, Option<AttributeValue>)]) -> Option<Item> {
        let mut item = table.items.get(key)?.clone();
        for (name, value) in set {
            match value {
                Some(value) => item.insert(name.to_string(), value.clone()),
                None => item.remove(*name),
            };
        }
        self.put_item(table, item.clone());
        Some(item)
    }
}

/// Moves the room's roster version on, under the same lock as the membership write it follows
/// (the DynamoDB adapter's bump is a write of its own, after).
fn bump(table: &mut Table, tenant: &str, room: &str) {
    *table.rosters.entry(model::room_pk(tenant, room)).or_default() += 1;
}

fn encode<T: Serialize>(value: &T) -> Result<Item> {
    let item =
        serde_dynamo::to_item(value).map_err(|e| StoreError::Unavailable(format!("cannot encode record: {e}")))?;
    Ok(model::with_sweep_keys(item))
}

fn item_key(item: &Item) -> Key {
    let s = |name: &str| match item.get(name) {
        Some(AttributeValue::S(s)) => s.clone(),
        _ => String::new(),
    };
    (s("pk"), s("sk"))
}

fn item_ttl(item: &Item) -> Option<i64> {
    match item.get("ttl") {
        Some(AttributeValue::N(n)) => n.parse().ok(),
        _ => None,
    }
}

fn approximate_size(item: &Item) -> usize {
    serde_json::to_vec(item).map(|v| v.len()).unwrap_or(0)
}

fn connection_key(id: &str) -> Key {
    (model::connection_pk(id), model::CONNECTION_SK.to_string())
}

fn membership_key(tenant: &str, room: &str, connection_id: &str) -> Key {
    (model::room_pk(tenant, room), model::membership_sk(connection_id))
}
