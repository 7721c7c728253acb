//! What one DynamoDB partition allows, in front of a DynamoDB API that does not impose it (moto,
//! DynamoDB Local): an HTTP layer that forwards every call unchanged and adds
//!
//! * **latency**: every answer after `latency` (a call from a Lambda in the table's region takes
//!   a few milliseconds);
//! * **per-partition-key throughput**: each partition key (a room is one) has 3,000 read units
//!   and 1,000 write units a second, as one DynamoDB partition does. A call that finds its key's
//!   budget spent is answered `400 ProvisionedThroughputExceededException` without reaching the
//!   table, as DynamoDB answers it; the SDK retries it with backoff.
//!
//! Units are counted from the items, as DynamoDB counts them: an item's size is its attribute
//! names and values in bytes ([`item_size`]); a strongly consistent read costs one unit per 4 KB
//! (an eventually consistent one half), summed over a page's items before rounding (a query's
//! scanned items, which a filter does not make cheaper); a write
//! costs one unit per KB of the item written (`PutItem`; `UpdateItem` and `DeleteItem` are
//! counted as one unit, the layer not knowing the stored item's size), twice inside a
//! transaction. A call's units are taken from its key's budget once it is answered, so a budget
//! can go into debt; the key's next calls wait out the debt as throttled calls. Index queries
//! are counted under the index's key, prefixed with its attribute (`gsi1pk:`, `sweepPk:`); a
//! Scan, which no one key serves, under `scan:` and the table's name, and never throttled. The
//! streams API passes through.
//!
//! It counts per key: units read and written, calls, throttled calls — what a test or the bench
//! reads to say what a message costs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

/// One partition's throughput, units a second.
pub const READ_UNITS_PER_SECOND: f64 = 3000.0;
pub const WRITE_UNITS_PER_SECOND: f64 = 1000.0;

#[derive(Clone, Copy, Debug)]
pub struct PartitionLimits {
    pub latency: Duration,
    pub read_units: f64,
    pub write_units: f64,
}

impl Default for PartitionLimits {
    fn default() -> Self {
        PartitionLimits {
            latency: Duration::from_millis(5),
            read_units: READ_UNITS_PER_SECOND,
            write_units: WRITE_UNITS_PER_SECOND,
        }
    }
}

/// What one partition key saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyStats {
    pub read_units: f64,
    pub write_units: f64,
    pub calls: u64,
    pub throttled: u64,
    /// Bytes of the items read (DynamoDB's measure).
    pub bytes_read: u64,
    pub items_read: u64,
}

struct Budget {
    read: f64,
    write: f64,
    at: Instant,
}

struct Layer {
    upstream: String,
    limits: PartitionLimits,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
    budgets: Mutex<HashMap<String, Budget>>,
    stats: Mutex<HashMap<String, KeyStats>>,
}

/// A running layer: its endpoint, and what it counted.
#[derive(Clone)]
pub struct Partitions {
    pub endpoint: String,
    layer: Arc<Layer>,
}

