//! The stream processor's Lambda: the processor's pipeline (`roomcast_processor::pipeline`) with
//! the tenants' plugins (`roomcast_plugin_host`), on the event source's batches, within each
//! invocation's deadline. This package is the one place the two meet: the processor crate links
//! no wasmtime, and the plugin host has no Lambda entry point.

use std::sync::Arc;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use roomcast_processor::assembly::Assembly;
use roomcast_processor::config::Config;
use roomcast_processor::lambda::{deadline_instant, init_tracing, store_from};
use roomcast_processor::metrics::Metrics;
use roomcast_processor::model::SystemClock;

use roomcast_plugin_host::WithPlugins;

/// Serves the stream processor.
async fn run_processor() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let metrics = Arc::new(Metrics::default());
    let (sdk, store) = store_from(&config, metrics.clone()).await;
    let clock = Arc::new(SystemClock);
    let hand_off = roomcast_processor::lambda::hand_off_from(&config, &sdk);
    let webhooks = roomcast_processor::lambda::webhooks_from(&config, &sdk);
    let registry = Arc::new(roomcast_plugin_host::registry::Registry::from_config(&config, metrics.clone())?);
    let emf = roomcast_processor::metrics::Emf {
        namespace: config.metrics_namespace.clone(),
        function: std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "processor".into()),
    };
    let mut processor =
        Assembly::from_config(&config, sdk, store, clock, metrics).processor().with_plugins(registry).with_emf(emf);
    if let Some(hand_off) = hand_off {
        processor = processor.with_hand_off(hand_off);
    }
    if let Some(webhooks) = webhooks {
        processor = processor.with_webhooks(webhooks);
    }
    let processor = &processor;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        let deadline = deadline_instant(event.context.deadline);
        processor.handle_event_until(&event.payload, Some(deadline)).await.map_err(Error::from)
    }))
    .await
}

/// mimalloc, not glibc's malloc: fan-out allocates per `@connections` call from every worker
/// thread, and glibc's arenas took a quarter of the CPU time (`roomcast bench fanout`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    run_processor().await
}
