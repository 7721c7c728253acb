//! The embedded store: the table in memory, with a stream.
//!
//! Every write appends a stream record in DynamoDB Streams' own shape (the `aws_lambda_events`
//! types, `NEW_AND_OLD_IMAGES`), in write order, with increasing sequence numbers. Items are kept
//! as DynamoDB items (`serde_dynamo::Item`), so the images are exactly what DynamoDB would emit.
//! [`MemoryStore::expire_due`] plays DynamoDB's TTL process: it deletes expired items and emits
//! REMOVE records with the service identity (`userIdentity {type: Service, principalId:
//! dynamodb.amazonaws.com}`).

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
    /// refresh (`Store::bump_roster`): kept out of the item map, so that bumps make no stream
    /// records here (on DynamoDB they make records the processor skips as state).
    rosters: std::collections::HashMap<String, u64>,
    /// Rate-limit counters by key and window (`Store::count_in_window`), likewise kept out of the
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

#[async_trait]
impl ConnectionStore for MemoryStore {
    async fn put_connection(&self, conn: &Connection, memberships: &[Membership]) -> Result<()> {
        let items = std::iter::once(encode(conn)).chain(memberships.iter().map(encode)).collect::<Result<Vec<_>>>()?;
        let mut table = self.lock();
        for item in items {
            self.put_item(&mut table, item);
        }
        for m in memberships {
            bump(&mut table, &m.tenant, &m.room);
        }
        Ok(())
    }

    async fn get_connection(&self, connection_id: &str, now: DateTime<Utc>) -> Result<Option<Connection>> {
        let table = self.lock();
        let conn: Option<Connection> = self.get(&table, &connection_key(connection_id));
        Ok(conn.filter(|c| !is_expired(c.ttl, now)))
    }

    async fn delete_connection(&self, connection_id: &str, reason: Option<LeftReason>) -> Result<Option<Connection>> {
        let mut table = self.lock();
        let key = connection_key(connection_id);
        if let Some(reason) = reason {
            self.update(&mut table, &key, &[("closeReason", Some(AttributeValue::S(reason.as_str().into())))]);
        }
        Ok(self.delete_item(&mut table, &key, Actor::Client).and_then(|old| self.decode(&old)))
    }

    async fn touch(&self, conn: &Connection, now: DateTime<Utc>, ttl: i64) -> Result<()> {
        let mut table = self.lock();
        let Some(mut current) = self.get::<Connection>(&table, &connection_key(&conn.connection_id)) else {
            return Err(StoreError::NoConnection(conn.connection_id.clone()));
        };
        current.last_seen_at = now;
        current.ttl = ttl;
        current.sweep_pk.get_or_insert_with(|| model::sweep_pk(&current.connection_id));
        let item = encode(&current)?;
        self.put_item(&mut table, item);
        for room in &current.rooms {
            let key = membership_key(&current.tenant, room, &current.connection_id);
            self.update(&mut table, &key, &[("ttl", Some(AttributeValue::N(ttl.to_string())))]);
        }
        Ok(())
    }

    async fn user_connections(&self, tenant: &str, user_id: &str, now: DateTime<Utc>) -> Result<Vec<Connection>> {
        let table = self.lock();
        let gsi1pk = model::user_gsi1pk(tenant, user_id);
        let mut found = Vec::new();
        for item in table.items.values() {
            if matches!(item.get("gsi1pk"), Some(AttributeValue::S(k)) if *k == gsi1pk)
                && matches!(item.get("type"), Some(AttributeValue::S(t)) if t == "connection")
                && let Some(c) = self.decode::<Connection>(item)
                && !is_expired(c.ttl, now)
            {
                found.push(c);
            }
        }
        Ok(found)
    }

