//! The DynamoDB adapter: `aws-sdk-dynamodb` with `serde_dynamo` for the items.
//!
//! Multi-item operations are `TransactWriteItems`, so that a connection and its memberships (or
//! a membership and the connection's `rooms` set) never disagree. Reads are strongly consistent
//! and filter `ttl <= now` on our side: DynamoDB's TTL deletes lazily.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    KeysAndAttributes, Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType, StreamSpecification,
    StreamViewType, TableStatus, TimeToLiveSpecification, TransactWriteItem, Update,
};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    ConnectionStore, HistoryFrom, HistoryStore, MESSAGES_FROM, MESSAGES_TO, MembershipStore, PluginStore,
    PresenceStore, Result, StoreError, TenantStore, UpkeepStore, decode_or_skip,
};
use crate::metrics::Metrics;
use crate::model::{
    self, Connection, IdempotencyRecord, LeftReason, Membership, Message, PluginActive, PluginChunk, PluginMeta,
    PluginStatus, Presence, RoomPresence, TenantSettings, format_ts, is_expired,
};
use crate::presence::{Plan, PresenceOutcome, PresenceUpdate, WhoPage};

/// How often a presence write that lost a race is planned again before the record is failed
/// (and redelivered). Records of one room are processed in order, so races are rare: a second
/// processor during a shard's hand-over, or an operator's tool.
const PRESENCE_ATTEMPTS: usize = 32;

pub const GSI1: &str = "gsi1";
/// The sweeper's sparse index: `sweepPk` / `lastSeenAt`: connections (`SWEEP#00`…) and present
/// users' presence items (`SWEEP#P00`…), nothing else.
pub const SWEEP_INDEX: &str = "sweep";

mod provision;
pub use provision::{TableInfo, create_table, wait_until_active};

type DynamoItem = HashMap<String, AttributeValue>;

#[derive(Clone, Debug)]
pub struct DynamoStore {
    client: Client,
    table: String,
    /// Where items that do not decode are counted (`corrupt_items`).
    metrics: Arc<Metrics>,
}

