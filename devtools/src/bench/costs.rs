//! `roomcast bench costs`: what the sweeper and a history page read, against a table that holds
//! far more than either serves — by default 100,000 messages and 20,000 connections, each
//! present in a room — on moto behind the partition layer ([`crate::partitions`]), which counts
//! every item and byte each call reads, as DynamoDB charges them.
//!
//! * **The table** is written straight to moto (not counted): `--messages` messages of about
//!   200 bytes in rooms of 1,000, a room `big` of 60 messages of 20 KB, and `--connections`
//!   connections in rooms of `--room-size`, each with its membership and its user's presence
//!   item, of which `--stale` were last seen an hour ago.
//! * **A sweep**, before and after, in the same run: before its index the sweeper read the table
//!   with a Scan (what it read is what that Scan reads here; a filter makes no Scan cheaper);
//!   today's [`crate::admin::Admin::sweep`] is run against an `@connections` that answers
//!   `GetConnection` after `--latency`, 410 for the stale connections. Its reads are split into
//!   the stale connections (the index's `SWEEP#NN` keys), the present users (`SWEEP#PNN`) and the
//!   rest (the reconciliation's reads of memberships, the lease).
//! * **A history page** of each room, before and after: before, `limit + 1` whole messages (101
//!   for the largest page) whatever their size; today, pages of 4, 8, 16, … stopped once their
//!   text passes one frame.
//!
//! Reported: each figure as items, bytes and read units, and the ratio of before to after.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
use futures::StreamExt;
use serde::Serialize;

use crate::model::{Clock, Connection, JoinReason, Message, Name, NewConnection, Presence, SystemClock};
use crate::partitions::{PartitionLimits, Partitions};
use crate::store::Store;

const TENANT: &str = "bench";

#[derive(Clone, Debug)]
pub struct CostsOptions {
    /// moto (start it with tests/moto_server.py).
    pub dynamodb_endpoint: String,
    pub messages: usize,
    pub connections: usize,
    pub stale: usize,
    pub room_size: usize,
    /// How long `GetConnection` takes to answer.
    pub latency: Duration,
}

/// What a set of calls read, as DynamoDB charges it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Reads {
    pub items: u64,
    pub bytes: u64,
    pub read_units: f64,
    pub calls: u64,
}