    async fn scan_connections(&self, limit: usize, after: Option<&str>) -> Result<Vec<Connection>> {
        let table = self.lock();
        let from = match after {
            Some(id) => std::ops::Bound::Excluded(connection_key(id)),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = Vec::new();
        for (key, item) in table.items.range((from, std::ops::Bound::Unbounded)) {
            if page.len() == limit {
                break;
            }
            if ItemKind::of(&key.0, &key.1) == Some(ItemKind::Connection) {
                page.extend(self.decode(item));
            }
        }
        Ok(page)
    }

    async fn set_status(&self, connection_id: &str, status: &str) -> Result<Option<Connection>> {
        let mut table = self.lock();
        let set = [("status", Some(AttributeValue::S(status.to_string())))];
        Ok(self.update(&mut table, &connection_key(connection_id), &set).and_then(|item| self.decode(&item)))
    }
}

#[async_trait]
impl MembershipStore for MemoryStore {
    async fn join(&self, membership: &Membership) -> Result<bool> {
        let mut table = self.lock();
        let key = connection_key(&membership.connection_id);
        let Some(mut conn) = self.get::<Connection>(&table, &key) else {
            return Err(StoreError::NoConnection(membership.connection_id.clone()));
        };
        let member_key = membership_key(&membership.tenant, &membership.room, &membership.connection_id);
        let existing: Option<Membership> = self.get(&table, &member_key);
        if existing.is_some_and(|m| !is_expired(m.ttl, membership.joined_at)) {
            return Ok(false);
        }
        let member_item = encode(membership)?;
        self.put_item(&mut table, member_item);
        bump(&mut table, &membership.tenant, &membership.room);
        let pending = membership.pending == Some(true) && conn.pending_rooms.insert(membership.room.clone());
        if pending {
            conn.authorize_joins = true;
        }
        if conn.rooms.insert(membership.room.clone()) || pending {
            let item = encode(&conn)?;
            self.put_item(&mut table, item);
        }
        Ok(true)
    }

    async fn settle_join(&self, m: &Membership, allowed: bool) -> Result<bool> {
        // Under the lock, one atomic step (the DynamoDB adapter's order makes it retryable).
        let mut table = self.lock();
        let key = membership_key(&m.tenant, &m.room, &m.connection_id);
        let current: Option<Membership> = self.get(&table, &key);
        let same =
            current.is_some_and(|c| c.pending == m.pending && (m.joined_ns.is_none() || c.joined_ns == m.joined_ns));
        if !same {
            return Ok(false);
        }
        if allowed {
            if m.pending != Some(true) {
                return Ok(true);
            }
            self.update(&mut table, &key, &[("pending", None)]);
        } else {
            self.update(
                &mut table,
                &key,
                &[("leftReason", Some(AttributeValue::S(LeftReason::Denied.as_str().into())))],
            );
            self.delete_item(&mut table, &key, Actor::Client);
        }
        bump(&mut table, &m.tenant, &m.room);
        if let Some(mut conn) = self.get::<Connection>(&table, &connection_key(&m.connection_id)) {
            conn.pending_rooms.remove(&m.room);
            if allowed {
                conn.denied_rooms.remove(&m.room);
            } else {
                conn.rooms.remove(&m.room);
                conn.denied_rooms.insert(m.room.clone());
                // A denial of a join that did not wait also marks its connection.
                conn.authorize_joins = true;
            }
            let item = encode(&conn)?;
            self.put_item(&mut table, item);
        }
        Ok(true)
    }

    async fn leave(&self, connection_id: &str, tenant: &str, room: &str) -> Result<()> {
        let mut table = self.lock();
        let key = connection_key(connection_id);
        let Some(mut conn) = self.get::<Connection>(&table, &key) else {
            return Err(StoreError::NoConnection(connection_id.into()));
        };
        self.delete_item(&mut table, &membership_key(tenant, room, connection_id), Actor::Client);
        bump(&mut table, tenant, room);
        if conn.rooms.remove(room) | conn.pending_rooms.remove(room) {
            let item = encode(&conn)?;
            self.put_item(&mut table, item);
        }
        Ok(())
    }

    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>> {
        let table = self.lock();
        let pk = model::room_pk(tenant, room);
        let from = (pk.clone(), "CONN#".to_string());
        let to = (pk, "CONN$".to_string());
        let mut members = Vec::new();
        for item in table.items.range(from..to).map(|(_, item)| item) {
            if let Some(m) = self.decode::<Membership>(item)
                && !is_expired(m.ttl, now)
            {
                members.push(m);
            }
        }
        Ok(members)
    }

