//! `roomcast dev`: the whole system in one process on loopback, with no AWS account.
//!
//! The gateway emulator ([`crate::gateway`]) runs the real handlers; they write to the store
//! (embedded by default, or a real DynamoDB API); the store's stream (the embedded store's own, or
//! the table's through the DynamoDB Streams poller) feeds the real processor, whose real
//! `aws-sdk-apigatewaymanagement` client posts back to the emulator's `@connections` API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config;
use crate::deliver::DeliverySettings;
use crate::gateway::{AuthMode, Gateway, GatewaySettings, Limits};
use crate::handlers::HandlerDeps;
use crate::metrics::Metrics;
use crate::model::{Clock, SystemClock};
use crate::pipeline::{Processor, run_from_stream};
use crate::plugins::WithPlugins;
use crate::store::Store;
use crate::store::dynamodb::{DynamoStore, create_table};
use crate::store::memory::MemoryStore;
use crate::stream::log::StreamLog;
use crate::stream::poller::{StartAt, StreamPoller};

pub mod api;
pub mod ops;

#[derive(Clone, Debug)]
pub struct DevOptions {
    /// 0 picks a free port.
    pub port: u16,
    pub dynamodb_endpoint: Option<String>,
    pub table: String,
    pub stream_log: Option<PathBuf>,
    pub auth: AuthMode,
    pub limits: Limits,
    pub connection_ttl_seconds: i64,
    pub history_ttl_seconds: i64,
    /// How often the embedded store runs TTL (DynamoDB's own TTL lags by minutes to days).
    pub ttl_sweep_every: Duration,
    pub delivery: DeliverySettings,
    /// Loads `DIR/<tenant>.wasm` for each tenant at start (fail-open, default limits).
    pub plugins: Option<PathBuf>,
    /// Deliver every stream batch twice, as Lambda's event source may: clients see repeats
    /// and can show that they drop them.
    pub redeliver: bool,
    /// Deliver the stream as AWS may (`roomcast::stream::shards::PerItemOrder` with this seed):
    /// order kept per item only, a room's records on two shards whose batches run at once, one
    /// batch in four twice. The embedded store's stream only.
    pub per_item_order: Option<u64>,
    /// The records' clock: connection ages, message times, TTLs. The system clock unless a
    /// test gives a `ManualClock` to age connections without waiting. (The gateway's socket
    /// timers — idle timeout, maximum duration — keep the wall clock.)
    pub clock: Arc<dyn Clock>,
    /// Rooms with more users announce no `joined`/`left` (`roomcast tenant set` overrides it per tenant).
    pub presence_announce_max_users: u64,
    /// Frames for this many recipients or more go to the in-process fan-out stage
    /// (`deliver::stage::LocalStage`); 0: none does.
    pub handoff_recipients: usize,
    /// How the tenants' webhook deliveries are retried (ten minutes, then dead letters).
    pub webhook_retry: crate::webhook::local::RetryPolicy,
    /// The rate limits tenants get unless their settings say otherwise (`--limit NAME=N`).
    pub rate_limits: crate::limits::RateLimits,
}

impl Default for DevOptions {
    fn default() -> Self {
        DevOptions {
            port: 8080,
            dynamodb_endpoint: None,
            table: "roomcast".into(),
            stream_log: None,
            auth: AuthMode::Jwt { secret: b"roomcast-dev-secret".to_vec() },
            limits: Limits::default(),
            connection_ttl_seconds: 3600,
            history_ttl_seconds: 7 * 86_400,
            ttl_sweep_every: Duration::from_secs(1),
            delivery: DeliverySettings::default(),
            plugins: None,
            redeliver: false,
            per_item_order: None,
            clock: Arc::new(SystemClock),
            presence_announce_max_users: crate::presence::DEFAULT_ANNOUNCE_MAX_USERS,
            handoff_recipients: crate::deliver::stage::HANDOFF_RECIPIENTS,
            webhook_retry: Default::default(),
            rate_limits: crate::limits::RateLimits::default(),
        }
    }
}

/// Compiles every `DIR/<tenant>.wasm` and installs it for that tenant.
fn load_plugins(dir: &std::path::Path, registry: &crate::plugins::registry::Registry) -> anyhow::Result<Vec<String>> {
    use crate::plugins::registry::Policy;
    let mut loaded = Vec::new();
    let entries =
        std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("cannot read plugin directory {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("wasm") {
            continue;
        }
        let tenant = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        crate::model::Name::parse("tenant", &tenant)
            .map_err(|e| anyhow::anyhow!("{}: the file name must be a tenant: {e}", path.display()))?;
        let bytes = std::fs::read(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let limits = registry.limits().clone();
        let plugin =
            registry.host().compile(&bytes, &limits).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        tracing::info!(%tenant, sha256 = %plugin.sha256, size = plugin.size, "plugin loaded");
        // Pinned: a file has no table record to reload from after an eviction.
        registry.install(&tenant, plugin, limits, Policy::FailOpen, true);
        loaded.push(tenant);
    }
    loaded.sort();
    Ok(loaded)
}

