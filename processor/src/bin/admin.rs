//! The `admin` Lambda (see `roomcast::lambda::run_admin`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_admin().await
}