impl Partitions {
    /// Serves on a free loopback port, forwarding to `upstream` (e.g. moto's endpoint).
    pub async fn start(upstream: &str, limits: PartitionLimits) -> std::io::Result<Partitions> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let layer = Arc::new(Layer {
            upstream: upstream.trim_end_matches('/').to_string(),
            limits,
            client,
            budgets: Mutex::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
        });
        let app = axum::Router::new().fallback(forward).with_state(layer.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Partitions { endpoint, layer })
    }

    /// What `partition_key` saw since the start (or the last [`Partitions::reset`]).
    pub fn stats(&self, partition_key: &str) -> KeyStats {
        self.layer.stats.lock().unwrap_or_else(|p| p.into_inner()).get(partition_key).copied().unwrap_or_default()
    }

    /// Every key's counts.
    pub fn all(&self) -> HashMap<String, KeyStats> {
        self.layer.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn reset(&self) {
        self.layer.stats.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// What a call costs, once answered: per partition key, (read units, write units, bytes, items).
type Costs = Vec<(String, f64, f64, u64, u64)>;

async fn forward(
    axum::extract::State(layer): axum::extract::State<Arc<Layer>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let operation = target.strip_prefix("DynamoDB_20120810.").unwrap_or("").to_string();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let keys = if operation.is_empty() { Vec::new() } else { keys_of(&operation, &request) };
    if !layer.limits.latency.is_zero() {
        tokio::time::sleep(layer.limits.latency).await;
    }
    if let Some(key) = keys.iter().find(|key| layer.in_debt(key)) {
        layer.count(key, |s| {
            s.calls += 1;
            s.throttled += 1;
        });
        return throttled(key);
    }
    let mut upstream = http::Request::builder().method(method).uri(format!(
        "{}{}",
        layer.upstream,
        uri.path_and_query().map_or("/", |p| p.as_str())
    ));
    for (name, value) in &headers {
        if name != "host" {
            upstream = upstream.header(name, value);
        }
    }
    let Ok(upstream) = upstream.body(http_body_util::Full::new(body.clone())) else {
        return (StatusCode::BAD_REQUEST, "unreadable request").into_response();
    };
    let answer = match layer.client.request(upstream).await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("the table did not answer: {e}")).into_response(),
    };
    let (parts, answer_body) = answer.into_parts();
    let bytes = match http_body_util::BodyExt::collect(answer_body).await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return (StatusCode::BAD_GATEWAY, format!("the table's answer broke off: {e}")).into_response(),
    };
    if parts.status.is_success() && !operation.is_empty() {
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        // A call is one call to each key it touches, however many of the key's items it names
        // (a transaction or a batch of one room's items).
        let mut touched: Vec<String> = Vec::new();
        for (key, read, write, bytes_read, items) in costs(&operation, &request, &answer) {
            layer.charge(&key, read, write);
            let first = !touched.contains(&key);
            if first {
                touched.push(key.clone());
            }
            layer.count(&key, |s| {
                s.calls += u64::from(first);
                s.read_units += read;
                s.write_units += write;
                s.bytes_read += bytes_read;
                s.items_read += items;
            });
        }
    }
    let mut response = Response::from_parts(parts, axum::body::Body::from(bytes));
    response.headers_mut().remove("content-length");
    response.headers_mut().remove("transfer-encoding");
    response
}

impl Layer {
    fn in_debt(&self, key: &str) -> bool {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.refilled(&mut budgets, key);
        budget.read < 0.0 || budget.write < 0.0
    }

    fn charge(&self, key: &str, read: f64, write: f64) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let budget = self.refilled(&mut budgets, key);
        budget.read -= read;
        budget.write -= write;
    }

    /// The key's budget, refilled for the time since it was last touched (at most one second's).
    fn refilled<'a>(&self, budgets: &'a mut HashMap<String, Budget>, key: &str) -> &'a mut Budget {
        let limits = self.limits;
        let budget = budgets.entry(key.to_string()).or_insert_with(|| Budget {
            read: limits.read_units,
            write: limits.write_units,
            at: Instant::now(),
        });
        let elapsed = budget.at.elapsed().as_secs_f64();
        budget.at = Instant::now();
        budget.read = (budget.read + elapsed * limits.read_units).min(limits.read_units);
        budget.write = (budget.write + elapsed * limits.write_units).min(limits.write_units);
        budget
    }

    fn count(&self, key: &str, f: impl FnOnce(&mut KeyStats)) {
        f(self.stats.lock().unwrap_or_else(|p| p.into_inner()).entry(key.to_string()).or_default());
    }
}

fn throttled(key: &str) -> Response {
    let body = serde_json::json!({
        "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
        "message": format!("The level of configured provisioned throughput for the table was exceeded (partition key {key})"),
    });
    let mut response = (StatusCode::BAD_REQUEST, body.to_string()).into_response();
    response.headers_mut().insert("content-type", http::HeaderValue::from_static("application/x-amz-json-1.0"));
    response
}