/// A running local stack.
pub struct DevStack {
    pub addr: SocketAddr,
    pub gateway: Arc<Gateway>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// The embedded store, when it is the one in use.
    pub memory: Option<Arc<MemoryStore>>,
    /// Tenants whose plugin `--plugins` loaded.
    pub plugin_tenants: Vec<String>,
    /// The tenants' webhook deliveries: dead letters, re-drive.
    pub webhooks: Arc<crate::webhook::local::LocalWebhooks>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl DevStack {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/{}", self.addr, self.gateway.settings.stage)
    }

    pub fn page_url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Closes every connection (1001, as a redeploy would), stops serving and processing.
    pub async fn shutdown(self) {
        self.gateway.close_all().await;
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// Starts the stack and returns once it is listening.
pub async fn start(options: DevOptions) -> anyhow::Result<DevStack> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", options.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on 127.0.0.1:{}: {e}", options.port))?;
    let addr = listener.local_addr()?;
    let clock = options.clock.clone();
    let sdk = dev_aws_config().await;
    let stage = "local".to_string();
    let (stop, stopped) = watch::channel(false);
    let mut tasks = Vec::new();
    let log = match &options.stream_log {
        Some(path) => Some(Arc::new(
            StreamLog::open(path).map_err(|e| anyhow::anyhow!("cannot open stream log {}: {e}", path.display()))?,
        )),
        None => None,
    };

    enum Source {
        Memory(tokio::sync::mpsc::UnboundedReceiver<aws_lambda_events::dynamodb::EventRecord>),
        Dynamo(StreamPoller),
    }
    // The processor's counts, also of items of the table that do not decode.
    let metrics = Arc::new(Metrics::default());
    let (store, memory, source): (Arc<dyn Store>, Option<Arc<MemoryStore>>, Source) =
        match &options.dynamodb_endpoint.clone().filter(|e| !e.is_empty()) {
            None => {
                let memory = MemoryStore::with_metrics(clock.clone(), metrics.clone());
                let rx = memory.subscribe();
                (memory.clone(), Some(memory), Source::Memory(rx))
            }
            Some(endpoint) => {
                let client = config::dynamodb_client(&sdk, Some(endpoint));
                let info = create_table(&client, &options.table).await?;
                let streams = config::streams_client(&sdk, Some(endpoint));
                // A table made just now is read from its start; an existing one from now on (old
                // connection records would only earn 410s).
                let start = if info.created { StartAt::TrimHorizon } else { StartAt::Latest };
                let mut poller = StreamPoller::new(streams, info.stream_arn, start);
                poller.prime().await?;
                let store = DynamoStore::new(client, &options.table).with_metrics(metrics.clone());
                (Arc::new(store), None, Source::Dynamo(poller))
            }
        };

    let delivery =
        DeliverySettings { endpoint_override: Some(format!("http://{addr}/{stage}")), ..options.delivery.clone() };
    let assembly = crate::assembly::Assembly {
        announce_max_users: options.presence_announce_max_users,
        ..crate::assembly::Assembly::new(sdk, store.clone(), clock.clone(), metrics.clone()).with_delivery(delivery)
    };
    // Plugins uploaded to the table are activated as in AWS; --plugins adds files at start.
    let host = Arc::new(crate::plugins::PluginHost::new()?);
    let registry = Arc::new(crate::plugins::registry::Registry::new(host.clone(), metrics.clone()));
    let publish = crate::publish::PublishDeps {
        store: store.clone(),
        clock: clock.clone(),
        history_ttl_seconds: options.history_ttl_seconds,
        idempotency_window_seconds: crate::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
        limits: crate::limits::Limiter::new(options.rate_limits),
    };
    // The tenants' webhooks: delivered from this process, a worker per tenant.
    let webhooks = crate::webhook::local::LocalWebhooks::new(store.clone(), options.webhook_retry, metrics.clone());
    // The operator's admin operations, probing connections through this stack's @connections.
    let admin = crate::admin::Admin {
        store: store.clone(),
        deliverer: Arc::new(assembly.deliverer()),
        clock: clock.clone(),
        idle_limit: Duration::from_secs(600),
        presence_grace: Duration::from_secs(crate::presence::RECONCILE_GRACE_SECONDS as u64),
        connection_ttl: Duration::from_secs(options.connection_ttl_seconds.max(1) as u64),
    };
    let api_routes = api::routes(store.clone(), host, metrics.clone(), webhooks.clone())
        .merge(api::publish_route(publish, options.auth.secret().to_vec()))
        .merge(api::admin_route(Arc::new(admin)))
        .merge(ops::routes(store.clone(), registry.clone(), metrics.clone(), webhooks.clone()));
    let plugin_tenants = match &options.plugins {
        Some(dir) => load_plugins(dir, &registry)?,
        None => Vec::new(),
    };
    let mut processor = assembly.processor().with_plugins(registry);
    if options.handoff_recipients > 0 {
        // The fan-out stage's workers: a deliverer of their own, as the `fanout` function's
        // containers have in AWS.
        let stage = crate::deliver::stage::LocalStage::new(assembly.deliverer());
        processor =
            processor.with_hand_off(crate::deliver::stage::HandOff { stage, recipients: options.handoff_recipients });
    }
    let processor = Arc::new(processor.with_webhooks(webhooks.clone()));
    let deps = HandlerDeps {
        joins: Default::default(),
        limits: crate::limits::Limiter::new(options.rate_limits),
        store: store.clone(),
        clock: clock.clone(),
        connection_ttl_seconds: options.connection_ttl_seconds,
        history_ttl_seconds: options.history_ttl_seconds,
        idempotency_window_seconds: crate::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
        // `refresh` checks tokens as `$connect` does here.
        verifier: Some(Arc::new(crate::identity::Verifier::new(options.auth.secret().to_vec(), Some(store.clone())))),
    };
    let gateway =
        Gateway::new(GatewaySettings { stage, auth: options.auth.clone(), limits: options.limits.clone() }, deps);

    let serving = gateway.clone();
    let mut serve_stop = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = serve_stop.wait_for(|s| *s).await;
        };
        if let Err(e) = serving.serve(listener, api_routes, shutdown).await {
            tracing::error!(error = %e, "gateway stopped");
        }
    }));

    match source {
        Source::Memory(rx) => {
            let order = options.per_item_order.map(crate::stream::shards::PerItemOrder::new);
            tasks.push(tokio::spawn(feed_from_memory(
                processor.clone(),
                rx,
                log.clone(),
                options.redeliver,
                order,
                stopped.clone(),
            )));
            let memory = memory.clone().expect("the embedded store");
            let (every, clock, mut stop) = (options.ttl_sweep_every, clock.clone(), stopped.clone());
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => { memory.expire_due(clock.now()); }
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }));
        }
        Source::Dynamo(mut poller) => {
            let (processor, log, stopped) = (processor.clone(), log.clone(), stopped.clone());
            let redeliver = options.redeliver;
            tasks.push(tokio::spawn(async move {
                let result = run_from_stream(
                    &processor,
                    &mut poller,
                    Duration::from_millis(100),
                    log.as_deref(),
                    redeliver,
                    stopped,
                )
                .await;
                if let Err(e) = result {
                    tracing::error!(error = %format!("{e:#}"), "stream poller stopped");
                }
            }));
        }
    }
    Ok(DevStack { addr, gateway, store, metrics, memory, plugin_tenants, webhooks, stop, tasks })
}