impl DynamoStore {
    async fn get_chunk(&self, tenant: &str, sk: &str) -> Result<Option<PluginChunk>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(model::tenant_pk(tenant), sk.to_string())))
            .send()
            .await
            .map_err(|e| unavailable("get_item (plugin chunk)", e))?;
        Ok(out.item.and_then(|item| self.decode::<PluginChunk>(item)))
    }

    /// The table this store reads and writes.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// A store that counts items that do not decode on its own (only the log line tells);
    /// [`DynamoStore::with_metrics`] counts them with a processor's.
    pub fn new(client: Client, table: impl Into<String>) -> DynamoStore {
        DynamoStore { client, table: table.into(), metrics: Arc::default() }
    }

    /// Counts items that do not decode in `metrics`: the processor's, when it reads through this
    /// store.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> DynamoStore {
        DynamoStore { metrics, ..self }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Bumps the room's roster version, right after a write that added, removed or changed one
    /// of its memberships, and before that write is acknowledged to anyone. Never inside the
    /// write's transaction: in a join storm, transactions on the one version item would cancel
    /// each other (`TransactionConflict`), while plain updates of it simply queue. After, not
    /// before: until the write is acknowledged, a message may or may not reach the member, with
    /// or without a cache. The processor's redelivered settlements and removals bump again; a
    /// bump lost between a handler's write and its answer is bounded by `roster::MAX_AGE`.
    async fn bump_now(&self, tenant: &str, room: &str) -> Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(roster_key(tenant, room)))
            .update_expression("ADD v :one SET #type = :type")
            .expression_attribute_names("#type", "type")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":type", s("roster"))
            .send()
            .await
            .map_err(|e| unavailable("update_item (roster version)", e))?;
        Ok(())
    }

    fn put(&self, item: DynamoItem) -> Result<TransactWriteItem> {
        let put = Put::builder().table_name(&self.table).set_item(Some(item)).build().map_err(build_error)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    async fn transact(&self, what: &str, connection_id: &str, items: Vec<TransactWriteItem>) -> Result<()> {
        match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => Ok(()),
            Err(err) => {
                if let SdkError::ServiceError(service) = &err
                    && let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err()
                    && cancel.cancellation_reasons().iter().any(|r| r.code() == Some("ConditionalCheckFailed"))
                {
                    return Err(StoreError::NoConnection(connection_id.to_string()));
                }
                Err(unavailable(what, err))
            }
        }
    }

    /// Up to `limit` items of one `type` (`filter` names it `:type`), strongly consistent, after
    /// the item key `start`; one that does not decode is passed over (logged and counted).
    async fn scan_typed<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        filter: &str,
        record_type: &str,
        limit: usize,
        mut start: Option<DynamoItem>,
    ) -> Result<Vec<T>> {
        let mut page_out = Vec::new();
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .filter_expression(filter)
                .expression_attribute_names("#t", "type")
                .expression_attribute_values(":type", s(record_type))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable(what, e))?;
            for item in page.items.unwrap_or_default() {
                page_out.extend(self.decode::<T>(item));
                if page_out.len() == limit {
                    return Ok(page_out);
                }
            }
            match page.last_evaluated_key {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => return Ok(page_out),
            }
        }
    }

    /// Sets one attribute on an item if it exists; a missing item is not an error.
    async fn mark(&self, key: DynamoItem, attribute: &str, value: AttributeValue) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression("SET #a = :v")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#a", attribute)
            .expression_attribute_values(":v", value)
            .send()
            .await;
        written("update_item", result).map(|_| ())
    }

    /// Writes a message unless it is there already (a first send and its repeat may both try).
    async fn put_if_absent(&self, message: &Message) -> Result<()> {
        let put = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(message)?))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        written("put_item (idempotent message)", put).map(|_| ())
    }

    /// One item by key, strongly consistent, decoded (`None` when absent or it does not decode).
    async fn get_typed<T: DeserializeOwned>(&self, what: &str, key: DynamoItem) -> Result<Option<T>> {
        Ok(self.get_guarded(what, key).await?.0)
    }

    /// One item by key, strongly consistent: decoded, and whether an item is there at all (one
    /// that does not decode is logged and counted, and reads as `(None, true)`).
    async fn get_guarded<T: DeserializeOwned>(&self, what: &str, key: DynamoItem) -> Result<(Option<T>, bool)> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key))
            .send()
            .await
            .map_err(|e| unavailable(what, e))?;
        Ok(match out.item {
            Some(item) => (self.decode(item), true),
            None => (None, false),
        })
    }

    /// The write of a room's presence item, on the condition that it is still as read: its
    /// version, absent, or one that did not decode.
    fn room_presence_write(&self, next: &RoomPresence, guard: Guard) -> Result<TransactWriteItem> {
        let (condition, value) = guard.condition();
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(encode(next)?))
            .set_condition_expression(condition.map(str::to_string))
            .set_expression_attribute_values(value.map(|v| HashMap::from([(":ver".to_string(), v)])))
            .build()
            .map_err(build_error)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The write of a presence item: a put or a delete, on the condition that the item still has
    /// the version that was read (or, for a new one, does not exist; for one that did not decode,
    /// none: it is replaced).
    fn presence_write(&self, key: DynamoItem, next: Option<&Presence>, guard: Guard) -> Result<TransactWriteItem> {
        let (condition, value) = guard.condition();
        Ok(match next {
            Some(p) => TransactWriteItem::builder()
                .put(
                    Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(encode(p)?))
                        .set_condition_expression(condition.map(str::to_string))
                        .set_expression_attribute_values(value.map(|v| HashMap::from([(":ver".to_string(), v)])))
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
            None => TransactWriteItem::builder()
                .delete(
                    Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key))
                        .set_condition_expression(condition.map(str::to_string))
                        .set_expression_attribute_values(value.map(|v| HashMap::from([(":ver".to_string(), v)])))
                        .build()
                        .map_err(build_error)?,
                )
                .build(),
        })
    }

    /// Carries out a plan's writes: one conditional put or delete, or a transaction of them.
    /// `Ok(false)`: a condition failed (someone else wrote first).
    async fn write_plan(&self, writes: Vec<TransactWriteItem>) -> Result<bool> {
        if let [write] = writes.as_slice() {
            return match (&write.put, &write.delete) {
                (Some(put), _) => {
                    let sent = self
                        .client
                        .put_item()
                        .table_name(&put.table_name)
                        .set_item(Some(put.item.clone()))
                        .set_condition_expression(put.condition_expression.clone())
                        .set_expression_attribute_values(put.expression_attribute_values.clone())
                        .send()
                        .await;
                    written("put_item (presence)", sent)
                }
                (None, Some(delete)) => {
                    let sent = self
                        .client
                        .delete_item()
                        .table_name(&delete.table_name)
                        .set_key(Some(delete.key.clone()))
                        .set_condition_expression(delete.condition_expression.clone())
                        .set_expression_attribute_values(delete.expression_attribute_values.clone())
                        .send()
                        .await;
                    written("delete_item (presence)", sent)
                }
                (None, None) => Ok(true),
            };
        }
        match self.client.transact_write_items().set_transact_items(Some(writes)).send().await {
            Ok(_) => Ok(true),
            Err(err) => {
                if let SdkError::ServiceError(service) = &err
                    && let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err()
                    && cancel.cancellation_reasons().iter().any(|r| {
                        matches!(
                            r.code(),
                            Some(
                                "ConditionalCheckFailed"
                                    | "TransactionConflict"
                                    | "ThrottlingError"
                                    | "ProvisionedThroughputExceeded"
                            )
                        )
                    })
                {
                    Ok(false)
                } else {
                    Err(unavailable("transact_write_items (presence)", err))
                }
            }
        }
    }

    /// The presence items of `users` in the room `pk`, strongly consistent, in one `BatchGetItem`
    /// (at most 100 users): the items that decode by user id, and every user who has an item.
    async fn presences(&self, pk: &str, users: &[&str]) -> Result<(HashMap<String, Presence>, HashSet<String>)> {
        let by_sk: HashMap<String, &str> = users.iter().map(|u| (model::presence_sk(u), *u)).collect();
        let mut keys: Vec<DynamoItem> = by_sk.keys().map(|sk| key(pk.to_string(), sk.clone())).collect();
        let (mut found, mut there) = (HashMap::new(), HashSet::new());
        let mut attempts = 0u32;
        while !keys.is_empty() {
            let request = KeysAndAttributes::builder()
                .set_keys(Some(std::mem::take(&mut keys)))
                .consistent_read(true)
                .build()
                .map_err(build_error)?;
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| unavailable("batch_get_item (presence)", e))?;
            for item in out.responses.unwrap_or_default().remove(&self.table).unwrap_or_default() {
                let Some(user) = item.get("sk").and_then(|sk| sk.as_s().ok()).and_then(|sk| by_sk.get(sk)) else {
                    continue;
                };
                there.insert(user.to_string());
                if let Some(p) = self.decode::<Presence>(item) {
                    found.insert(user.to_string(), p);
                }
            }
            // Keys DynamoDB did not get to (the partition's throughput): asked again, backing off.
            if let Some(rest) = out.unprocessed_keys.and_then(|mut m| m.remove(&self.table)) {
                keys = rest.keys;
                attempts += 1;
                if attempts > 8 {
                    return Err(StoreError::Unavailable(format!(
                        "batch_get_item (presence): {} keys still unprocessed after {attempts} attempts",
                        keys.len()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(10 << attempts.min(6))).await;
            }
        }
        Ok((found, there))
    }

    /// The record, or `None` (logged and counted) when the item does not decode.
    fn decode<T: DeserializeOwned>(&self, item: DynamoItem) -> Option<T> {
        decode_or_skip(item, &self.metrics)
    }

    /// Runs a query to the end, page by page, until `keep` says it has enough.
    async fn query_all(&self, spec: QuerySpec<'_>, mut keep: impl FnMut(DynamoItem) -> Result<bool>) -> Result<()> {
        let mut start: Option<DynamoItem> = None;
        let mut size = match (spec.growing, spec.page_size) {
            (true, Some(most)) => Some(most.min(4)),
            (_, size) => size,
        };
        // Growing pages: 4, 8, 16, … and the last one only what is left of `page_size`.
        let mut asked = 0i32;
        loop {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(spec.index.map(str::to_string))
                // Global secondary indexes offer only eventually consistent reads.
                .consistent_read(spec.index.is_none())
                .key_condition_expression(spec.key_condition)
                .set_filter_expression(spec.filter.map(str::to_string))
                .scan_index_forward(!spec.newest_first)
                .set_limit(size)
                .set_exclusive_start_key(start.take());
            if let (true, Some(now), Some(most)) = (spec.growing, size, spec.page_size) {
                asked = asked.saturating_add(now);
                let left = if asked < most { most - asked } else { most };
                size = Some(now.saturating_mul(2).min(left));
            }
            for (name, attribute) in &spec.names {
                query = query.expression_attribute_names(*name, *attribute);
            }
            for (name, value) in &spec.values {
                query = query.expression_attribute_values(*name, value.clone());
            }
            let page = query.send().await.map_err(|e| unavailable("query", e))?;
            for item in page.items.unwrap_or_default() {
                if !keep(item)? {
                    return Ok(());
                }
            }
            match page.last_evaluated_key {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => return Ok(()),
            }
        }
    }
}

/// What a presence write expects of the item it replaces.
#[derive(Clone, Copy, Debug)]
enum Guard {
    /// The version that was read.
    Version(u64),
    /// No item.
    Absent,
    /// An item that did not decode (counted): replaced whatever it holds.
    Undecodable,
}

impl Guard {
    fn of(ver: Option<u64>, there: bool) -> Guard {
        match (ver, there) {
            (Some(ver), _) => Guard::Version(ver),
            (None, false) => Guard::Absent,
            (None, true) => Guard::Undecodable,
        }
    }

    fn condition(self) -> (Option<&'static str>, Option<AttributeValue>) {
        match self {
            Guard::Version(ver) => (Some("ver = :ver"), Some(AttributeValue::N(ver.to_string()))),
            Guard::Absent => (Some("attribute_not_exists(pk)"), None),
            Guard::Undecodable => (None, None),
        }
    }
}

/// What [`DynamoStore::query_all`] asks for.
#[derive(Default)]
struct QuerySpec<'a> {
    index: Option<&'a str>,
    key_condition: &'a str,
    filter: Option<&'a str>,
    names: Vec<(&'a str, &'a str)>,
    values: Vec<(&'a str, AttributeValue)>,
    newest_first: bool,
    /// Items read per page (DynamoDB's `Limit`): without it, a page reads up to 1 MB.
    page_size: Option<i32>,
    /// Pages of 4, 8, 16, … items up to `page_size`: a caller that may stop early reads little.
    growing: bool,
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.to_string())
}

