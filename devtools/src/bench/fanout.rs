//! `roomcast bench fanout`: one processor's fan-out as AWS runs it, against the physical limit.
//!
//! * **The endpoint** is a child process (`roomcast bench endpoint`, hidden): `@connections` that
//!   answers every call after the latency (with jitter) and enforces the account's quota with a
//!   token bucket ([`crate::gateway::account`]), starting empty, so that over the run the most the
//!   account can admit is the quota itself. It counts each connection's deliveries, so the bench
//!   checks that every member was served exactly once per message.
//! * **The processor** runs in this process, as in a warm Lambda container: the real
//!   `Processor` and `Deliverer` (the real SDK client, the adaptive limit) over the embedded
//!   store, whose room of N members is seeded directly. Each room size gets a fresh processor.
//! * **Per room size:** M message records in one batch, as the stream delivers them, then, in the
//!   shard's next batch, M messages to a room of [`SMALL_ROOM`]. Deliveries a second are every
//!   accepted call until the big room's fan-out is done, over that time; the ratio is to the
//!   quota; CPU is this process's user + system time over it, per delivery. The small room's
//!   time is when its batch was done, from the start: without the fan-out stage it waits for the
//!   whole big fan-out; with it (`--handoff-recipients`, on by default), only for the hand-off.
//!
//! Nothing here opens a WebSocket: the client side of fan-out is API Gateway's work, not ours.

use crate::store::{ConnectionStore, HistoryStore, MembershipStore};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::gateway::account::{Account, AccountSettings};

#[derive(Clone, Debug)]
pub struct FanoutOptions {
    pub binary: std::path::PathBuf,
    pub room_sizes: Vec<usize>,
    pub messages: usize,
    pub account: AccountSettings,
    /// The deliverer's ceiling on calls in flight (`ROOMCAST_DELIVERY_CONCURRENCY`).
    pub concurrency: usize,
    /// A DynamoDB API (moto) for the processor's reads, behind one partition's limits
    /// ([`crate::partitions`], run in the endpoint's process); the embedded store otherwise.
    pub dynamodb_endpoint: Option<String>,
    /// Whether the processor keeps rooms' rosters (`--no-roster`: it reads the room for every
    /// message, the figure before rosters).
    pub roster: bool,
    /// Frames for this many recipients or more go to an in-process fan-out stage; 0: none.
    pub handoff_recipients: usize,
}

/// The room whose next batch waits behind the big one.
pub const SMALL_ROOM: usize = 10;