    async fn bump_roster(&self, tenant: &str, room: &str) -> Result<()> {
        bump(&mut self.lock(), tenant, room);
        Ok(())
    }

    async fn roster_version(&self, tenant: &str, room: &str) -> Result<Option<u64>> {
        Ok(self.lock().rosters.get(&model::room_pk(tenant, room)).copied())
    }

    async fn remove_membership(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        let mut table = self.lock();
        let key = membership_key(tenant, room, connection_id);
        if self.update(&mut table, &key, &[("leftReason", Some(AttributeValue::S(reason.as_str().into())))]).is_some() {
            self.delete_item(&mut table, &key, Actor::Client);
        }
        bump(&mut table, tenant, room);
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for MemoryStore {
    async fn put_message(&self, message: &Message) -> Result<()> {
        let item = encode(message)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }

    async fn put_signal(&self, signal: &crate::model::Signal) -> Result<()> {
        let item = encode(signal)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }

    async fn history_page(
        &self,
        tenant: &str,
        room: &str,
        from: &HistoryFrom,
        limit: usize,
        now: DateTime<Utc>,
        viewer: Option<&str>,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        let mut bytes = 0usize;
        use std::ops::Bound::{Excluded, Included};
        let table = self.lock();
        let pk = model::room_pk(tenant, room);
        let key = |sk: &str| (pk.clone(), sk.to_string());
        let (lo, hi) = match from {
            HistoryFrom::Latest => (Included(key(MESSAGES_FROM)), Excluded(key(MESSAGES_TO))),
            HistoryFrom::Before(sk) => (Included(key(MESSAGES_FROM)), Excluded(key(sk))),
            HistoryFrom::After(sk) => (Excluded(key(sk)), Excluded(key(MESSAGES_TO))),
        };
        if matches!((&lo, &hi), (Included(a) | Excluded(a), Excluded(b)) if a >= b) {
            return Ok(Vec::new());
        }
        let range = table.items.range((lo, hi)).map(|(_, item)| item);
        let items: Box<dyn Iterator<Item = &Item>> =
            if matches!(from, HistoryFrom::After(_)) { Box::new(range) } else { Box::new(range.rev()) };
        let mut page = Vec::new();
        for item in items {
            if let Some(m) = self.decode::<Message>(item)
                && !is_expired(m.ttl, now)
                && m.rejected.is_none()
                && m.visible_to(viewer)
            {
                bytes = bytes.saturating_add(m.delivered_body.as_ref().unwrap_or(&m.body).len());
                page.push(m);
                if page.len() == limit || bytes > max_bytes {
                    break;
                }
            }
        }
        if !matches!(from, HistoryFrom::After(_)) {
            page.reverse();
        }
        Ok(page)
    }

    async fn put_message_once(
        &self,
        message: &Message,
        record: &IdempotencyRecord,
        now: DateTime<Utc>,
    ) -> Result<Message> {
        let mut table = self.lock();
        let key = (record.pk.clone(), record.sk.clone());
        if let Some(earlier) = self.get::<IdempotencyRecord>(&table, &key)
            && !is_expired(earlier.ttl, now)
        {
            let original = (earlier.message.pk.clone(), earlier.message.sk.clone());
            if !table.items.contains_key(&original) {
                let item = encode(&earlier.message)?;
                self.put_item(&mut table, item);
            }
            return Ok(earlier.message);
        }
        let (record_item, message_item) = (encode(record)?, encode(message)?);
        self.put_item(&mut table, record_item);
        self.put_item(&mut table, message_item);
        Ok(message.clone())
    }

    async fn mark_message(&self, tenant: &str, room: &str, sk: &str, verdict: &crate::model::Verdict) -> Result<()> {
        let mut table = self.lock();
        let (name, value) = match verdict {
            crate::model::Verdict::Rejected(reason) => ("rejected", AttributeValue::S(reason.clone())),
            crate::model::Verdict::Rewritten(text) => ("deliveredBody", AttributeValue::S(text.clone())),
            crate::model::Verdict::Audience(users) => {
                ("onlyUsers", AttributeValue::L(users.iter().map(|u| AttributeValue::S(u.clone())).collect()))
            }
        };
        self.update(&mut table, &(model::room_pk(tenant, room), sk.to_string()), &[(name, Some(value))]);
        Ok(())
    }

    async fn message(&self, tenant: &str, room: &str, sk: &str, now: DateTime<Utc>) -> Result<Option<Message>> {
        let table = self.lock();
        let message: Option<Message> = self.get(&table, &(model::room_pk(tenant, room), sk.to_string()));
        Ok(message.filter(|m| !is_expired(m.ttl, now)))
    }
}

#[async_trait]
impl PresenceStore for MemoryStore {
    async fn scan_presence(&self, limit: usize, after: Option<(String, String)>) -> Result<Vec<Presence>> {
        let table = self.lock();
        let from = match after {
            Some(key) => std::ops::Bound::Excluded(key),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = Vec::new();
        for (key, item) in table.items.range((from, std::ops::Bound::Unbounded)) {
            if page.len() == limit {
                break;
            }
            if key.0.starts_with("PRESENCE#") && ItemKind::of(&key.0, &key.1) == Some(ItemKind::Presence) {
                page.extend(self.decode::<Presence>(item).filter(|p| p.present()));
            }
        }
        Ok(page)
    }

    async fn put_presence_suspects(&self, p: &Presence) -> Result<bool> {
        let mut table = self.lock();
        let current: Option<Presence> = self.get(&table, &(p.pk.clone(), p.sk.clone()));
        if current.is_none_or(|c| c.ver + 1 != p.ver) {
            return Ok(false);
        }
        let item = encode(p)?;
        self.put_item(&mut table, item);
        Ok(true)
    }

    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> Result<()> {
        let mut table = self.lock();
        let key = (model::presence_pk(tenant, room), model::presence_sk(user_id));
        if let Some(mut p) = self.get::<Presence>(&table, &key) {
            p.announced = false;
            p.ver += 1;
            let item = encode(&p)?;
            self.put_item(&mut table, item);
        }
        Ok(())
    }

    async fn apply_presence(&self, update: &PresenceUpdate) -> Result<PresenceOutcome> {
        // Under the lock: the read, the plan and its writes are one atomic step.
        let mut table = self.lock();
        let user_key = (model::presence_pk(&update.tenant, &update.room), model::presence_sk(&update.user_id));
        let room_key = (user_key.0.clone(), model::ROOM_PRESENCE_SK.to_string());
        let current: Option<Presence> = self.get(&table, &user_key);
        let room: Option<RoomPresence> = self.get(&table, &room_key);
        match crate::presence::plan(update, current.as_ref(), room.as_ref()) {
            Plan::Done(outcome) => Ok(outcome),
            Plan::Write { presence, room, outcome, .. } => {
                match presence {
                    Some(p) => {
                        let item = encode(&p)?;
                        self.put_item(&mut table, item);
                    }
                    None => {
                        self.delete_item(&mut table, &user_key, Actor::Client);
                    }
                }
                if let Some(room) = room {
                    let item = encode(&room)?;
                    self.put_item(&mut table, item);
                }
                Ok(outcome)
            }
        }
    }

    async fn who(&self, tenant: &str, room: &str, limit: usize, after: Option<&str>) -> Result<WhoPage> {
        let table = self.lock();
        let pk = model::presence_pk(tenant, room);
        let from = match after {
            Some(user) => std::ops::Bound::Excluded((pk.clone(), model::presence_sk(user))),
            None => std::ops::Bound::Included((pk.clone(), "USER#".to_string())),
        };
        let to = std::ops::Bound::Excluded((pk.clone(), "USER$".to_string()));
        let mut page = WhoPage::default();
        for (_, item) in table.items.range((from, to)) {
            let Some(p) = self.decode::<Presence>(item) else { continue };
            // A tombstone (the user left; their connections' marks kept a while) is not a user here.
            if !p.present() {
                continue;
            }
            if page.users.len() == limit {
                page.next = page.users.last().map(|(user, _)| user.clone());
                break;
            }
            page.versions.push(p.version);
            page.users.push((p.user_id, p.connections.len()));
        }
        page.total =
            self.get::<RoomPresence>(&table, &(pk, model::ROOM_PRESENCE_SK.to_string())).map_or(0, |r| r.users);
        Ok(page)
    }

    async fn presence(&self, tenant: &str, room: &str, user_id: &str) -> Result<Option<Presence>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::presence_pk(tenant, room), model::presence_sk(user_id))))
    }

