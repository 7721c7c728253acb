//! The `sweeper` Lambda (see `roomcast::lambda::run_sweeper`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_sweeper().await
}