fn key(pk: String, sk: String) -> DynamoItem {
    HashMap::from([("pk".to_string(), AttributeValue::S(pk)), ("sk".to_string(), AttributeValue::S(sk))])
}

fn connection_key(id: &str) -> DynamoItem {
    key(model::connection_pk(id), model::CONNECTION_SK.into())
}

fn roster_key(tenant: &str, room: &str) -> DynamoItem {
    key(model::roster_pk(tenant, room), model::ROSTER_VERSION_SK.into())
}

fn membership_key(tenant: &str, room: &str, connection_id: &str) -> DynamoItem {
    key(model::room_pk(tenant, room), model::membership_sk(connection_id))
}

fn encode<T: Serialize>(value: &T) -> Result<DynamoItem> {
    let item: serde_dynamo::Item =
        serde_dynamo::to_item(value).map_err(|e| StoreError::Unavailable(format!("cannot encode record: {e}")))?;
    Ok(model::with_sweep_keys(item).into())
}

fn unavailable<E, R>(operation: &str, err: SdkError<E, R>) -> StoreError
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug,
{
    StoreError::Unavailable(format!("{operation}: {}", DisplayErrorContext(&err)))
}

/// A conditional write's outcome: `Ok(true)` written, `Ok(false)` its condition did not hold;
/// any other error is the platform's.
fn written<T, E, R>(what: &str, result: std::result::Result<T, SdkError<E, R>>) -> Result<bool>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match result {
        Ok(_) => Ok(true),
        Err(err) if err.as_service_error().and_then(|e| e.code()) == Some("ConditionalCheckFailedException") => {
            Ok(false)
        }
        Err(err) => Err(unavailable(what, err)),
    }
}

fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::Unavailable(format!("cannot build request: {e}"))
}

fn string_set(value: &str) -> AttributeValue {
    AttributeValue::Ss(vec![value.to_string()])
}

#[async_trait]
impl ConnectionStore for DynamoStore {
    async fn put_connection(&self, conn: &Connection, memberships: &[Membership]) -> Result<()> {
        let mut items = vec![self.put(encode(conn)?)?];
        for m in memberships {
            items.push(self.put(encode(m)?)?);
        }
        self.transact("put_connection", &conn.connection_id, items).await?;
        let bumps = memberships.iter().map(|m| self.bump_now(&m.tenant, &m.room));
        futures::future::try_join_all(bumps).await.map(|_| ())
    }

    async fn get_connection(&self, connection_id: &str, now: DateTime<Utc>) -> Result<Option<Connection>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(connection_key(connection_id)))
            .send()
            .await
            .map_err(|e| unavailable("get_item", e))?;
        let conn: Option<Connection> = out.item.and_then(|item| self.decode(item));
        Ok(conn.filter(|c| !is_expired(c.ttl, now)))
    }

    async fn delete_connection(&self, connection_id: &str, reason: Option<LeftReason>) -> Result<Option<Connection>> {
        if let Some(reason) = reason {
            self.mark(connection_key(connection_id), "closeReason", s(reason.as_str())).await?;
        }
        let out = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(|e| unavailable("delete_item", e))?;
        Ok(out.attributes.filter(|a| !a.is_empty()).and_then(|item| self.decode(item)))
    }

    async fn touch(&self, conn: &Connection, now: DateTime<Utc>, ttl: i64) -> Result<()> {
        let refresh = |key: DynamoItem, set: &str| {
            let mut update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key))
                .update_expression(set)
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_names("#ttl", "ttl")
                .expression_attribute_values(":ttl", AttributeValue::N(ttl.to_string()));
            if set.contains(":seen") {
                // sweepPk too: a connection written before the sweep index joins it on its next ping.
                update = update
                    .expression_attribute_values(":seen", s(&format_ts(&now)))
                    .expression_attribute_values(":sp", s(&model::sweep_pk(&conn.connection_id)));
            }
            update.build().map_err(build_error).map(|u| TransactWriteItem::builder().update(u).build())
        };
        let mut items =
            vec![refresh(connection_key(&conn.connection_id), "SET lastSeenAt = :seen, #ttl = :ttl, sweepPk = :sp")?];
        for room in &conn.rooms {
            items.push(refresh(membership_key(&conn.tenant, room, &conn.connection_id), "SET #ttl = :ttl")?);
        }
        self.transact("touch", &conn.connection_id, items).await
    }

    async fn user_connections(&self, tenant: &str, user_id: &str, now: DateTime<Utc>) -> Result<Vec<Connection>> {
        let mut found = Vec::new();
        let spec = QuerySpec {
            index: Some(GSI1),
            key_condition: "gsi1pk = :u AND begins_with(gsi1sk, :conn)",
            values: vec![(":u", s(&model::user_gsi1pk(tenant, user_id))), (":conn", s("CONN#"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(c) = self.decode::<Connection>(item)
                && !is_expired(c.ttl, now)
            {
                found.push(c);
            }
            Ok(true)
        })
        .await?;
        Ok(found)
    }

    async fn scan_connections(&self, limit: usize, after: Option<&str>) -> Result<Vec<Connection>> {
        self.scan_typed("scan", "#t = :type", "connection", limit, after.map(connection_key)).await
    }

    async fn set_status(&self, connection_id: &str, status: &str) -> Result<Option<Connection>> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .update_expression("SET #s = :s")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", s(status))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(out.attributes.and_then(|item| self.decode(item))),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(None),
            Err(err) => Err(unavailable("update_item", err)),
        }
    }
}

