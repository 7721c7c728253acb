//! The `admin` Lambda (see `roomcast_core::lambda::run_admin`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_core::lambda::run_admin().await
}