#[derive(Clone, Debug, Serialize)]
pub struct FanoutReport {
    pub cores: usize,
    pub latency_ms: f64,
    pub jitter_ms: f64,
    /// The account's quota, calls a second: the physical limit.
    pub quota: f64,
    pub concurrency_ceiling: usize,
    pub roster: bool,
    pub handoff_recipients: usize,
    pub rooms: Vec<RoomRun>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RoomRun {
    pub room_size: usize,
    pub messages: usize,
    pub expected: u64,
    /// Calls the endpoint accepted.
    pub deliveries: u64,
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// Deliveries a second over the quota.
    pub fraction_of_quota: f64,
    /// This process's CPU time over the batch, per delivery.
    pub cpu_us_per_delivery: f64,
    /// Calls answered 429 for the quota.
    pub throttled: u64,
    pub peak_in_flight: usize,
    /// Seconds from the big batch's start until the next batch, `messages` to a room of
    /// [`SMALL_ROOM`], was done: how long the big room held up its shard.
    pub small_room_served_s: f64,
    /// Whether the big room's frames went to the fan-out stage.
    pub staged: bool,
    /// Every member (of both rooms) served exactly `messages` times.
    pub served_once_each: bool,
    pub batch_failed: bool,
    /// With `--dynamodb-endpoint`: what reading the room cost, per message.
    pub reads: Option<Reads>,
}

/// What one message's fan-out read from the room's partition key and its roster version's.
#[derive(Clone, Debug, Serialize)]
pub struct Reads {
    /// Times the processor read the room's memberships in full over the batch, and times it
    /// served them from its roster (the version unchanged).
    pub full_reads: u64,
    pub kept: u64,
    pub items_per_message: f64,
    pub kib_per_message: f64,
    pub read_units_per_message: f64,
    /// The room key's read units a second over the batch, over one partition's 3,000.
    pub fraction_of_partition: f64,
    /// Reads of the room's keys answered ProvisionedThroughputExceededException.
    pub throttled: u64,
}

pub async fn run(options: &FanoutOptions) -> anyhow::Result<FanoutReport> {
    let endpoint = Endpoint::start(&options.binary, options.account, options.dynamodb_endpoint.as_deref()).await?;
    let mut rooms = Vec::new();
    for &size in &options.room_sizes {
        rooms.push(run_room(&endpoint, options, size).await?);
    }
    Ok(FanoutReport {
        cores: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        latency_ms: options.account.latency.as_secs_f64() * 1000.0,
        jitter_ms: options.account.jitter.as_secs_f64() * 1000.0,
        quota: options.account.quota.unwrap_or(f64::INFINITY),
        concurrency_ceiling: options.concurrency,
        roster: options.roster,
        handoff_recipients: options.handoff_recipients,
        rooms,
    })
}

async fn run_room(endpoint: &Endpoint, options: &FanoutOptions, size: usize) -> anyhow::Result<RoomRun> {
    use crate::model::{Clock, Message, Name, SystemClock};
    use crate::store::Store;

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let store = crate::store::memory::MemoryStore::with_metrics(clock.clone(), metrics.clone());
    let mut stream = store.subscribe();
    let tenant = Name::parse("tenant", "bench").map_err(anyhow::Error::msg)?;
    let room = format!("room-{size}");
    let sender = seed_room(&store, None, &tenant, &room, &format!("c{size}"), size, &endpoint.url).await?;
    // The seeding's own records (welcomes, presence) are not what this measures.
    while stream.try_recv().is_ok() {}
    // With DynamoDB, the processor reads the room there (through the partition layer); the
    // embedded store only makes the stream records.
    let dynamo = match (&options.dynamodb_endpoint, &endpoint.layer) {
        (Some(moto), Some(layer)) => {
            Some(seed_dynamodb(moto, layer, &store, &tenant, &room, size, metrics.clone()).await?)
        }
        _ => None,
    };
    // The room of ten, on the same shard: its members and their records (not measured).
    let small = format!("small-{size}");
    let small_sender =
        seed_room(&store, dynamo.as_deref(), &tenant, &small, &format!("s{size}"), SMALL_ROOM, &endpoint.url).await?;
    while stream.try_recv().is_ok() {}
    let batch = |room: &str, from: &crate::model::Connection| {
        let (room, from) = (room.to_string(), from.clone());
        let (store, clock) = (store.clone(), clock.clone());
        async move {
            for seq in 0..options.messages {
                let message = Message::new(&from, &room, format!("bench {seq}"), clock.now(), 3600);
                store.put_message(&message).await?;
            }
            anyhow::Ok(())
        }
    };
    batch(&room, &sender).await?;
    let mut raw = Vec::new();
    while let Ok(record) = stream.try_recv() {
        raw.push(serde_json::to_value(&record)?);
    }
    batch(&small, &small_sender).await?;
    let mut small_raw = Vec::new();
    while let Ok(record) = stream.try_recv() {
        small_raw.push(serde_json::to_value(&record)?);
    }

    let settings = crate::deliver::DeliverySettings {
        endpoint_override: Some(endpoint.url.clone()),
        concurrency: options.concurrency,
        ..Default::default()
    };
    let processor_store: Arc<dyn Store> = match &dynamo {
        Some(dynamo) => dynamo.clone(),
        None => store.clone(),
    };
    let assembly =
        crate::assembly::Assembly::new(sdk_config(), processor_store, clock, metrics.clone()).with_delivery(settings);
    let worker = assembly.deliverer();
    let mut processor = assembly.processor();
    if !options.roster {
        processor = processor.without_rosters();
    }
    let staged = options.handoff_recipients > 0 && size >= options.handoff_recipients;
    let stage = crate::deliver::stage::LocalStage::new(worker);
    if options.handoff_recipients > 0 {
        processor = processor.with_hand_off(crate::deliver::stage::HandOff {
            stage: stage.clone(),
            recipients: options.handoff_recipients,
        });
    }
    let before = metrics.snapshot();

    endpoint.reset().await?;
    let cpu_before = super::cpu_seconds(std::process::id());
    let started = Instant::now();
    let outcome = processor.process_batch(&raw).await;
    // What the big room's batch read (the small room's reads are not this figure's).
    let big_ran = metrics.snapshot().since(&before);
    // The shard's next batch, given once the big one has answered.
    let small_outcome = processor.process_batch(&small_raw).await;
    let small_room_served_s = started.elapsed().as_secs_f64();
    stage.idle().await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = super::cpu_seconds(std::process::id()).zip(cpu_before).map(|(after, before)| after - before);
    let counts = endpoint.counts().await?;
    let expected = ((size + SMALL_ROOM) * options.messages) as u64;
    let reads = match dynamo {
        Some(_) => {
            let stats = endpoint.partition(&crate::model::room_pk(tenant.as_str(), &room)).await?;
            let version = endpoint.partition(&crate::model::roster_pk(tenant.as_str(), &room)).await?;
            let per = |x: f64| x / options.messages as f64;
            Some(Reads {
                full_reads: big_ran.roster_reads,
                kept: big_ran.roster_kept,
                items_per_message: per((stats.items_read + version.items_read) as f64),
                kib_per_message: per((stats.bytes_read + version.bytes_read) as f64 / 1024.0),
                read_units_per_message: per(stats.read_units + version.read_units),
                fraction_of_partition: stats.read_units.max(version.read_units)
                    / seconds
                    / crate::partitions::READ_UNITS_PER_SECOND,
                throttled: stats.throttled + version.throttled,
            })
        }
        None => None,
    };
    let deliveries_per_second = counts.answered as f64 / seconds;
    Ok(RoomRun {
        room_size: size,
        messages: options.messages,
        expected,
        deliveries: counts.answered,
        seconds,
        deliveries_per_second,
        fraction_of_quota: deliveries_per_second / options.account.quota.unwrap_or(f64::INFINITY),
        cpu_us_per_delivery: cpu.map_or(f64::NAN, |c| c * 1e6 / counts.answered.max(1) as f64),
        throttled: counts.throttled,
        peak_in_flight: counts.peak_in_flight,
        small_room_served_s,
        staged,
        served_once_each: counts.connections == size + SMALL_ROOM
            && counts.least == options.messages as u64
            && counts.most == options.messages as u64,
        batch_failed: outcome.failure.is_some() || small_outcome.failure.is_some(),
        reads,
    })
}

/// `size` connections of `tenant` in `room` (ids `{prefix}-{i:06}`), each its own user, written to
/// `store` and, if given, `also`; the first of them, to send from.
async fn seed_room(
    store: &crate::store::memory::MemoryStore,
    also: Option<&dyn crate::store::Store>,
    tenant: &crate::model::Name,
    room: &str,
    prefix: &str,
    size: usize,
    endpoint: &str,
) -> anyhow::Result<crate::model::Connection> {
    use crate::model::{JoinReason, NewConnection};
    let now = chrono::Utc::now();
    let mut first = None;
    for i in 0..size {
        let connection = crate::model::Connection::new(NewConnection {
            connection_id: &format!("{prefix}-{i:06}"),
            tenant,
            user_id: &format!("{prefix}u{i}"),
            connection_type: None,
            deployment_id: None,
            rooms: BTreeSet::from([room.to_string()]),
            endpoint: endpoint.to_string(),
            now,
            ttl_seconds: 3600,
        });
        let membership = [connection.membership(room, JoinReason::Connect, now)];
        store.put_connection(&connection, &membership).await?;
        if let Some(also) = also {
            also.put_connection(&connection, &membership).await?;
        }
        first.get_or_insert(connection);
    }
    first.ok_or_else(|| anyhow::anyhow!("a room needs at least one member"))
}

/// A table on `moto` holding the room's memberships (written to moto directly, not charged),
/// and a store that reads it through the partition layer.
async fn seed_dynamodb(
    moto: &str,
    layer: &str,
    seeded: &crate::store::memory::MemoryStore,
    tenant: &crate::model::Name,
    room: &str,
    size: usize,
    metrics: Arc<crate::metrics::Metrics>,
) -> anyhow::Result<Arc<dyn crate::store::Store>> {
    use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
    let sdk = sdk_config();
    let direct = crate::config::dynamodb_client(&sdk, Some(moto));
    let table = format!("bench-fanout-{}-{size}", std::process::id());
    crate::store::dynamodb::create_table(&direct, &table).await?;
    let members = seeded.room_members(tenant.as_str(), room, chrono::Utc::now()).await?;
    anyhow::ensure!(members.len() == size, "seeded {} members of {size}", members.len());
    for chunk in members.chunks(25) {
        let mut requests = Vec::with_capacity(chunk.len());
        for membership in chunk {
            let item: serde_dynamo::Item = serde_dynamo::to_item(membership)?;
            requests.push(
                WriteRequest::builder().put_request(PutRequest::builder().set_item(Some(item.into())).build()?).build(),
            );
        }
        direct.batch_write_item().request_items(&table, requests).send().await?;
    }
    // The roster version the processor would have left, handling the members' joins.
    direct
        .put_item()
        .table_name(&table)
        .item("pk", aws_sdk_dynamodb::types::AttributeValue::S(crate::model::roster_pk(tenant.as_str(), room)))
        .item("sk", aws_sdk_dynamodb::types::AttributeValue::S(crate::model::ROSTER_VERSION_SK.into()))
        .item("v", aws_sdk_dynamodb::types::AttributeValue::N(size.to_string()))
        .send()
        .await?;
    let through_layer = crate::config::dynamodb_client(&sdk, Some(layer));
    Ok(Arc::new(crate::store::dynamodb::DynamoStore::new(through_layer, table).with_metrics(metrics)))
}

pub(crate) fn sdk_config() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(
            aws_credential_types::Credentials::new("bench", "bench", None, None, "bench"),
        ))
        .build()
}