#[async_trait]
impl MembershipStore for DynamoStore {
    async fn join(&self, membership: &Membership) -> Result<bool> {
        // A pending join also marks the connection as one whose joins wait (it may have opened
        // before its tenant's plugin decided joins).
        let pending = membership.pending == Some(true);
        let add = if pending { "ADD rooms :r, pendingRooms :r SET authorizeJoins = :t" } else { "ADD rooms :r" };
        let mut add_room = Update::builder()
            .table_name(&self.table)
            .set_key(Some(connection_key(&membership.connection_id)))
            .update_expression(add)
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":r", string_set(&membership.room));
        if pending {
            add_room = add_room.expression_attribute_values(":t", AttributeValue::Bool(true));
        }
        let add_room = add_room.build().map_err(build_error)?;
        // Not over a live membership of the same room (another frame's join, written first).
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(encode(membership)?))
            .condition_expression("attribute_not_exists(pk) OR #ttl < :now")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":now", AttributeValue::N(membership.joined_at.timestamp().to_string()))
            .build()
            .map_err(build_error)?;
        let items =
            vec![TransactWriteItem::builder().put(put).build(), TransactWriteItem::builder().update(add_room).build()];
        match self.client.transact_write_items().set_transact_items(Some(items)).send().await {
            Ok(_) => {}
            Err(err) => {
                if let SdkError::ServiceError(service) = &err
                    && let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err()
                {
                    let failed = |i: usize| {
                        cancel.cancellation_reasons().get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
                    };
                    if failed(1) {
                        return Err(StoreError::NoConnection(membership.connection_id.clone()));
                    }
                    if failed(0) {
                        return Ok(false);
                    }
                }
                return Err(unavailable("join", err));
            }
        }
        self.bump_now(&membership.tenant, &membership.room).await?;
        Ok(true)
    }

    async fn settle_join(&self, m: &Membership, allowed: bool) -> Result<bool> {
        let key = membership_key(&m.tenant, &m.room, &m.connection_id);
        let pending = m.pending == Some(true);
        if allowed && !pending {
            // Allowed and never pending: nothing to change.
            return Ok(true);
        }
        // The decision is this membership's: the same join (`joinedNs`), in the state it was
        // decided in.
        let mut condition = if pending {
            "attribute_exists(pk) AND pending = :t".to_string()
        } else {
            "attribute_exists(pk) AND attribute_not_exists(pending)".to_string()
        };
        if m.joined_ns.is_some() {
            condition.push_str(" AND joinedNs = :ns");
        }
        let same_join = |mut update: aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder| {
            if pending {
                update = update.expression_attribute_values(":t", AttributeValue::Bool(true));
            }
            if let Some(ns) = m.joined_ns {
                update = update.expression_attribute_values(":ns", AttributeValue::N(ns.to_string()));
            }
            update
        };
        // The connection's side, idempotent: written after the membership when allowing (so
        // that a retry can repair it), before its deletion when denying.
        let connection = match (allowed, pending) {
            (true, _) => "DELETE pendingRooms :r, deniedRooms :r",
            (false, true) => "DELETE pendingRooms :r, rooms :r ADD deniedRooms :r",
            // A denial of a join that did not wait also marks its connection: its next joins wait.
            (false, false) => "DELETE pendingRooms :r, rooms :r ADD deniedRooms :r SET authorizeJoins = :yes",
        };
        let update_connection = || async {
            let mut update = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(connection_key(&m.connection_id)))
                .update_expression(connection)
                .condition_expression("attribute_exists(pk)")
                .expression_attribute_values(":r", string_set(&m.room));
            if connection.contains(":yes") {
                update = update.expression_attribute_values(":yes", AttributeValue::Bool(true));
            }
            written("update_item (settle join)", update.send().await)
        };
        if allowed {
            let update = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key.clone()))
                .update_expression("REMOVE pending");
            let applied =
                written("update_item (allow join)", same_join(update).condition_expression(&condition).send().await)?;
            if !applied {
                // Already allowed (a retry after the connection's write failed)? Then finish it.
                let now: Option<Membership> = self.get_typed("get_item (membership)", key).await?;
                if now.is_some_and(|n| n.pending.is_none() && n.joined_ns == m.joined_ns) {
                    // The bump too may not have happened: it is idempotent enough (one more
                    // version only makes containers read the room again).
                    self.bump_now(&m.tenant, &m.room).await?;
                    update_connection().await?;
                }
                return Ok(false);
            }
            // The member is served from the next message on: the version moves before the join
            // is acknowledged.
            self.bump_now(&m.tenant, &m.room).await?;
            update_connection().await?;
            return Ok(true);
        }
        let mark = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .update_expression("SET leftReason = :reason")
            .expression_attribute_values(":reason", s(LeftReason::Denied.as_str()))
            .condition_expression(&condition);
        if !written("update_item (deny join)", same_join(mark).send().await)? {
            if !pending {
                // A redelivery after the deletion: its bump may be the one that was lost.
                self.bump_now(&m.tenant, &m.room).await?;
            }
            return Ok(false);
        }
        update_connection().await?;
        // Only the join that was denied: a leave and a new join in between keep theirs.
        let mut delete = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .condition_expression("leftReason = :reason")
            .expression_attribute_values(":reason", s(LeftReason::Denied.as_str()));
        if let Some(ns) = m.joined_ns {
            delete = delete
                .condition_expression("leftReason = :reason AND joinedNs = :ns")
                .expression_attribute_values(":ns", AttributeValue::N(ns.to_string()));
        }
        written("delete_item (denied join)", delete.send().await)?;
        self.bump_now(&m.tenant, &m.room).await?;
        Ok(true)
    }

    async fn leave(&self, connection_id: &str, tenant: &str, room: &str) -> Result<()> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(membership_key(tenant, room, connection_id)))
            .build()
            .map_err(build_error)?;
        let drop_room = Update::builder()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .update_expression("DELETE rooms :r, pendingRooms :r")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":r", string_set(room))
            .build()
            .map_err(build_error)?;
        let items = vec![
            TransactWriteItem::builder().delete(delete).build(),
            TransactWriteItem::builder().update(drop_room).build(),
        ];
        self.transact("leave", connection_id, items).await?;
        self.bump_now(tenant, room).await
    }

    async fn room_members(&self, tenant: &str, room: &str, now: DateTime<Utc>) -> Result<Vec<Membership>> {
        let mut members = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND begins_with(sk, :conn)",
            values: vec![(":pk", s(&model::room_pk(tenant, room))), (":conn", s("CONN#"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(m) = self.decode::<Membership>(item)
                && !is_expired(m.ttl, now)
            {
                members.push(m);
            }
            Ok(true)
        })
        .await?;
        Ok(members)
    }

    async fn remove_membership(&self, tenant: &str, room: &str, connection_id: &str, reason: LeftReason) -> Result<()> {
        self.mark(membership_key(tenant, room, connection_id), "leftReason", s(reason.as_str())).await?;
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(membership_key(tenant, room, connection_id)))
            .send()
            .await
            .map_err(|e| unavailable("delete_item", e))?;
        self.bump_now(tenant, room).await
    }

    async fn bump_roster(&self, tenant: &str, room: &str) -> Result<()> {
        self.bump_now(tenant, room).await
    }

    async fn roster_version(&self, tenant: &str, room: &str) -> Result<Option<u64>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(roster_key(tenant, room)))
            .projection_expression("v")
            .send()
            .await
            .map_err(|e| unavailable("get_item (roster version)", e))?;
        Ok(out.item.and_then(|item| match item.get("v") {
            Some(AttributeValue::N(n)) => n.parse().ok(),
            _ => None,
        }))
    }
}