/// The string value of attribute `name` in a DynamoDB JSON item.
fn string_attribute<'a>(item: &'a Value, name: &str) -> Option<&'a str> {
    item.get(name)?.get("S")?.as_str()
}

/// The partition key a query reads: `pk` or `gsi1pk` from its key condition's values.
fn query_key(request: &Value) -> Option<String> {
    let condition = request.get("KeyConditionExpression")?.as_str()?;
    let (attribute, rest) = condition.split_once('=')?;
    let placeholder: String =
        rest.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == ':' || *c == '_').collect();
    let value = request.get("ExpressionAttributeValues")?.get(&placeholder)?.get("S")?.as_str()?;
    let attribute = attribute.trim();
    Some(if attribute == "pk" { value.to_string() } else { format!("{attribute}:{value}") })
}

/// The partition keys a call touches, before it is made.
fn keys_of(operation: &str, request: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    match operation {
        "GetItem" | "DeleteItem" | "UpdateItem" => {
            keys.extend(request.get("Key").and_then(|k| string_attribute(k, "pk")).map(str::to_string))
        }
        "PutItem" => keys.extend(request.get("Item").and_then(|i| string_attribute(i, "pk")).map(str::to_string)),
        "Query" => keys.extend(query_key(request)),
        "TransactWriteItems" | "TransactGetItems" => {
            for entry in request.get("TransactItems").and_then(Value::as_array).into_iter().flatten() {
                for (_, action) in entry.as_object().into_iter().flatten() {
                    let item = action.get("Key").or_else(|| action.get("Item"));
                    keys.extend(item.and_then(|i| string_attribute(i, "pk")).map(str::to_string));
                }
            }
        }
        "BatchWriteItem" | "BatchGetItem" => {
            for (_, requests) in request.get("RequestItems").and_then(Value::as_object).into_iter().flatten() {
                let entries = requests.as_array().cloned().unwrap_or_default();
                let keys_list = requests.get("Keys").and_then(Value::as_array).cloned().unwrap_or_default();
                for entry in entries {
                    let item = entry.pointer("/PutRequest/Item").or_else(|| entry.pointer("/DeleteRequest/Key"));
                    keys.extend(item.and_then(|i| string_attribute(i, "pk")).map(str::to_string));
                }
                for key in keys_list {
                    keys.extend(string_attribute(&key, "pk").map(str::to_string));
                }
            }
        }
        _ => {}
    }
    keys.sort();
    keys.dedup();
    keys
}

