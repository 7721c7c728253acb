//! The processor Lambda's entry point (`src/bin/processor.rs`): the core's pipeline with the
//! tenants' plugins, on the event source's batches, within each invocation's deadline.

use std::sync::Arc;

use lambda_runtime::{Error, LambdaEvent, service_fn};
use roomcast_core::assembly::Assembly;
use roomcast_core::config::Config;
use roomcast_core::lambda::{deadline_instant, init_tracing, store_from};
use roomcast_core::metrics::Metrics;
use roomcast_core::model::SystemClock;

use crate::WithPlugins;

/// Serves the stream processor.
pub async fn run_processor() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let metrics = Arc::new(Metrics::default());
    let (sdk, store) = store_from(&config, metrics.clone()).await;
    let clock = Arc::new(SystemClock);
    let hand_off = roomcast_core::lambda::hand_off_from(&config, &sdk);
    let registry = Arc::new(crate::registry::Registry::from_config(&config, metrics.clone())?);
    let emf = roomcast_core::metrics::Emf {
        namespace: config.metrics_namespace.clone(),
        function: std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "processor".into()),
    };
    let mut processor =
        Assembly::from_config(&config, sdk, store, clock, metrics).processor().with_plugins(registry).with_emf(emf);
    if let Some(hand_off) = hand_off {
        processor = processor.with_hand_off(hand_off);
    }
    let processor = &processor;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        let deadline = deadline_instant(event.context.deadline);
        processor.handle_event_until(&event.payload, Some(deadline)).await.map_err(Error::from)
    }))
    .await
}
