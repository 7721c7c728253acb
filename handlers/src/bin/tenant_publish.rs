//! The tenant publish Lambda: a tenant backend's message into a room, through the public HTTP API
//! route (a `publish`-scoped token of that tenant). The same code as `publish`, deployed apart
//! (`TenantPublishFunction`) so that a flood of junk tokens has its own concurrency and throttle.
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_publish().await
}
