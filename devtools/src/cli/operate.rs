//! The operator's commands: `roomcast admin` (the admin Lambda's operations against any table),
//! `roomcast table create`, and `roomcast poll` (the stream processor over a table's stream).

use std::sync::Arc;
use std::time::Duration;

use super::{TableArgs, config};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::SystemClock;
use crate::pipeline::run_from_stream;
use crate::plugins::WithPlugins;
use crate::store::dynamodb::{DynamoStore, create_table, wait_until_active};
use crate::stream::poller::{StartAt, StreamPoller};

/// `roomcast admin EVENT`: prints the operation's answer; fails unless it answered 200.
pub(super) async fn admin(event: String, table: TableArgs, management_endpoint: Option<String>) -> anyhow::Result<()> {
    let event: serde_json::Value =
        serde_json::from_str(&event).map_err(|e| anyhow::anyhow!("the event is not JSON: {e}"))?;
    let sdk = config::load_aws().await;
    let client = config::dynamodb_client(&sdk, table.dynamodb_endpoint.as_deref());
    let store = Arc::new(DynamoStore::new(client, &table.table));
    let clock: Arc<dyn crate::model::Clock> = Arc::new(SystemClock);
    let delivery = crate::deliver::DeliverySettings {
        endpoint_override: management_endpoint,
        ..crate::deliver::DeliverySettings::default()
    };
    let deliverer = crate::assembly::Assembly::new(sdk, store.clone(), clock.clone(), Arc::new(Metrics::default()))
        .with_delivery(delivery)
        .deliverer();
    let admin = crate::admin::Admin {
        store,
        deliverer: Arc::new(deliverer),
        clock,
        idle_limit: Duration::from_secs(600),
        presence_grace: Duration::from_secs(crate::presence::RECONCILE_GRACE_SECONDS as u64),
        connection_ttl: Duration::from_secs(
            std::env::var("CONNECTION_TTL_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3600),
        ),
    };
    let answer = admin.handle(&event).await;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if answer["statusCode"] == 200 { Ok(()) } else { anyhow::bail!("the operation answered {}", answer["statusCode"]) }
}

/// `roomcast admin --dev URL`: the operation runs in that `roomcast dev`.
pub(super) async fn admin_on_dev(url: &str, event: String) -> anyhow::Result<()> {
    let event: serde_json::Value =
        serde_json::from_str(&event).map_err(|e| anyhow::anyhow!("the event is not JSON: {e}"))?;
    let answer =
        crate::dev::api::request_as(url, http::Method::POST, "/_dev/admin", serde_json::to_vec(&event)?, None).await?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    if answer["statusCode"] == 200 { Ok(()) } else { anyhow::bail!("the operation answered {}", answer["statusCode"]) }
}

/// `roomcast table create`.
pub(super) async fn create(table: TableArgs) -> anyhow::Result<()> {
    let sdk = config::load_aws().await;
    let client = config::dynamodb_client(&sdk, table.dynamodb_endpoint.as_deref());
    let info = create_table(&client, &table.table).await?;
    let verb = if info.created { "created" } else { "already exists:" };
    println!("table {verb} {} (stream {})", info.name, info.stream_arn);
    Ok(())
}

/// `roomcast poll`: until Ctrl-C, then the totals.
pub(super) async fn poll(
    table: TableArgs,
    management_endpoint: Option<String>,
    from_trim_horizon: bool,
) -> anyhow::Result<()> {
    let config = Config::from_lookup(|name| match name {
        "TABLE_NAME" => Some(table.table.clone()),
        "DYNAMODB_ENDPOINT_URL" => table.dynamodb_endpoint.clone(),
        "ROOMCAST_MANAGEMENT_ENDPOINT" => management_endpoint.clone(),
        other => std::env::var(other).ok(),
    })?;
    let sdk = config::load_aws().await;
    let client = config::dynamodb_client(&sdk, config.dynamodb_endpoint.as_deref());
    let stream_arn = wait_until_active(&client, &config.table_name).await?;
    let metrics = Arc::new(Metrics::default());
    let store = Arc::new(DynamoStore::new(client, &config.table_name).with_metrics(metrics.clone()));
    // Tenant plugins as in the Lambda: the deployment's limits, cache bound and artifacts.
    let registry = Arc::new(crate::plugins::registry::Registry::from_config(&config, metrics.clone())?);
    let processor = crate::assembly::Assembly::from_config(&config, sdk.clone(), store, Arc::new(SystemClock), metrics)
        .processor()
        .with_plugins(registry);
    let streams = config::streams_client(&sdk, config.dynamodb_endpoint.as_deref());
    let start = if from_trim_horizon { StartAt::TrimHorizon } else { StartAt::Latest };
    let mut poller = StreamPoller::new(streams, stream_arn.clone(), start);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    eprintln!("processing stream {stream_arn}; Ctrl-C stops");
    run_from_stream(&processor, &mut poller, Duration::from_millis(250), None, false, stopped).await?;
    processor.counts().emit("roomcast.totals");
    Ok(())
}
