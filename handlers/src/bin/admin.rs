//! The `admin` Lambda (see `roomcast_handlers::lambda::run_admin`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_admin().await
}
