//! The stream processor Lambda (see `roomcast_core::pipeline`, with the tenants' plugins from
//! `roomcast_plugin_host`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_plugin_host::lambda::run_processor().await
}