/// What an answered call cost, per partition key.
fn costs(operation: &str, request: &Value, answer: &Value) -> Costs {
    let consistent = request.get("ConsistentRead").and_then(Value::as_bool).unwrap_or(false);
    let read_units = |bytes: u64| {
        let units = (bytes.max(1) as f64 / 4096.0).ceil();
        if consistent { units } else { units / 2.0 }
    };
    let write_units = |bytes: u64| (bytes.max(1) as f64 / 1024.0).ceil();
    let mut out = Costs::new();
    match operation {
        "GetItem" => {
            let key = keys_of(operation, request);
            let bytes = answer.get("Item").map_or(0, item_size);
            let items = u64::from(answer.get("Item").is_some());
            out.extend(key.into_iter().map(|k| (k, read_units(bytes), 0.0, bytes, items)));
        }
        "Query" => {
            let items = answer.get("Items").and_then(Value::as_array).cloned().unwrap_or_default();
            let returned: u64 = items.iter().map(item_size).sum();
            // A filter makes no read cheaper: DynamoDB charges the items it scanned. Their size
            // is taken to be the returned items' average.
            let scanned = answer.get("ScannedCount").and_then(Value::as_u64).unwrap_or(items.len() as u64);
            let bytes = match items.len() as u64 {
                0 => 0,
                n => returned * scanned.max(n) / n,
            };
            out.extend(query_key(request).map(|k| (k, read_units(bytes), 0.0, bytes, scanned.max(items.len() as u64))));
        }
        "BatchGetItem" => {
            // Each item is a read of its own, rounded up to 4 KB; consistency is per table.
            for (table, asked) in request.get("RequestItems").and_then(Value::as_object).into_iter().flatten() {
                let consistent = asked.get("ConsistentRead").and_then(Value::as_bool).unwrap_or(false);
                let items = answer.pointer(&format!("/Responses/{table}")).and_then(Value::as_array);
                for item in items.into_iter().flatten() {
                    let bytes = item_size(item);
                    let units = (bytes.max(1) as f64 / 4096.0).ceil();
                    let units = if consistent { units } else { units / 2.0 };
                    out.extend(string_attribute(item, "pk").map(|k| (k.to_string(), units, 0.0, bytes, 1)));
                }
            }
        }
        "Scan" => {
            // As a Query: a filter makes no read cheaper, the scanned items' size taken to be the
            // returned items' average.
            let items = answer.get("Items").and_then(Value::as_array).cloned().unwrap_or_default();
            let returned: u64 = items.iter().map(item_size).sum();
            let table = request.get("TableName").and_then(Value::as_str).unwrap_or("");
            let scanned = answer.get("ScannedCount").and_then(Value::as_u64).unwrap_or(items.len() as u64);
            let bytes = match items.len() as u64 {
                0 => 0,
                n => returned * scanned.max(n) / n,
            };
            out.push((format!("scan:{table}"), read_units(bytes), 0.0, bytes, scanned.max(items.len() as u64)));
        }
        "PutItem" => {
            let item = request.get("Item").cloned().unwrap_or(Value::Null);
            let key = string_attribute(&item, "pk").map(str::to_string);
            out.extend(key.map(|k| (k, 0.0, write_units(item_size(&item)), 0, 0)));
        }
        "UpdateItem" | "DeleteItem" => {
            out.extend(keys_of(operation, request).into_iter().map(|k| (k, 0.0, 1.0, 0, 0)));
        }
        "TransactWriteItems" => {
            for entry in request.get("TransactItems").and_then(Value::as_array).into_iter().flatten() {
                for (kind, action) in entry.as_object().into_iter().flatten() {
                    let item = action.get("Item").or_else(|| action.get("Key")).cloned().unwrap_or(Value::Null);
                    let units = if kind == "Put" { write_units(item_size(&item)) } else { 1.0 };
                    let key = string_attribute(&item, "pk").map(str::to_string);
                    out.extend(key.map(|k| (k, 0.0, 2.0 * units, 0, 0)));
                }
            }
        }
        "BatchWriteItem" => {
            for (_, requests) in request.get("RequestItems").and_then(Value::as_object).into_iter().flatten() {
                for entry in requests.as_array().into_iter().flatten() {
                    let (item, put) = match entry.pointer("/PutRequest/Item") {
                        Some(item) => (item.clone(), true),
                        None => (entry.pointer("/DeleteRequest/Key").cloned().unwrap_or(Value::Null), false),
                    };
                    let units = if put { write_units(item_size(&item)) } else { 1.0 };
                    out.extend(string_attribute(&item, "pk").map(|k| (k.to_string(), 0.0, units, 0, 0)));
                }
            }
        }
        _ => {}
    }
    out
}

/// An item's size as DynamoDB counts it: every attribute's name and value, in bytes.
pub fn item_size(item: &Value) -> u64 {
    item.as_object().map_or(0, |attributes| attributes.iter().map(|(name, v)| name.len() as u64 + value_size(v)).sum())
}