impl Reads {
    fn of<'a>(stats: impl IntoIterator<Item = &'a crate::partitions::KeyStats>) -> Reads {
        stats.into_iter().fold(Reads::default(), |r, s| Reads {
            items: r.items + s.items_read,
            bytes: r.bytes + s.bytes_read,
            read_units: r.read_units + s.read_units,
            calls: r.calls + s.calls,
        })
    }

    /// What the layer counted since its last reset, for the keys `pick` accepts.
    fn counted(partitions: &Partitions, pick: impl Fn(&str) -> bool) -> Reads {
        let all = partitions.all();
        Reads::of(all.iter().filter(|(key, _)| pick(key)).map(|(_, stats)| stats))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct HistoryCost {
    pub room: String,
    pub message_bytes: usize,
    pub messages_in_room: usize,
    /// Messages the page returns (today's: what fits one frame).
    pub returned: usize,
    pub before: Reads,
    pub after: Reads,
}

#[derive(Clone, Debug, Serialize)]
pub struct CostsReport {
    /// The table as a Scan reads it.
    pub table_items: u64,
    pub table_bytes: u64,
    pub messages: usize,
    pub connections: usize,
    pub stale: usize,
    pub seed_s: f64,
    /// The sweep before its index: a Scan of the table.
    pub sweep_before: Reads,
    /// Today's sweep, everything it read.
    pub sweep_after: Reads,
    /// Of that: the stale connections (`SWEEP#NN`).
    pub sweep_stale: Reads,
    /// The present users (`SWEEP#PNN`).
    pub sweep_present: Reads,
    /// The rest: the reconciliation's reads of memberships, and the lease.
    pub sweep_other: Reads,
    /// Items read before over items read today.
    pub sweep_items_ratio: f64,
    pub sweep_s: f64,
    pub checked: usize,
    pub cleaned: usize,
    pub shards: u32,
    pub probe_latency_ms: f64,
    pub history: Vec<HistoryCost>,
}

pub async fn run(options: &CostsOptions) -> anyhow::Result<CostsReport> {
    let limits = PartitionLimits { latency: Duration::ZERO, ..PartitionLimits::default() };
    let partitions = Partitions::start(&options.dynamodb_endpoint, limits).await?;
    let sdk = super::fanout::sdk_config();
    let direct = crate::config::dynamodb_client(&sdk, Some(&options.dynamodb_endpoint));
    let table = format!("bench-costs-{}", std::process::id());
    crate::store::dynamodb::create_table(&direct, &table).await?;
    let counted = crate::config::dynamodb_client(&sdk, Some(&partitions.endpoint));
    let store: Arc<dyn Store> = Arc::new(crate::store::dynamodb::DynamoStore::new(counted.clone(), table.clone()));
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let now = clock.now();

    let started = Instant::now();
    seed(&direct, &table, options, now).await?;
    let seed_s = started.elapsed().as_secs_f64();

    // Before the index: the sweeper's Scan of the whole table.
    partitions.reset();
    let mut start = None;
    loop {
        let page = counted.scan().table_name(&table).set_exclusive_start_key(start).send().await?;
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            break;
        }
    }
    let sweep_before = Reads::counted(&partitions, |_| true);

    // Today's sweep, against an `@connections` that answers after the latency.
    let probes = ProbeEndpoint::start(options.latency).await?;
    let delivery =
        crate::deliver::DeliverySettings { endpoint_override: Some(probes.url.clone()), ..Default::default() };
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let deliverer =
        crate::assembly::Assembly::new(sdk, store.clone(), clock.clone(), metrics).with_delivery(delivery).deliverer();
    let admin = crate::admin::Admin {
        store: store.clone(),
        deliverer: Arc::new(deliverer),
        clock: clock.clone(),
        idle_limit: Duration::from_secs(600),
        presence_grace: Duration::from_secs(crate::presence::RECONCILE_GRACE_SECONDS as u64),
        connection_ttl: Duration::from_secs(7200),
    };
    partitions.reset();
    let started = Instant::now();
    let swept = admin.sweep(Duration::from_secs(600)).await?;
    let sweep_s = started.elapsed().as_secs_f64();
    let index = |key: &str, present: bool| {
        key.strip_prefix("sweepPk:SWEEP#").is_some_and(|rest| rest.starts_with('P') == present)
    };
    let sweep_after = Reads::counted(&partitions, |_| true);
    let sweep_stale = Reads::counted(&partitions, |k| index(k, false));
    let sweep_present = Reads::counted(&partitions, |k| index(k, true));
    let sweep_other = Reads::counted(&partitions, |k| !k.starts_with("sweepPk:"));

    let mut history = Vec::new();
    for (room, message_bytes, messages_in_room) in
        [("m0000".to_string(), SMALL_BODY, options.messages.min(ROOM_MESSAGES)), ("big".into(), BIG_BODY, BIG_MESSAGES)]
    {
        let latest = crate::store::HistoryFrom::Latest;
        let limit = crate::protocol::MAX_HISTORY_LIMIT + 1;
        partitions.reset();
        store.history(TENANT, &room, &latest, limit, now, None).await?;
        let before = Reads::counted(&partitions, |_| true);
        partitions.reset();
        let frame = crate::protocol::MAX_OUTGOING_BYTES;
        let page = store.history_page(TENANT, &room, &latest, limit, now, None, frame).await?;
        let after = Reads::counted(&partitions, |_| true);
        history.push(HistoryCost { room, message_bytes, messages_in_room, returned: page.len(), before, after });
    }
    let report = CostsReport {
        table_items: sweep_before.items,
        table_bytes: sweep_before.bytes,
        messages: options.messages,
        connections: options.connections,
        stale: options.stale,
        seed_s,
        sweep_before,
        sweep_after,
        sweep_stale,
        sweep_present,
        sweep_other,
        sweep_items_ratio: sweep_before.items as f64 / sweep_after.items.max(1) as f64,
        sweep_s,
        checked: swept.checked,
        cleaned: swept.cleaned,
        shards: swept.shards,
        probe_latency_ms: options.latency.as_secs_f64() * 1000.0,
        history,
    };
    direct.delete_table().table_name(&table).send().await?;
    Ok(report)
}

const SMALL_BODY: usize = 200;
const BIG_BODY: usize = 20_000;
const BIG_MESSAGES: usize = 60;
/// Messages per room of the background traffic.
const ROOM_MESSAGES: usize = 1000;