    async fn room_presence(&self, tenant: &str, room: &str) -> Result<Option<RoomPresence>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::presence_pk(tenant, room), model::ROOM_PRESENCE_SK.to_string())))
    }
}

#[async_trait]
impl PluginStore for MemoryStore {
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> Result<()> {
        let mut table = self.lock();
        let key = (model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.to_string());
        if self.get::<PluginActive>(&table, &key).is_some_and(|a| a.version == version) {
            self.update(&mut table, &key, &[("authorizesJoins", Some(AttributeValue::Bool(authorizes)))]);
        }
        Ok(())
    }

    async fn put_plugin(&self, meta: &PluginMeta, chunks: &[PluginChunk]) -> Result<()> {
        let items = chunks.iter().map(encode).chain(std::iter::once(encode(meta))).collect::<Result<Vec<_>>>()?;
        let mut table = self.lock();
        for item in items {
            self.put_item(&mut table, item);
        }
        Ok(())
    }

    async fn plugin_bytes(&self, tenant: &str, version: &str, chunks: usize) -> Result<Option<Vec<u8>>> {
        let table = self.lock();
        let mut bytes = Vec::new();
        let mut sk: fn(&str, usize) -> String = model::plugin_chunk_sk;
        for index in 0..chunks {
            if index == 0 && !table.items.contains_key(&(model::tenant_pk(tenant), sk(version, 0))) {
                sk = model::legacy_plugin_chunk_sk;
            }
            let key = (model::tenant_pk(tenant), sk(version, index));
            match self.get::<PluginChunk>(&table, &key) {
                Some(chunk) => bytes.extend_from_slice(&chunk.data),
                None => return Ok(None),
            }
        }
        Ok(Some(bytes))
    }

