//! The `sweeper` Lambda (see `roomcast_handlers::lambda::run_sweeper`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_sweeper().await
}