impl FanoutReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "@connections: {:.0} ms + up to {:.0} ms jitter a call, quota {:.0}/s (the bucket starts empty); \
             calls in flight adapt up to {}; {} cores; rosters {}; fan-out stage {}\n\n",
            self.latency_ms,
            self.jitter_ms,
            self.quota,
            self.concurrency_ceiling,
            self.cores,
            if self.roster { "kept" } else { "off (--no-roster: the room read for every message)" },
            if self.handoff_recipients > 0 {
                format!("from {} recipients", self.handoff_recipients)
            } else {
                "off (every frame served in its batch)".to_string()
            }
        );
        out.push_str(&format!(
            "| room | messages | staged | deliveries | seconds | deliveries/s | × quota | CPU µs/delivery | 429s | peak in flight | next batch (room of {SMALL_ROOM}) done after | each served once |\n"
        ));
        out.push_str("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
        let reads: Vec<&RoomRun> = self.rooms.iter().filter(|r| r.reads.is_some()).collect();
        for r in &self.rooms {
            out.push_str(&format!(
                "| {} | {} | {} | {}/{} | {:.2} | {:.0} | {:.2} | {:.1} | {} | {} | {:.2} s | {} |\n",
                r.room_size,
                r.messages,
                if r.staged { "yes" } else { "no" },
                r.deliveries,
                r.expected,
                r.seconds,
                r.deliveries_per_second,
                r.fraction_of_quota,
                r.cpu_us_per_delivery,
                r.throttled,
                r.peak_in_flight,
                r.small_room_served_s,
                if r.served_once_each && !r.batch_failed { "yes" } else { "NO" },
            ));
        }
        if !reads.is_empty() {
            out.push_str(
                "\nReading the room (DynamoDB behind one partition's limits; CPU above includes no layer work):\n\n",
            );
            out.push_str("| room | room read in full / kept | items read / message | KiB / message | read units / message | × one partition's 3,000 units/s | throttled reads |\n");
            out.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
            for r in reads {
                let x = r.reads.as_ref().expect("filtered");
                out.push_str(&format!(
                    "| {} | {} / {} | {:.1} | {:.1} | {:.1} | {:.2} | {} |\n",
                    r.room_size,
                    x.full_reads,
                    x.kept,
                    x.items_per_message,
                    x.kib_per_message,
                    x.read_units_per_message,
                    x.fraction_of_partition,
                    x.throttled
                ));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// the endpoint: a child process, so that this process's CPU time is the processor's alone

/// What the endpoint counted since its last reset.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct EndpointCounts {
    pub answered: u64,
    pub throttled: u64,
    pub peak_in_flight: usize,
    /// Distinct connections served, and the fewest and most deliveries one of them got.
    pub connections: usize,
    pub least: u64,
    pub most: u64,
}

pub(crate) struct Endpoint {
    pub(crate) url: String,
    base: String,
    /// The partition layer in the endpoint's process, with `--dynamodb-upstream`.
    pub(crate) layer: Option<String>,
    _child: tokio::process::Child,
}

impl Endpoint {
    pub(crate) async fn start(
        binary: &std::path::Path,
        account: AccountSettings,
        dynamodb: Option<&str>,
    ) -> anyhow::Result<Endpoint> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = tokio::process::Command::new(binary);
        command.args(["bench", "endpoint", "--port", &port.to_string()]);
        command.args(["--latency", &format!("{}ms", account.latency.as_secs_f64() * 1000.0)]);
        command.args(["--jitter", &format!("{}ms", account.jitter.as_secs_f64() * 1000.0)]);
        command.args(["--quota", &account.quota.unwrap_or(0.0).to_string()]);
        if let Some(upstream) = dynamodb {
            command.args(["--dynamodb-upstream", upstream]);
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {} bench endpoint: {e}", binary.display()))?;
        let base = format!("http://127.0.0.1:{port}");
        let mut endpoint = Endpoint { url: format!("{base}/bench"), base, layer: None, _child: child };
        let started = Instant::now();
        while endpoint.counts().await.is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("the bench endpoint did not answer on port {port} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if dynamodb.is_some() {
            let layer = crate::dev::api::request(&endpoint.base, http::Method::GET, "/_layer", Vec::new()).await?;
            endpoint.layer = layer["endpoint"].as_str().map(str::to_string);
        }
        Ok(endpoint)
    }

    pub(crate) async fn partition(&self, key: &str) -> anyhow::Result<crate::partitions::KeyStats> {
        let path = format!("/_partitions?key={}", key.replace('#', "%23"));
        let value = crate::dev::api::request(&self.base, http::Method::GET, &path, Vec::new()).await?;
        Ok(serde_json::from_value(value)?)
    }

    pub(crate) async fn counts(&self) -> anyhow::Result<EndpointCounts> {
        let value = crate::dev::api::request(&self.base, http::Method::GET, "/_counts", Vec::new()).await?;
        Ok(serde_json::from_value(value)?)
    }

    pub(crate) async fn reset(&self) -> anyhow::Result<()> {
        crate::dev::api::request(&self.base, http::Method::POST, "/_reset", Vec::new()).await?;
        Ok(())
    }
}

struct Served {
    account: Account,
    per_connection: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    partitions: Option<crate::partitions::Partitions>,
}

/// `roomcast bench endpoint`: serves `@connections` POSTs through the account until killed,
/// and, with `dynamodb_upstream`, the partition layer in front of it.
pub async fn serve_endpoint(
    port: u16,
    account: AccountSettings,
    dynamodb_upstream: Option<String>,
) -> anyhow::Result<()> {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    let partitions = match dynamodb_upstream {
        Some(upstream) => Some(crate::partitions::Partitions::start(&upstream, Default::default()).await?),
        None => None,
    };
    let served = Arc::new(Served { account: Account::new(account), per_connection: Default::default(), partitions });
    async fn post(State(s): State<Arc<Served>>, Path(id): Path<String>) -> axum::response::Response {
        let (_call, admitted) = s.account.admit();
        s.account.delay().await;
        if admitted.is_err() {
            let mut response = (StatusCode::TOO_MANY_REQUESTS, r#"{"message":"Rate exceeded"}"#).into_response();
            response.headers_mut().insert("x-amzn-ErrorType", http::HeaderValue::from_static("LimitExceededException"));
            return response;
        }
        *s.per_connection.lock().unwrap_or_else(|p| p.into_inner()).entry(id).or_default() += 1;
        StatusCode::OK.into_response()
    }
    async fn counts(State(s): State<Arc<Served>>) -> axum::Json<EndpointCounts> {
        let per = s.per_connection.lock().unwrap_or_else(|p| p.into_inner());
        axum::Json(EndpointCounts {
            answered: per.values().sum(),
            throttled: s.account.throttled(),
            peak_in_flight: s.account.peak_in_flight(),
            connections: per.len(),
            least: per.values().copied().min().unwrap_or(0),
            most: per.values().copied().max().unwrap_or(0),
        })
    }
    async fn reset(State(s): State<Arc<Served>>) -> axum::Json<serde_json::Value> {
        s.per_connection.lock().unwrap_or_else(|p| p.into_inner()).clear();
        s.account.reset();
        if let Some(partitions) = &s.partitions {
            partitions.reset();
        }
        axum::Json(serde_json::json!({}))
    }
    async fn layer(State(s): State<Arc<Served>>) -> axum::Json<serde_json::Value> {
        axum::Json(serde_json::json!({ "endpoint": s.partitions.as_ref().map(|p| p.endpoint.clone()) }))
    }
    async fn partition(
        State(s): State<Arc<Served>>,
        axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
    ) -> axum::Json<crate::partitions::KeyStats> {
        let key = q.get("key").map(String::as_str).unwrap_or("");
        axum::Json(s.partitions.as_ref().map(|p| p.stats(key)).unwrap_or_default())
    }
    let app = axum::Router::new()
        .route("/_layer", axum::routing::get(layer))
        .route("/_partitions", axum::routing::get(partition))
        .route("/bench/@connections/{id}", axum::routing::post(post))
        .route("/_counts", axum::routing::get(counts))
        .route("/_reset", axum::routing::post(reset))
        .with_state(served);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
