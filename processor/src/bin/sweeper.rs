//! The `sweeper` Lambda (see `roomcast_core::lambda::run_sweeper`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_core::lambda::run_sweeper().await
}
