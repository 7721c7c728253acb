//! The `authorizer` Lambda (see `roomcast_core::lambda::run_authorizer`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_core::lambda::run_authorizer().await
}