    async fn plugin(&self, tenant: &str, version: &str) -> Result<Option<PluginMeta>> {
        let table = self.lock();
        Ok(self.get::<PluginMeta>(&table, &(model::tenant_pk(tenant), model::plugin_meta_sk(version))))
    }

    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginMeta>> {
        let table = self.lock();
        let pk = model::tenant_pk(tenant);
        let mut metas: Vec<PluginMeta> = Vec::new();
        for (key, item) in table.items.range((pk.clone(), "PLUGIN#".to_string())..(pk, "PLUGIN$".to_string())) {
            if ItemKind::of(&key.0, &key.1) == Some(ItemKind::PluginMeta) {
                metas.extend(self.decode(item));
            }
        }
        metas.sort_by_key(|m| m.uploaded_at);
        Ok(metas)
    }

    async fn set_plugin_status(
        &self,
        tenant: &str,
        version: &str,
        status: PluginStatus,
        reason: Option<&str>,
    ) -> Result<()> {
        let mut table = self.lock();
        let key = (model::tenant_pk(tenant), model::plugin_meta_sk(version));
        let status = serde_dynamo::to_attribute_value(status)
            .map_err(|e| StoreError::Unavailable(format!("cannot encode a plugin status: {e}")))?;
        let reason = reason.map(|r| AttributeValue::S(r.to_string()));
        self.update(&mut table, &key, &[("status", Some(status)), ("reason", reason)]);
        Ok(())
    }

    async fn active_plugin(&self, tenant: &str) -> Result<Option<PluginActive>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.to_string())))
    }

    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> Result<()> {
        let mut table = self.lock();
        let key = (model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.to_string());
        match version {
            Some(version) => {
                let item = encode(&PluginActive::new(tenant, version))?;
                self.put_item(&mut table, item);
            }
            None => {
                self.delete_item(&mut table, &key, Actor::Client);
            }
        }
        Ok(())
    }

    async fn plugin_config(&self, tenant: &str) -> Result<Option<model::PluginConfig>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::tenant_pk(tenant), model::PLUGIN_CONFIG_SK.to_string())))
    }

    async fn put_plugin_config(&self, config: &model::PluginConfig) -> Result<()> {
        let mut table = self.lock();
        if config.values.is_empty() {
            self.delete_item(&mut table, &(config.pk.clone(), config.sk.clone()), Actor::Client);
        } else {
            let item = encode(config)?;
            self.put_item(&mut table, item);
        }
        Ok(())
    }
}

