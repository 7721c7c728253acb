//! `roomcast bench`: the local stack under load, over real WebSockets on loopback, measured the
//! way its users would compare it — and against the physical limit of the same path.
//!
//! 1. Starts `roomcast dev` as a child process (or uses `--url`): the gateway emulator, the
//!    embedded store and its stream, the processor, `@connections` — everything the server does
//!    is in that one process, whose CPU time and peak memory are read from `/proc`.
//! 2. The limit: concurrent `PostToConnection` calls through the real SDK client to the stack's
//!    `@connections` API, to open connections, at the deliverer's concurrency and at four times
//!    it; the better posts per second is what fan-out is reported against.
//! 3. Per phase (no plugin; with a plugin for the phase's tenant): N connections in rooms of the
//!    given size, M messages at the given rate from one member of each room in turn. Every
//!    member's arrival is timed: latency is send → the last member's arrival, deliveries per
//!    second is every arrival over the phase, CPU per stream record is the server's CPU time over
//!    the records its processor handled.
//! 4. Memory: the server's resident set after the plugin is active for `plugin_tenants` tenants.
//!
//! Connections of a room share one user, so presence is announced once per room rather than
//! N² times: the bench measures messages, not the join storm.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;

use crate::dev::api::request;

pub mod costs;
pub mod fanout;
pub mod joins;

