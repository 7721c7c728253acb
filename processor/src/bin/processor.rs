//! The stream processor Lambda (see `roomcast::pipeline`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_processor().await
}