#[async_trait]
impl HistoryStore for DynamoStore {
    async fn put_message(&self, message: &Message) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(message)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item", e))?;
        Ok(())
    }

    async fn put_signal(&self, signal: &crate::model::Signal) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(signal)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (signal)", e))?;
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
        // BETWEEN is inclusive: the cursor's own key is dropped below.
        let (lo, hi, cursor, newest_first) = match from {
            HistoryFrom::Latest => (MESSAGES_FROM, MESSAGES_TO, None, true),
            HistoryFrom::Before(sk) => (MESSAGES_FROM, sk.as_str(), Some(sk.as_str()), true),
            HistoryFrom::After(sk) => (sk.as_str(), MESSAGES_TO, Some(sk.as_str()), false),
        };
        if lo >= hi {
            return Ok(Vec::new());
        }
        let mut page = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND sk BETWEEN :lo AND :hi",
            values: vec![(":pk", s(&model::room_pk(tenant, room))), (":lo", s(lo)), (":hi", s(hi))],
            newest_first,
            // Items that do not decode or have expired are rare; the cursor's own item is one more.
            page_size: i32::try_from(limit.saturating_add(2)).ok(),
            growing: max_bytes < usize::MAX,
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            let is_cursor = matches!((cursor, item.get("sk")), (Some(c), Some(AttributeValue::S(sk))) if sk == c);
            if !is_cursor
                && let Some(m) = self.decode::<Message>(item)
                && !is_expired(m.ttl, now)
                && m.rejected.is_none()
                && m.visible_to(viewer)
            {
                bytes = bytes.saturating_add(m.delivered_body.as_ref().unwrap_or(&m.body).len());
                page.push(m);
            }
            Ok(page.len() < limit && bytes <= max_bytes)
        })
        .await?;
        if newest_first {
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
        let claim = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(record)?))
            .condition_expression("attribute_not_exists(pk) OR #ttl <= :now")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_values(":now", AttributeValue::N(now.timestamp().to_string()))
            .send()
            .await;
        if written("put_item (idempotency key)", claim)? {
            // Only if a repeat has not written it already (and the processor marked it).
            self.put_if_absent(message).await?;
            return Ok(message.clone());
        }
        let claimed: Option<IdempotencyRecord> =
            self.get_typed("get_item (idempotency key)", key(record.pk.clone(), record.sk.clone())).await?;
        let Some(claimed) = claimed else {
            // Claimed, then gone (its TTL, or a record that does not decode): the caller retries.
            return Err(StoreError::Unavailable(format!(
                "idempotency key {} could not be read; try again",
                record.key
            )));
        };
        let original = &claimed.message;
        if self.message(&original.tenant, &original.room, &original.sk, now).await?.is_none() {
            // The first send claimed the key and died before its message: finish it.
            self.put_if_absent(original).await?;
        }
        Ok(claimed.message)
    }

    async fn mark_message(&self, tenant: &str, room: &str, sk: &str, verdict: &crate::model::Verdict) -> Result<()> {
        let (name, value) = match verdict {
            crate::model::Verdict::Rejected(reason) => ("rejected", s(reason)),
            crate::model::Verdict::Rewritten(text) => ("deliveredBody", s(text)),
            crate::model::Verdict::Audience(users) => {
                ("onlyUsers", AttributeValue::L(users.iter().map(|u| s(u)).collect()))
            }
        };
        self.mark(key(model::room_pk(tenant, room), sk.to_string()), name, value).await
    }

    async fn message(&self, tenant: &str, room: &str, sk: &str, now: DateTime<Utc>) -> Result<Option<Message>> {
        let message: Option<Message> =
            self.get_typed("get_item (message)", key(model::room_pk(tenant, room), sk.to_string())).await?;
        Ok(message.filter(|m| !is_expired(m.ttl, now)))
    }
}