#[async_trait]
impl TenantStore for MemoryStore {
    async fn tenant_settings(&self, tenant: &str) -> Result<Option<TenantSettings>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::tenant_pk(tenant), model::SETTINGS_SK.to_string())))
    }

    async fn tenant_identity(&self, tenant: &str) -> Result<Option<crate::model::TenantIdentity>> {
        let table = self.lock();
        let key = (model::tenant_pk(tenant), crate::model::IDENTITY_SK.to_string());
        let identity = self.get(&table, &key);
        if identity.is_none() && table.items.contains_key(&key) {
            // One that does not decode must not read as "none" (the shared secret would admit).
            return Err(StoreError::Unavailable(format!("{tenant}'s identity item does not decode")));
        }
        Ok(identity)
    }

    async fn put_tenant_identity(&self, identity: &crate::model::TenantIdentity) -> Result<()> {
        let item = encode(identity)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }

    async fn put_tenant_settings(&self, settings: &TenantSettings) -> Result<()> {
        let item = encode(settings)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }
}

#[async_trait]
impl UpkeepStore for MemoryStore {
    async fn count_in_window(&self, key: &str, window: i64) -> Result<u64> {
        let mut table = self.lock();
        if table.counters.len() > 100_000 {
            table.counters.retain(|(_, w), _| *w >= window - 1);
        }
        let count = table.counters.entry((key.to_string(), window)).or_default();
        *count += 1;
        Ok(*count)
    }

    async fn stale_connections(&self, shard: u32, cutoff: DateTime<Utc>) -> Result<Vec<Connection>> {
        let table = self.lock();
        let key = model::sweep_shard_pk(shard);
        let mut found: Vec<Connection> = table
            .items
            .values()
            .filter(|item| matches!(item.get("sweepPk"), Some(AttributeValue::S(k)) if *k == key))
            .filter_map(|item| self.decode::<Connection>(item))
            .filter(|c| c.last_seen_at < cutoff)
            .collect();
        found.sort_by_key(|c| c.last_seen_at);
        Ok(found)
    }

    async fn present_users(&self, shard: u32) -> Result<Vec<Presence>> {
        let table = self.lock();
        let key = format!("SWEEP#P{shard:02}");
        Ok(table
            .items
            .values()
            .filter(|item| matches!(item.get("sweepPk"), Some(AttributeValue::S(k)) if *k == key))
            .filter_map(|item| self.decode::<Presence>(item))
            .filter(|p| p.present())
            .collect())
    }

    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> Result<Option<u32>> {
        let mut table = self.lock();
        if table.sweep_lease.0 >= now {
            return Ok(None);
        }
        table.sweep_lease.0 = until;
        table.sweep_lease.2 = owner.to_string();
        Ok(Some(table.sweep_lease.1))
    }

    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> Result<bool> {
        let mut table = self.lock();
        if table.sweep_lease.2 != owner {
            return Ok(false);
        }
        table.sweep_lease.1 = next_shard % model::SWEEP_SHARDS;
        if release {
            table.sweep_lease.0 = 0;
        }
        Ok(true)
    }

    async fn mark_seen(&self, connection_id: &str, now: DateTime<Utc>) -> Result<()> {
        let mut table = self.lock();
        let key = connection_key(connection_id);
        self.update(&mut table, &key, &[("lastSeenAt", Some(AttributeValue::S(model::format_ts(&now))))]);
        Ok(())
    }

    async fn fanout_progress(&self, key: &str) -> Result<Option<model::FanoutProgress>> {
        let table = self.lock();
        Ok(self.get(&table, &(model::fanout_pk(key), model::FANOUT_PROGRESS_SK.to_string())))
    }

    async fn put_fanout_progress(&self, progress: &model::FanoutProgress) -> Result<()> {
        let item = encode(progress)?;
        let mut table = self.lock();
        self.put_item(&mut table, item);
        Ok(())
    }
}