/// Writes the table straight to moto, 25 items a call, four calls at a time.
async fn seed(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    options: &CostsOptions,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<()> {
    let tenant = Name::parse("tenant", TENANT).map_err(anyhow::Error::msg)?;
    let item = |value: serde_dynamo::Item| -> WriteRequest {
        let item = crate::model::with_sweep_keys(value);
        let put = PutRequest::builder().set_item(Some(item.into())).build().expect("an item");
        WriteRequest::builder().put_request(put).build()
    };
    let mut items: Vec<WriteRequest> = Vec::new();
    for i in 0..options.messages {
        let room = format!("m{:04}", i / ROOM_MESSAGES);
        let at = now - chrono::Duration::milliseconds((options.messages - i) as i64);
        let body = format!("{i:06} {}", "x".repeat(SMALL_BODY - 7));
        items.push(item(serde_dynamo::to_item(Message::published(TENANT, &room, "u", body, at, 7 * 86_400))?));
    }
    for i in 0..BIG_MESSAGES {
        let at = now - chrono::Duration::milliseconds((BIG_MESSAGES - i) as i64);
        let body = format!("{i:03} {}", "x".repeat(BIG_BODY - 4));
        items.push(item(serde_dynamo::to_item(Message::published(TENANT, "big", "u", body, at, 7 * 86_400))?));
    }
    for i in 0..options.connections {
        let (id, seen) = if i < options.stale {
            (format!("stale-{i:07}"), now - chrono::Duration::seconds(3600))
        } else {
            (format!("live-{i:07}"), now)
        };
        let room = format!("r{:05}", i / options.room_size.max(1));
        let user = format!("u{i:07}");
        let connection = Connection::new(NewConnection {
            connection_id: &id,
            tenant: &tenant,
            user_id: &user,
            connection_type: Some("client".into()),
            deployment_id: None,
            rooms: [room.clone()].into(),
            endpoint: "https://bench.execute-api.us-east-1.amazonaws.com/bench".into(),
            now: seen,
            ttl_seconds: 7200,
        });
        let membership = connection.membership(&room, JoinReason::Connect, seen);
        let mut presence = Presence::new(TENANT, &room, &user, seen);
        presence.connections.insert(id.clone());
        presence.marks.insert(id.clone(), format!("{i:021}"));
        items.push(item(serde_dynamo::to_item(&connection)?));
        items.push(item(serde_dynamo::to_item(&membership)?));
        items.push(item(serde_dynamo::to_item(&presence)?));
    }
    let batches: Vec<Vec<WriteRequest>> = items.chunks(25).map(<[WriteRequest]>::to_vec).collect();
    let mut writes = futures::stream::iter(batches)
        .map(|batch| async move {
            let mut pending = batch;
            while !pending.is_empty() {
                let out = client.batch_write_item().request_items(table, pending).send().await?;
                pending = out.unprocessed_items().and_then(|u| u.get(table)).cloned().unwrap_or_default();
            }
            anyhow::Ok(())
        })
        .buffer_unordered(4);
    while let Some(written) = writes.next().await {
        written?;
    }
    Ok(())
}

/// `GetConnection` as API Gateway answers it from a Lambda: after the latency, 410 for the
/// bench's stale connections (`stale-…`), 200 for the others; `DELETE` answered 204.
struct ProbeEndpoint {
    url: String,
}

impl ProbeEndpoint {
    async fn start(latency: Duration) -> anyhow::Result<ProbeEndpoint> {
        use axum::extract::{Path, State};
        use axum::http::StatusCode;
        use axum::response::IntoResponse;
        async fn get(State(latency): State<Duration>, Path(id): Path<String>) -> axum::response::Response {
            tokio::time::sleep(latency).await;
            if id.starts_with("stale-") {
                let mut response = (StatusCode::GONE, r#"{"message":null}"#).into_response();
                response.headers_mut().insert("x-amzn-ErrorType", http::HeaderValue::from_static("GoneException"));
                response
            } else {
                (StatusCode::OK, r#"{"ConnectedAt":"2026-01-01T00:00:00Z","Identity":{"SourceIp":"127.0.0.1"}}"#)
                    .into_response()
            }
        }
        async fn delete(State(latency): State<Duration>) -> StatusCode {
            tokio::time::sleep(latency).await;
            StatusCode::NO_CONTENT
        }
        let app = axum::Router::new()
            .route("/bench/@connections/{id}", axum::routing::get(get).delete(delete))
            .with_state(latency);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/bench", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(ProbeEndpoint { url })
    }
}

impl CostsReport {
    pub fn table(&self) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let reads = |r: &Reads| {
            format!("{:>9} items {:>9.2} MiB {:>9.1} units {:>6} calls", r.items, mib(r.bytes), r.read_units, r.calls)
        };
        let mut out = format!(
            "a table of {} items ({:.1} MiB): {} messages, {} connections ({} stale, each present in a room), written in {:.1} s\n\n",
            self.table_items,
            mib(self.table_bytes),
            self.messages,
            self.connections,
            self.stale,
            self.seed_s
        );
        out += "sweep\n";
        out += &format!("  before (a Scan of the table)  {}\n", reads(&self.sweep_before));
        out += &format!("  today                         {}\n", reads(&self.sweep_after));
        out += &format!("    stale connections           {}\n", reads(&self.sweep_stale));
        out += &format!("    present users               {}\n", reads(&self.sweep_present));
        out += &format!("    memberships, lease          {}\n", reads(&self.sweep_other));
        out += &format!(
            "  {:.1}x fewer items; {} checked, {} cleaned, {} shards in {:.2} s (GetConnection after {:.0} ms)\n\n",
            self.sweep_items_ratio, self.checked, self.cleaned, self.shards, self.sweep_s, self.probe_latency_ms
        );
        out += "a history page (limit 100)\n";
        for h in &self.history {
            out += &format!(
                "  room {} ({} messages of {} B), {} returned\n    before {}\n    today  {}\n",
                h.room,
                h.messages_in_room,
                h.message_bytes,
                h.returned,
                reads(&h.before),
                reads(&h.after)
            );
        }
        out
    }
}