#[async_trait]
impl PresenceStore for DynamoStore {
    async fn scan_presence(&self, limit: usize, after: Option<(String, String)>) -> Result<Vec<Presence>> {
        let filter = "#t = :type AND attribute_exists(connections)";
        self.scan_typed("scan (presence)", filter, "presence", limit, after.map(|(pk, sk)| key(pk, sk))).await
    }

    async fn put_presence_suspects(&self, p: &Presence) -> Result<bool> {
        let write = self.presence_write(key(p.pk.clone(), p.sk.clone()), Some(p), Guard::Version(p.ver - 1))?;
        self.write_plan(vec![write]).await
    }

    async fn apply_presence(&self, update: &PresenceUpdate) -> Result<PresenceOutcome> {
        let pk = model::presence_pk(&update.tenant, &update.room);
        let user_key = key(pk.clone(), model::presence_sk(&update.user_id));
        let room_key = key(pk, model::ROOM_PRESENCE_SK.into());
        for _ in 0..PRESENCE_ATTEMPTS {
            let ((current, user_there), (room, room_there)) = tokio::try_join!(
                self.get_guarded::<Presence>("get_item (presence)", user_key.clone()),
                self.get_guarded::<RoomPresence>("get_item (room presence)", room_key.clone()),
            )?;
            let (presence, presence_ver, next_room, outcome) =
                match crate::presence::plan(update, current.as_ref(), room.as_ref()) {
                    Plan::Done(outcome) => return Ok(outcome),
                    Plan::Write { presence, presence_ver, room, outcome } => (presence, presence_ver, room, outcome),
                };
            let user_guard = Guard::of(presence_ver, user_there);
            let mut writes = vec![self.presence_write(user_key.clone(), presence.as_ref(), user_guard)?];
            if let Some(next) = &next_room {
                writes.push(self.room_presence_write(next, Guard::of(room.as_ref().map(|r| r.ver), room_there))?);
            }
            if self.write_plan(writes).await? {
                return Ok(outcome);
            }
            tracing::debug!(room = %update.room, user = %update.user_id, "presence write lost a race; planning again");
            tokio::time::sleep(Duration::from_millis(2 + (uuid::Uuid::new_v4().as_u128() % 8) as u64)).await;
        }
        Err(StoreError::Unavailable(format!(
            "presence of {} in {} kept changing under {PRESENCE_ATTEMPTS} attempts",
            update.user_id, update.room
        )))
    }

    async fn migrate_presence(&self, tenant: &str, room: &str) -> Result<bool> {
        let old = model::room_pk(tenant, room);
        let count = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(old.clone(), model::ROOM_PRESENCE_SK.into())))
            .send()
            .await
            .map_err(|e| unavailable("get_item (room presence, old key)", e))?
            .item;
        let Some(count) = count else { return Ok(false) };
        let mut items = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND begins_with(sk, :user)",
            values: vec![(":pk", s(&old)), (":user", s("USER#"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            items.push(item);
            Ok(true)
        })
        .await?;
        // The users first, the count last: a copy cut off is made again on the next batch (the
        // count still missing), and what was copied already is not copied over.
        let new = s(&model::presence_pk(tenant, room));
        let copied = items.len();
        for mut item in items.into_iter().chain(std::iter::once(count)) {
            item.insert("pk".into(), new.clone());
            let sent = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk)")
                .send()
                .await;
            match sent {
                Ok(_) => {}
                Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => {}
                Err(e) => return Err(unavailable("put_item (presence, migrated)", e)),
            }
        }
        tracing::info!(tenant, room, users = copied, "presence copied from the room's key to its own");
        Ok(true)
    }

    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> Result<()> {
        // The version moves too: a run planned from the item as it was must plan again.
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::presence_pk(tenant, room), model::presence_sk(user_id))))
            .update_expression("SET announced = :no, ver = ver + :one")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":no", AttributeValue::Bool(false))
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(SdkError::ServiceError(e)) if e.err().is_conditional_check_failed_exception() => Ok(()),
            Err(e) => Err(unavailable("update_item (presence announced)", e)),
        }
    }

    async fn apply_presence_run(&self, updates: &[PresenceUpdate]) -> Result<Vec<PresenceOutcome>> {
        let Some(first) = updates.first() else { return Ok(Vec::new()) };
        // One room's records; a run of one is the record on its own.
        let same = updates.iter().take_while(|u| u.tenant == first.tenant && u.room == first.room).count();
        let updates = &updates[..same];
        if updates.len() == 1 {
            return Ok(vec![self.apply_presence(first).await?]);
        }
        let pk = model::presence_pk(&first.tenant, &first.room);
        let room_key = key(pk.clone(), model::ROOM_PRESENCE_SK.into());
        for attempt in 0..PRESENCE_ATTEMPTS {
            let (room, room_there) =
                self.get_guarded::<RoomPresence>("get_item (room presence)", room_key.clone()).await?;
            // A room that announces ends its run at its first transition: its later users are
            // not worth reading. One past its limit reads up to 99.
            let announcing = crate::presence::announces(
                room.as_ref().map_or(0, |r| r.users).saturating_add(1),
                first.announce_max_users,
            );
            let max_users = if announcing { 1 } else { crate::presence::RUN_USERS };
            let wanted = crate::presence::run_users(updates, max_users);
            let (users, there) = self.presences(&pk, &wanted).await?;
            let run = crate::presence::plan_run(updates, &users, room.as_ref(), max_users);
            let mut writes = Vec::with_capacity(run.users.len() + 1);
            for (user, after) in &run.users {
                let guard = Guard::of(users.get(user).map(|p| p.ver), there.contains(user));
                writes.push(self.presence_write(key(pk.clone(), model::presence_sk(user)), after.as_ref(), guard)?);
            }
            if let Some(next) = &run.room {
                writes.push(self.room_presence_write(next, Guard::of(room.as_ref().map(|r| r.ver), room_there))?);
            }
            if writes.is_empty() || self.write_plan(writes).await? {
                return Ok(run.outcomes);
            }
            tracing::debug!(room = %first.room, records = updates.len(), "presence run lost a race or was throttled; planning again");
            // Backing off: a run is cancelled by a race (planned again at once) or by the room's
            // partition being out of write units (which takes its time to refill).
            let backoff = (2u64 << attempt.min(9)).min(1000);
            tokio::time::sleep(Duration::from_millis(backoff + (uuid::Uuid::new_v4().as_u128() % 8) as u64)).await;
        }
        Err(StoreError::Unavailable(format!(
            "presence of {} kept changing under {PRESENCE_ATTEMPTS} attempts",
            first.room
        )))
    }

    async fn who(&self, tenant: &str, room: &str, limit: usize, after: Option<&str>) -> Result<WhoPage> {
        let pk = model::presence_pk(tenant, room);
        let mut page = WhoPage::default();
        let mut start: Option<DynamoItem> = after.map(|user| key(pk.clone(), model::presence_sk(user)));
        // One more than asked tells whether there is a next page.
        'pages: loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .key_condition_expression("pk = :pk AND begins_with(sk, :user)")
                // Tombstones (users who left in the last two days) are read and passed over
                // here rather than returned; `Limit` counts them, so it is twice the page.
                .filter_expression("attribute_exists(connections)")
                .expression_attribute_values(":pk", s(&pk))
                .expression_attribute_values(":user", s("USER#"))
                .set_limit(i32::try_from(limit.saturating_add(1).saturating_mul(2)).ok())
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| unavailable("query (who)", e))?;
            for item in out.items.unwrap_or_default() {
                let Some(p) = self.decode::<Presence>(item) else { continue };
                // A tombstone (the user left; their connections' marks kept a while) is not a user here.
                if !p.present() {
                    continue;
                }
                if page.users.len() == limit {
                    page.next = page.users.last().map(|(user, _)| user.clone());
                    break 'pages;
                }
                page.versions.push(p.version);
                page.users.push((p.user_id, p.connections.len()));
            }
            match out.last_evaluated_key {
                Some(next) if !next.is_empty() => start = Some(next),
                _ => break,
            }
        }
        page.total = self.room_presence(tenant, room).await?.map_or(0, |r| r.users);
        Ok(page)
    }

    async fn presence(&self, tenant: &str, room: &str, user_id: &str) -> Result<Option<Presence>> {
        self.get_typed("get_item (presence)", key(model::presence_pk(tenant, room), model::presence_sk(user_id))).await
    }

    async fn room_presence(&self, tenant: &str, room: &str) -> Result<Option<RoomPresence>> {
        self.get_typed(
            "get_item (room presence)",
            key(model::presence_pk(tenant, room), model::ROOM_PRESENCE_SK.into()),
        )
        .await
    }
}