#[derive(Clone, Debug)]
pub struct Options {
    /// A running `roomcast dev` (`http://127.0.0.1:8080`); `None` starts one.
    pub url: Option<String>,
    /// The `roomcast` binary to start `dev` with.
    pub binary: std::path::PathBuf,
    pub connections: usize,
    pub room_size: usize,
    pub messages: usize,
    /// Messages per second.
    pub rate: f64,
    /// A component: adds the with-plugin phase and the memory measurement.
    pub plugin: Option<Vec<u8>>,
    /// `PostToConnection` calls for the raw rate.
    pub raw_posts: usize,
    /// Tenants running the plugin for the memory measurement.
    pub plugin_tenants: usize,
    /// A hostile component: adds the phase with a hostile tenant beside the plugin's.
    pub hostile: Option<Vec<u8>>,
    /// The hostile tenant's messages per second.
    pub hostile_rate: f64,
    /// With `hostile`: the flooding tenant's frames per second (its own rate limits, the
    /// defaults, hold it; the measured tenants have none).
    pub flood_rate: f64,
    /// The started `roomcast dev` uses this DynamoDB API instead of the embedded store.
    pub dynamodb_endpoint: Option<String>,
    /// The secret `$connect` tokens are signed with (the dev stack's).
    pub secret: Vec<u8>,
    /// Give up waiting for deliveries after this long.
    pub patience: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub machine: Machine,
    pub connections: usize,
    pub room_size: usize,
    pub rooms: usize,
    pub messages: usize,
    pub rate: f64,
    /// The physical limit of the path: `PostToConnection` calls per second.
    pub raw_posts_per_second: f64,
    pub phases: Vec<Phase>,
    pub memory: Option<Memory>,
    /// The server's resident set when it started, before any traffic.
    pub idle_rss_mib: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub server: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Phase {
    pub name: String,
    pub expected: u64,
    pub deliveries: u64,
    pub deliveries_per_second: f64,
    /// Deliveries per second over the raw `@connections` rate.
    pub fraction_of_raw: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub stream_records: u64,
    /// The server process's CPU time (user + system) per stream record processed.
    pub cpu_us_per_record: Option<f64>,
    pub peak_rss_mib: Option<f64>,
    /// The server's resident set once the phase's traffic has stopped and the stack settled.
    pub settled_rss_mib: Option<f64>,
    /// What a flooding tenant beside this phase did and was told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flood: Option<Flood>,
}

/// A flooding tenant's traffic: frames sent, and what became of them.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Flood {
    pub sent: u64,
    /// Acknowledged: within its limits.
    pub taken: u64,
    pub rate_limited: u64,
    /// Its connections the server closed for flooding.
    pub closed: u64,
    /// Its reconnects refused (`$connect` over its limit).
    pub refused_connects: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Memory {
    pub tenants: usize,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    pub peak_rss_mib: f64,
}

/// The server under test: its base URL and, when this bench started it, its process.
struct Server {
    base: String,
    child: Option<tokio::process::Child>,
}

impl Server {
    async fn start(options: &Options) -> anyhow::Result<Server> {
        if let Some(url) = &options.url {
            let server = Server { base: url.trim_end_matches('/').to_string(), child: None };
            server.counts().await.map_err(|e| anyhow::anyhow!("{url} is not a running `roomcast dev`: {e}"))?;
            return Ok(server);
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut command = tokio::process::Command::new(&options.binary);
        command.args(["dev", "--port", &port.to_string(), "--idle-timeout", "86400", "--max-connection", "86400"]);
        // The bench's senders go faster than a client may: no deployment-wide limit (a tenant's
        // own settings still apply).
        for name in crate::limits::NAMES {
            command.args(["--limit", &format!("{name}=0")]);
        }
        if let Some(endpoint) = &options.dynamodb_endpoint {
            command.args(["--dynamodb-endpoint", endpoint, "--table", &format!("bench-{}", std::process::id())]);
        }
        let child = command
            .env("RUST_LOG", "warn")
            .env("ROOMCAST_JWT_SECRET", String::from_utf8_lossy(&options.secret).as_ref())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {} dev: {e}", options.binary.display()))?;
        let server = Server { base: format!("http://127.0.0.1:{port}"), child: Some(child) };
        let started = Instant::now();
        while server.counts().await.is_err() {
            if started.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("roomcast dev did not answer on port {port} within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(tokio::process::Child::id)
    }

    async fn counts(&self) -> anyhow::Result<crate::metrics::Counts> {
        let value = request(&self.base, http::Method::GET, "/_dev/metrics", Vec::new()).await?;
        Ok(serde_json::from_value(value)?)
    }

    /// Waits until the processor has been idle for a while: nothing new in its counts (at most
    /// ten seconds: beside a hostile tenant's traffic it never is).
    async fn settle(&self) -> anyhow::Result<crate::metrics::Counts> {
        let mut last = self.counts().await?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let now = self.counts().await?;
            if now == last {
                return Ok(now);
            }
            last = now;
        }
        Ok(last)
    }

    fn ws_url(&self) -> String {
        format!("{}/local", self.base.replacen("http://", "ws://", 1))
    }
}

/// CPU seconds (user + system) of a process, from `/proc/PID/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| ticks / per_second as f64)
}

/// A `/proc/PID/status` size line (`VmRSS`, `VmHWM`), in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// What the connections' readers saw.
enum Seen {
    /// Welcomed, with the connection id the gateway gave it.
    Welcome(String),
    /// A bench message (its sequence number) arrived at this instant.
    Message(usize, Instant),
}

type Writer = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Frame,
>;

/// Whose traffic shares the stack with a phase's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Beside {
    Nobody,
    /// A tenant whose plugin misbehaves every way it can.
    Hostile,
    /// A tenant that sends far past its rate limits.
    Flood,
}

/// Open connections of one phase: a writer per room (its first member) and the readers' events.
struct Crowd {
    ids: Vec<String>,
    senders: Vec<Writer>,
    seen: mpsc::UnboundedReceiver<Seen>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

async fn open_crowd(server: &Server, options: &Options, tenant: &str) -> anyhow::Result<Crowd> {
    let rooms = options.connections.div_ceil(options.room_size.max(1));
    let (tx, seen) = mpsc::unbounded_channel();
    let exp = chrono::Utc::now().timestamp() + 6 * 3600;
    let base = server.ws_url();
    let opened = futures::stream::iter(0..options.connections)
        .map(|i| {
            let room = i / options.room_size.max(1);
            let claims = crate::auth::Claims {
                tenant: tenant.to_string(),
                sub: format!("member-{room}"),
                exp,
                nbf: None,
                scope: None,
                rooms: None,
                extra: Default::default(),
            };
            let url = format!("{base}?token={}&rooms=room-{room}", crate::auth::mint(&claims, &options.secret));
            async move {
                tokio_tungstenite::connect_async(url)
                    .await
                    .map(|(ws, _)| (i, room, ws))
                    .map_err(|e| anyhow::anyhow!("connection {i}: {e}"))
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let mut crowd = Crowd { ids: Vec::new(), senders: Vec::new(), seen, readers: Vec::new() };
    let mut writers: HashMap<usize, Writer> = HashMap::new();
    for result in opened {
        let (_, room, ws) = result?;
        let (writer, mut reader) = ws.split();
        writers.entry(room).or_insert(writer);
        let tx = tx.clone();
        crowd.readers.push(tokio::spawn(async move {
            while let Some(Ok(frame)) = reader.next().await {
                let Frame::Text(text) = frame else { continue };
                let at = Instant::now();
                let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                let seen = match value["action"].as_str() {
                    Some("welcome") => Seen::Welcome(value["connection_id"].as_str().unwrap_or("").to_string()),
                    Some("message") => match value["message"].as_str().and_then(|m| m.strip_prefix("bench ")) {
                        Some(seq) => match seq.parse() {
                            Ok(seq) => Seen::Message(seq, at),
                            Err(_) => continue,
                        },
                        None => continue,
                    },
                    _ => continue,
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        }));
    }
    for room in 0..rooms {
        crowd.senders.push(writers.remove(&room).ok_or_else(|| anyhow::anyhow!("room {room} has no connection"))?);
    }
    // Every connection is welcomed once the processor has handled its record.
    while crowd.ids.len() < options.connections {
        match tokio::time::timeout(options.patience, crowd.seen.recv()).await {
            Ok(Some(Seen::Welcome(id))) => crowd.ids.push(id),
            Ok(Some(_)) => {}
            _ => anyhow::bail!("only {} of {} connections were welcomed", crowd.ids.len(), options.connections),
        }
    }
    Ok(crowd)
}

/// Concurrent `PostToConnection` calls through the real SDK client to open connections.
async fn raw_rate(server: &Server, connection_ids: &[String], posts: usize) -> anyhow::Result<f64> {
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(
            aws_credential_types::Credentials::new("bench", "bench", None, None, "bench"),
        ))
        .build();
    let config = aws_sdk_apigatewaymanagement::config::Builder::from(&sdk)
        .endpoint_url(format!("{}/local", server.base))
        .retry_config(aws_sdk_apigatewaymanagement::config::retry::RetryConfig::disabled())
        .build();
    let client = aws_sdk_apigatewaymanagement::Client::from_conf(config);
    // A frame the size of a chat message, which the readers ignore.
    let body = aws_sdk_apigatewaymanagement::primitives::Blob::new(
        serde_json::json!({"action": "bench-raw", "message": "x".repeat(120), "room": "room-0", "user_id": "member-0",
                           "id": "018f0000-0000-7000-8000-000000000001", "timestamp": "2026-11-21T10:00:00.000Z"})
        .to_string(),
    );
    // The limit is the best the path does: the deliverer's own concurrency, and more.
    let deliverer = crate::deliver::DeliverySettings::default().initial_concurrency;
    let mut best: f64 = 0.0;
    for concurrency in [deliverer, deliverer * 4] {
        let started = Instant::now();
        let results: Vec<bool> = futures::stream::iter(0..posts)
            .map(|i| {
                let (client, body) = (client.clone(), body.clone());
                let id = connection_ids[i % connection_ids.len()].clone();
                async move { client.post_to_connection().connection_id(id).data(body).send().await.is_ok() }
            })
            .buffer_unordered(concurrency)
            .collect()
            .await;
        let elapsed = started.elapsed().as_secs_f64();
        let failed = results.iter().filter(|ok| !**ok).count();
        if failed > 0 {
            anyhow::bail!("{failed} of {posts} raw posts failed");
        }
        best = best.max(posts as f64 / elapsed);
    }
    Ok(best)
}

async fn run_phase(
    server: &Server,
    options: &Options,
    name: &str,
    raw: f64,
    crowd: &mut Crowd,
) -> anyhow::Result<Phase> {
    let rooms = crowd.senders.len();
    let before = server.settle().await?;
    // The peak is this phase's own: reset the process's high-water mark (Linux: clear_refs 5).
    if let Some(pid) = server.pid() {
        let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
    }
    let cpu_before = server.pid().and_then(cpu_seconds);
    let interval = Duration::from_secs_f64(1.0 / options.rate.max(0.001));
    let started = Instant::now();
    let mut sent_at = Vec::with_capacity(options.messages);
    for seq in 0..options.messages {
        tokio::time::sleep_until((started + interval * seq as u32).into()).await;
        let room = seq % rooms;
        let frame = serde_json::json!({"action": "sendMessage", "room": format!("room-{room}"), "message": format!("bench {seq}")});
        sent_at.push(Instant::now());
        crowd.senders[room].send(Frame::text(frame.to_string())).await?;
    }
    let members = |seq: usize| {
        let room = seq % rooms;
        (options.connections - room * options.room_size).min(options.room_size) as u64
    };
    let expected: u64 = (0..options.messages).map(members).sum();
    let mut last_arrival = vec![None::<Instant>; options.messages];
    let mut arrived = vec![0u64; options.messages];
    let mut deliveries = 0u64;
    let mut last = started;
    while deliveries < expected {
        match tokio::time::timeout(options.patience, crowd.seen.recv()).await {
            Ok(Some(Seen::Message(seq, at))) if seq < options.messages => {
                deliveries += 1;
                arrived[seq] += 1;
                last_arrival[seq] = Some(last_arrival[seq].map_or(at, |t: Instant| t.max(at)));
                last = last.max(at);
            }
            Ok(Some(_)) => {}
            _ => break, // nothing for `patience`: report what arrived
        }
    }
    let after = server.settle().await?;
    let records = after.records - before.records;
    let cpu = match (cpu_before, server.pid().and_then(cpu_seconds)) {
        (Some(a), Some(b)) if records > 0 => Some((b - a) * 1e6 / records as f64),
        _ => None,
    };
    let mut latencies: Vec<f64> = (0..options.messages)
        .filter(|&seq| arrived[seq] == members(seq))
        .filter_map(|seq| last_arrival[seq].map(|t| (t - sent_at[seq]).as_secs_f64() * 1000.0))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        if latencies.is_empty() { f64::NAN } else { latencies[((latencies.len() - 1) as f64 * p).round() as usize] }
    };
    let seconds = (last - started).as_secs_f64().max(1e-9);
    Ok(Phase {
        name: name.to_string(),
        expected,
        deliveries,
        deliveries_per_second: deliveries as f64 / seconds,
        fraction_of_raw: deliveries as f64 / seconds / raw,
        latency_p50_ms: percentile(0.50),
        latency_p99_ms: percentile(0.99),
        stream_records: records,
        cpu_us_per_record: cpu,
        peak_rss_mib: server.pid().and_then(|pid| status_mib(pid, "VmHWM:")),
        settled_rss_mib: None,
        flood: None,
    })
}

/// The hostile tenant's traffic: its users send each misbehaviour in turn at `rate` per second
/// until `stop` fires. Returns how many it sent.
async fn hostile_traffic(
    server: &Server,
    options: &Options,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<usize> {
    const ABUSE: &[&str] =
        &["loop", "sleep", "grow", "route-wide", "route-aliased", "sleep-forever", "giant", "recurse"];
    let exp = chrono::Utc::now().timestamp() + 6 * 3600;
    let claims = crate::auth::Claims {
        tenant: "bench-hostile".into(),
        sub: "mallory".into(),
        exp,
        nbf: None,
        scope: None,
        rooms: None,
        extra: Default::default(),
    };
    // Its traffic spreads over eight rooms: one room's records run one after another.
    let rooms: Vec<String> = (0..8).map(|i| format!("h{i}")).collect();
    let url =
        format!("{}?token={}&rooms={}", server.ws_url(), crate::auth::mint(&claims, &options.secret), rooms.join(","));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.map_err(|e| anyhow::anyhow!("the hostile user: {e}"))?;
    let (mut writer, mut reader) = ws.split();
    // Whatever comes back (rejections, its own messages) is read and dropped.
    let drain = tokio::spawn(async move { while let Some(Ok(_)) = reader.next().await {} });
    let interval = Duration::from_secs_f64(1.0 / options.hostile_rate.max(0.001));
    let mut sent = 0;
    while !*stop.borrow() {
        let room = &rooms[sent % rooms.len()];
        let frame = serde_json::json!({"action": "sendMessage", "room": room, "message": ABUSE[sent % ABUSE.len()]});
        writer.send(Frame::text(frame.to_string())).await?;
        sent += 1;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => {}
        }
    }
    let _ = writer.close().await;
    drain.abort();
    Ok(sent)
}

/// A flooding tenant (`bench-flood`, the default rate limits as its own settings): one user
/// sends messages at `flood_rate` until `stop` fires, reconnecting whenever it is closed.
async fn flood_traffic(
    server: &Server,
    options: &Options,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Flood> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let defaults = crate::limits::RateLimits::default();
    let limits: std::collections::BTreeMap<&str, u32> =
        crate::limits::NAMES.iter().map(|name| (*name, defaults.of_name(name))).collect();
    let settings = serde_json::to_vec(&serde_json::json!({ "rateLimits": limits }))?;
    request(&server.base, http::Method::PUT, "/_dev/tenants/bench-flood/settings", settings).await?;
    let claims = crate::auth::Claims {
        tenant: "bench-flood".into(),
        sub: "mallory".into(),
        exp: chrono::Utc::now().timestamp() + 6 * 3600,
        nbf: None,
        scope: None,
        rooms: None,
        extra: Default::default(),
    };
    let url = format!("{}?token={}&rooms=f0", server.ws_url(), crate::auth::mint(&claims, &options.secret));
    let interval = Duration::from_secs_f64(1.0 / options.flood_rate.max(0.001));
    let (taken, limited) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flood = Flood::default();
    while !*stop.borrow() {
        let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
            flood.refused_connects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let (mut writer, mut reader) = ws.split();
        let gone = Arc::new(AtomicBool::new(false));
        let counts = (taken.clone(), limited.clone(), gone.clone());
        let read = tokio::spawn(async move {
            while let Some(Ok(frame)) = reader.next().await {
                let Frame::Text(text) = frame else { continue };
                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                match (value["action"].as_str(), value["code"].as_str()) {
                    (Some("ack"), _) => counts.0.fetch_add(1, Ordering::Relaxed),
                    (_, Some("rate_limited")) => counts.1.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
            }
            counts.2.store(true, Ordering::Relaxed);
        });
        while !*stop.borrow() && !gone.load(Ordering::Relaxed) {
            let frame =
                serde_json::json!({"action": "sendMessage", "room": "f0", "message": format!("flood {}", flood.sent)});
            if writer.send(Frame::text(frame.to_string())).await.is_err() {
                break;
            }
            flood.sent += 1;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        }
        if *stop.borrow() {
            let _ = writer.close().await;
            read.abort();
        } else {
            let _ = read.await;
            flood.closed += 1;
        }
    }
    flood.taken = taken.load(Ordering::Relaxed);
    flood.rate_limited = limited.load(Ordering::Relaxed);
    Ok(flood)
}

/// The resident set once the stack has settled after a phase (a few seconds for the allocator
/// to return what the phase used).
async fn settled_rss(server: &Server) -> anyhow::Result<Option<f64>> {
    server.settle().await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok(server.pid().and_then(|pid| status_mib(pid, "VmRSS:")))
}

async fn activate(server: &Server, tenant: &str, component: &[u8]) -> anyhow::Result<()> {
    let path = format!("/_dev/plugins/{tenant}?policy=open");
    request(&server.base, http::Method::POST, &path, component.to_vec()).await?;
    let started = Instant::now();
    loop {
        let listed = request(&server.base, http::Method::GET, &format!("/_dev/plugins/{tenant}"), Vec::new()).await?;
        if listed["active"].is_string() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("{tenant}'s plugin was not activated within 120 s: {listed}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn run(options: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.connections > 0 && options.room_size > 0 && options.messages > 0, "nothing to measure");
    let server = Server::start(options).await?;
    let idle_rss_mib = server.pid().and_then(|pid| status_mib(pid, "VmRSS:"));
    let mut phases = Vec::new();
    let mut raw = f64::NAN;
    let mut variants = vec![("no plugin", "bench-plain", None, Beside::Nobody)];
    if let Some(component) = &options.plugin {
        variants.push(("plugin", "bench-plugin", Some(component), Beside::Nobody));
        if let Some(hostile) = &options.hostile {
            activate(&server, "bench-hostile", hostile).await?;
            variants.push(("plugin, beside a hostile tenant", "bench-guarded", Some(component), Beside::Hostile));
        }
    }
    if options.hostile.is_some() {
        variants.push(("no plugin, beside a flooding tenant", "bench-calm", None, Beside::Flood));
    }
    for (name, tenant, plugin, beside) in variants {
        if let Some(component) = plugin {
            activate(&server, tenant, component).await?;
        }
        let mut crowd = open_crowd(&server, options, tenant).await?;
        if raw.is_nan() {
            raw = raw_rate(&server, &crowd.ids, options.raw_posts).await?;
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let measured = async {
            if beside != Beside::Nobody {
                // Let the other tenant's traffic start before the measured messages do.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let phase = run_phase(&server, options, name, raw, &mut crowd).await;
            let _ = stop.send(true);
            phase
        };
        let mut phase = match beside {
            Beside::Nobody => measured.await?,
            Beside::Hostile => {
                let (phase, sent) = tokio::join!(measured, hostile_traffic(&server, options, stopped));
                let mut phase = phase?;
                phase.name = format!("{name} ({} hostile messages)", sent?);
                phase
            }
            Beside::Flood => {
                let (phase, flood) = tokio::join!(measured, flood_traffic(&server, options, stopped));
                let (mut phase, flood) = (phase?, flood?);
                phase.name = format!(
                    "{name} ({} flood frames: {} taken, {} rate_limited, {} closed)",
                    flood.sent, flood.taken, flood.rate_limited, flood.closed
                );
                phase.flood = Some(flood);
                phase
            }
        };
        phase.settled_rss_mib = settled_rss(&server).await?;
        phases.push(phase);
        for reader in &crowd.readers {
            reader.abort();
        }
        for mut writer in crowd.senders.drain(..) {
            let _ = writer.close().await;
        }
        drop(crowd);
        server.settle().await?;
    }
    let memory = match (&options.plugin, server.pid()) {
        (Some(component), Some(pid)) if options.plugin_tenants > 0 => {
            let before = status_mib(pid, "VmRSS:").unwrap_or(f64::NAN);
            for i in 0..options.plugin_tenants {
                activate(&server, &format!("bench-m{i}"), component).await?;
            }
            Some(Memory {
                tenants: options.plugin_tenants,
                rss_before_mib: before,
                rss_after_mib: status_mib(pid, "VmRSS:").unwrap_or(f64::NAN),
                peak_rss_mib: status_mib(pid, "VmHWM:").unwrap_or(f64::NAN),
            })
        }
        _ => None,
    };
    let machine = Machine {
        cores: std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        memory_gib: status_total_memory_gib().unwrap_or(f64::NAN),
        server: if options.url.is_some() {
            format!("{} (not started here)", server.base)
        } else {
            "roomcast dev, started by the bench".into()
        },
    };
    Ok(Report {
        machine,
        connections: options.connections,
        room_size: options.room_size,
        rooms: options.connections.div_ceil(options.room_size),
        messages: options.messages,
        rate: options.rate,
        raw_posts_per_second: raw,
        phases,
        memory,
        idle_rss_mib,
    })
}

fn status_total_memory_gib() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0 / 1024.0)
}

impl Report {
    /// The report as a table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let opt = |v: Option<f64>, digits: usize| v.map_or("n/a".to_string(), |v| format!("{v:.digits$}"));
        out.push_str(&format!(
            "machine: {} cores, {:.1} GiB; server: {}\n",
            self.machine.cores, self.machine.memory_gib, self.machine.server
        ));
        out.push_str(&format!(
            "{} connections in {} rooms of {}; {} messages at {}/s\n",
            self.connections, self.rooms, self.room_size, self.messages, self.rate
        ));
        out.push_str(&format!("raw @connections rate (the limit): {:.0} posts/s\n", self.raw_posts_per_second));
        out.push_str(&format!("server RSS at start: {} MiB\n\n", opt(self.idle_rss_mib, 1)));
        out.push_str(
            "| phase | deliveries | per second | of raw | p50 ms | p99 ms | records | CPU µs/record | peak RSS MiB | settled RSS MiB |\n",
        );
        out.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
        for p in &self.phases {
            out.push_str(&format!(
                "| {} | {}/{} | {:.0} | {:.0}% | {:.1} | {:.1} | {} | {} | {} | {} |\n",
                p.name,
                p.deliveries,
                p.expected,
                p.deliveries_per_second,
                p.fraction_of_raw * 100.0,
                p.latency_p50_ms,
                p.latency_p99_ms,
                p.stream_records,
                opt(p.cpu_us_per_record, 1),
                opt(p.peak_rss_mib, 1),
                opt(p.settled_rss_mib, 1)
            ));
        }
        if let Some(m) = &self.memory {
            out.push_str(&format!(
                "\nmemory with {} tenants' plugins active: RSS {:.1} → {:.1} MiB (peak {:.1} MiB)\n",
                m.tenants, m.rss_before_mib, m.rss_after_mib, m.peak_rss_mib
            ));
        }
        out
    }
}