/// The embedded store's stream, in batches of up to 100 records as Lambda would read them.
async fn feed_from_memory(
    processor: Arc<Processor>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<aws_lambda_events::dynamodb::EventRecord>,
    log: Option<Arc<StreamLog>>,
    redeliver: bool,
    mut order: Option<crate::stream::shards::PerItemOrder>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let first = tokio::select! {
            record = rx.recv() => match record { Some(r) => r, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut batch = vec![first];
        while batch.len() < 100 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Some(log) = &log {
            log.append(&batch);
        }
        if let Some(order) = order.as_mut() {
            let processor = &processor;
            order
                .deliver(batch, |d| async move {
                    if let Some((_, sequence)) = processor.process_records(&d.records).await.failure {
                        tracing::error!(%sequence, shard = d.shard, "a batch failed against the embedded store");
                    }
                })
                .await;
            continue;
        }
        let mut outcome = processor.process_records(&batch).await;
        if redeliver {
            outcome = processor.process_records(&batch).await;
        }
        if let Some((_, sequence)) = outcome.failure {
            // The embedded store cannot be unavailable; a failure here is a bug worth shouting about.
            tracing::error!(%sequence, "a batch failed against the embedded store");
        }
    }
}

/// Credentials for the local `@connections` API (it accepts any signature) and local DynamoDB
/// endpoints: the environment's when set, else fixed dev ones.
async fn dev_aws_config() -> aws_config::SdkConfig {
    if std::env::var_os("AWS_ACCESS_KEY_ID").is_some() || std::env::var_os("AWS_PROFILE").is_some() {
        return config::load_aws().await;
    }
    // The region from the environment, else us-east-1: never the instance metadata service, which
    // a laptop does not have (probing it only prints a warning).
    let region = ["AWS_REGION", "AWS_DEFAULT_REGION"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "us-east-1".into());
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .credentials_provider(aws_credential_types::Credentials::new(
            "roomcast-dev",
            "roomcast-dev",
            None,
            None,
            "roomcast-dev",
        ))
        .load()
        .await
}
