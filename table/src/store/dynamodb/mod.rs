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

// The ports, a file each.
mod connections;
mod history;
mod memberships;
mod plugins;
mod presence;
mod tenants;
mod upkeep;
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

    /// Writes one record as it is (a message, a signal, a message to a user); `what` names it in
    /// the error.
    async fn put_record<T: serde::Serialize>(&self, record: &T, what: &str) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(record)?))
            .send()
            .await
            .map_err(|e| unavailable(what, e))?;
        Ok(())
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