#[async_trait]
impl PluginStore for DynamoStore {
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.into())))
            .update_expression("SET authorizesJoins = :a")
            .condition_expression("version = :v")
            .expression_attribute_values(":a", AttributeValue::Bool(authorizes))
            .expression_attribute_values(":v", s(version))
            .send()
            .await;
        written("update_item (active plugin joins)", result).map(|_| ())
    }

    async fn put_plugin(&self, meta: &PluginMeta, chunks: &[PluginChunk]) -> Result<()> {
        for chunk in chunks {
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(encode(chunk)?))
                .send()
                .await
                .map_err(|e| unavailable("put_item (plugin chunk)", e))?;
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(meta)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (plugin)", e))?;
        Ok(())
    }

    async fn plugin_bytes(&self, tenant: &str, version: &str, chunks: usize) -> Result<Option<Vec<u8>>> {
        let mut bytes = Vec::new();
        // Versions uploaded before chunks had their own prefix keep them under the old key.
        let mut sk: fn(&str, usize) -> String = model::plugin_chunk_sk;
        for index in 0..chunks {
            let mut chunk = self.get_chunk(tenant, &sk(version, index)).await?;
            if chunk.is_none() && index == 0 {
                sk = model::legacy_plugin_chunk_sk;
                chunk = self.get_chunk(tenant, &sk(version, index)).await?;
            }
            match chunk {
                Some(chunk) => bytes.extend_from_slice(&chunk.data),
                None => return Ok(None),
            }
        }
        Ok(Some(bytes))
    }

    async fn plugin(&self, tenant: &str, version: &str) -> Result<Option<PluginMeta>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(model::tenant_pk(tenant), model::plugin_meta_sk(version))))
            .send()
            .await
            .map_err(|e| unavailable("get_item (plugin)", e))?;
        Ok(out.item.and_then(|item| self.decode(item)))
    }

    async fn plugins(&self, tenant: &str) -> Result<Vec<PluginMeta>> {
        let mut metas: Vec<PluginMeta> = Vec::new();
        let spec = QuerySpec {
            key_condition: "pk = :pk AND begins_with(sk, :plugin)",
            // The chunks share the partition; only the metadata comes back.
            filter: Some("#t = :meta"),
            names: vec![("#t", "type")],
            values: vec![(":pk", s(&model::tenant_pk(tenant))), (":plugin", s("PLUGIN#")), (":meta", s("plugin"))],
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            metas.extend(self.decode(item));
            Ok(true)
        })
        .await?;
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
        let status = serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::tenant_pk(tenant), model::plugin_meta_sk(version))))
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#s", "status")
            .expression_attribute_values(":s", s(&status));
        update = match reason {
            Some(reason) => {
                update.update_expression("SET #s = :s, reason = :r").expression_attribute_values(":r", s(reason))
            }
            None => update.update_expression("SET #s = :s REMOVE reason"),
        };
        match update.send().await {
            Ok(_) => Ok(()),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(()),
            Err(err) => Err(unavailable("update_item (plugin)", err)),
        }
    }

    async fn active_plugin(&self, tenant: &str) -> Result<Option<PluginActive>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .consistent_read(true)
            .set_key(Some(key(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.into())))
            .send()
            .await
            .map_err(|e| unavailable("get_item (active plugin)", e))?;
        Ok(out.item.and_then(|item| self.decode(item)))
    }

    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> Result<()> {
        match version {
            Some(version) => {
                self.client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(encode(&PluginActive::new(tenant, version))?))
                    .send()
                    .await
                    .map_err(|e| unavailable("put_item (active plugin)", e))?;
            }
            None => {
                self.client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(key(model::tenant_pk(tenant), model::PLUGIN_ACTIVE_SK.into())))
                    .send()
                    .await
                    .map_err(|e| unavailable("delete_item (active plugin)", e))?;
            }
        }
        Ok(())
    }

    async fn plugin_config(&self, tenant: &str) -> Result<Option<model::PluginConfig>> {
        self.get_typed("get_item (plugin config)", key(model::tenant_pk(tenant), model::PLUGIN_CONFIG_SK.into())).await
    }

    async fn put_plugin_config(&self, config: &model::PluginConfig) -> Result<()> {
        if config.values.is_empty() {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(config.pk.clone(), config.sk.clone())))
                .send()
                .await
                .map_err(|e| unavailable("delete_item (plugin config)", e))?;
            return Ok(());
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(config)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (plugin config)", e))?;
        Ok(())
    }
}

