//! What every Lambda's `main` shares: JSON logs, the table's client built once per container,
//! and the invocation's deadline on this process's clock.

use std::sync::Arc;

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::store::dynamodb::DynamoStore;

/// JSON logs for CloudWatch; `RUST_LOG` sets the filter (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().json().with_env_filter(filter).with_current_span(true).without_time().init();
}

/// The table, counting items that do not decode in `metrics`.
pub async fn store_from(config: &Config, metrics: Arc<Metrics>) -> (aws_config::SdkConfig, Arc<DynamoStore>) {
    let sdk = config::load_aws().await;
    let client = config::dynamodb_client(&sdk, config.dynamodb_endpoint.as_deref());
    (sdk, Arc::new(DynamoStore::new(client, &config.table_name).with_metrics(metrics)))
}

/// The invocation's deadline (milliseconds since the epoch, as the Runtime API gives it) on
/// this process's monotonic clock.
pub fn deadline_instant(deadline_ms: u64) -> std::time::Instant {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    std::time::Instant::now() + std::time::Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}