fn value_size(value: &Value) -> u64 {
    let Some((kind, inner)) = value.as_object().and_then(|o| o.iter().next()) else { return 0 };
    match kind.as_str() {
        "S" => inner.as_str().map_or(0, |s| s.len() as u64),
        // A number: about one byte per two significant digits, plus one.
        "N" => inner.as_str().map_or(1, |n| (n.trim_start_matches('-').len() as u64).div_ceil(2) + 1),
        // Binary: base64 in JSON.
        "B" => inner.as_str().map_or(0, |b| (b.len() as u64 * 3) / 4),
        "BOOL" | "NULL" => 1,
        "SS" | "NS" | "BS" => {
            inner.as_array().map_or(0, |a| a.iter().map(|s| s.as_str().map_or(0, str::len) as u64).sum())
        }
        "L" => 3 + inner.as_array().map_or(0, |a| a.iter().map(|v| 1 + value_size(v)).sum::<u64>()),
        "M" => {
            3 + inner
                .as_object()
                .map_or(0, |m| m.iter().map(|(name, v)| 1 + name.len() as u64 + value_size(v)).sum::<u64>())
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_count_names_and_values_as_dynamodb_does() {
        let item =
            json!({"pk": {"S": "ROOM#a#b"}, "n": {"N": "12345"}, "ok": {"BOOL": true}, "rooms": {"SS": ["x", "yz"]}});
        assert_eq!(item_size(&item), (2 + 8) + (1 + 4) + (2 + 1) + (5 + 3));
    }

    #[test]
    fn each_call_is_charged_to_its_partition_key() {
        let query = json!({"KeyConditionExpression": "pk = :pk AND begins_with(sk, :conn)", "ConsistentRead": true,
                           "ExpressionAttributeValues": {":pk": {"S": "ROOM#t#r"}, ":conn": {"S": "CONN#"}}});
        let items: Vec<Value> =
            (0..100).map(|i| json!({"pk": {"S": "ROOM#t#r"}, "sk": {"S": format!("CONN#{i:0>200}")}})).collect();
        let paid = costs("Query", &query, &json!({"Items": items}));
        assert_eq!(paid.len(), 1);
        let (key, read, write, bytes, n) = &paid[0];
        assert_eq!((key.as_str(), *write, *n), ("ROOM#t#r", 0.0, 100));
        assert_eq!(*bytes, 100 * (2 + 8 + 2 + 205));
        assert_eq!(*read, (*bytes as f64 / 4096.0).ceil(), "strongly consistent: a unit per 4 KB of the page");
        let index = json!({"KeyConditionExpression": "gsi1pk = :u AND begins_with(gsi1sk, :conn)",
                           "ExpressionAttributeValues": {":u": {"S": "TENANT#t#USER#u"}, ":conn": {"S": "CONN#"}}});
        assert_eq!(keys_of("Query", &index), vec!["gsi1pk:TENANT#t#USER#u".to_string()]);
        let transaction = json!({"TransactItems": [
            {"Put": {"Item": {"pk": {"S": "CONN#1"}, "sk": {"S": "META"}}}},
            {"Update": {"Key": {"pk": {"S": "ROOM#t#r"}, "sk": {"S": "CONN#1"}}}}]});
        let paid = costs("TransactWriteItems", &transaction, &json!({}));
        assert_eq!(paid, vec![("CONN#1".into(), 0.0, 2.0, 0, 0), ("ROOM#t#r".into(), 0.0, 2.0, 0, 0)]);
        // A batch's items each a read of its own (rounded up to 4 KB, half when eventually
        // consistent); a Scan's under the table.
        let item = json!({"pk": {"S": "ROOM#t#r"}, "sk": {"S": "CONN#1"}});
        let batch = json!({"RequestItems": {"t": {"Keys": [item.clone(), item.clone()]}}});
        let paid = costs("BatchGetItem", &batch, &json!({"Responses": {"t": [item.clone(), item.clone()]}}));
        assert_eq!(paid, vec![("ROOM#t#r".into(), 0.5, 0.0, 18, 1), ("ROOM#t#r".into(), 0.5, 0.0, 18, 1)]);
        let scan = json!({"TableName": "t"});
        let paid = costs("Scan", &scan, &json!({"Items": [item.clone(), item], "ScannedCount": 2}));
        assert_eq!(paid, vec![("scan:t".into(), 0.5, 0.0, 36, 2)]);
    }
}