#[async_trait]
impl TenantStore for DynamoStore {
    async fn tenant_settings(&self, tenant: &str) -> Result<Option<TenantSettings>> {
        self.get_typed("get_item (tenant settings)", key(model::tenant_pk(tenant), model::SETTINGS_SK.into())).await
    }

    async fn tenant_identity(&self, tenant: &str) -> Result<Option<crate::model::TenantIdentity>> {
        let key = key(model::tenant_pk(tenant), crate::model::IDENTITY_SK.into());
        match self.get_guarded("get_item (tenant identity)", key).await? {
            // One that does not decode must not read as "none" (the shared secret would admit).
            (None, true) => Err(StoreError::Unavailable(format!("{tenant}'s identity item does not decode"))),
            (identity, _) => Ok(identity),
        }
    }

    async fn put_tenant_identity(&self, identity: &crate::model::TenantIdentity) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(identity)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (tenant identity)", e))?;
        Ok(())
    }

    async fn put_tenant_settings(&self, settings: &TenantSettings) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(settings)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (tenant settings)", e))?;
        Ok(())
    }
}

#[async_trait]
impl UpkeepStore for DynamoStore {
    async fn count_in_window(&self, key: &str, window: i64) -> Result<u64> {
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(&model::limit_pk(key)))
            .key("sk", s(&format!("W#{window}")))
            .update_expression("ADD n :one SET #ttl = :ttl, #type = :type")
            .expression_attribute_names("#ttl", "ttl")
            .expression_attribute_names("#type", "type")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":ttl", AttributeValue::N((window + 120).to_string()))
            .expression_attribute_values(":type", s("limit"))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| unavailable("update_item (rate limit)", e))?;
        Ok(match out.attributes.as_ref().and_then(|a| a.get("n")) {
            Some(AttributeValue::N(n)) => n.parse().unwrap_or(u64::MAX),
            _ => u64::MAX,
        })
    }

    async fn stale_connections(&self, shard: u32, cutoff: DateTime<Utc>) -> Result<Vec<Connection>> {
        let mut found = Vec::new();
        let spec = QuerySpec {
            index: Some(SWEEP_INDEX),
            key_condition: "sweepPk = :s AND lastSeenAt < :cutoff",
            values: vec![(":s", s(&model::sweep_shard_pk(shard))), (":cutoff", s(&model::format_ts(&cutoff)))],
            page_size: Some(500),
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(conn) = self.decode::<Connection>(item) {
                found.push(conn);
            }
            Ok(true)
        })
        .await?;
        Ok(found)
    }

    async fn present_users(&self, shard: u32) -> Result<Vec<Presence>> {
        let mut found = Vec::new();
        let spec = QuerySpec {
            index: Some(SWEEP_INDEX),
            key_condition: "sweepPk = :s",
            values: vec![(":s", s(&format!("SWEEP#P{shard:02}")))],
            page_size: Some(500),
            ..QuerySpec::default()
        };
        self.query_all(spec, |item| {
            if let Some(p) = self.decode::<Presence>(item).filter(|p| p.present()) {
                found.push(p);
            }
            Ok(true)
        })
        .await?;
        Ok(found)
    }

    async fn take_sweep_lease(&self, now: i64, until: i64, owner: &str) -> Result<Option<u32>> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::SWEEPER_PK.into(), model::SWEEPER_LEASE_SK.into())))
            .update_expression("SET #until = :until, #type = :type, #owner = :owner")
            .condition_expression("attribute_not_exists(pk) OR #until < :now")
            .expression_attribute_names("#until", "until")
            .expression_attribute_names("#type", "type")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":until", AttributeValue::N(until.to_string()))
            .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
            .expression_attribute_values(":type", s("sweeper"))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(Some(match out.attributes.as_ref().and_then(|a| a.get("nextShard")) {
                Some(AttributeValue::N(n)) => n.parse().unwrap_or(0) % model::SWEEP_SHARDS,
                _ => 0,
            })),
            Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => Ok(None),
            Err(err) => Err(unavailable("update_item (sweeper lease)", err)),
        }
    }

    async fn sweep_progress(&self, owner: &str, next_shard: u32, release: bool) -> Result<bool> {
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(model::SWEEPER_PK.into(), model::SWEEPER_LEASE_SK.into())))
            .update_expression(if release { "SET #until = :zero, nextShard = :next" } else { "SET nextShard = :next" })
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":next", AttributeValue::N(next_shard.to_string()));
        if release {
            update = update
                .expression_attribute_names("#until", "until")
                .expression_attribute_values(":zero", AttributeValue::N("0".into()));
        }
        written("update_item (sweeper lease)", update.send().await)
    }

    async fn mark_seen(&self, connection_id: &str, now: DateTime<Utc>) -> Result<()> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(connection_key(connection_id)))
            .update_expression("SET lastSeenAt = :seen")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":seen", s(&format_ts(&now)))
            .send()
            .await;
        // Deleted meanwhile ($disconnect): nothing to mark.
        written("update_item (connection seen)", result).map(|_| ())
    }

    async fn fanout_progress(&self, key: &str) -> Result<Option<model::FanoutProgress>> {
        self.get_typed(
            "get_item (fan-out progress)",
            self::key(model::fanout_pk(key), model::FANOUT_PROGRESS_SK.into()),
        )
        .await
    }

    async fn put_fanout_progress(&self, progress: &model::FanoutProgress) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(progress)?))
            .send()
            .await
            .map_err(|e| unavailable("put_item (fan-out progress)", e))?;
        Ok(())
    }
}
