//! The `authorizer` Lambda (see `roomcast_handlers::lambda::run_authorizer`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_authorizer().await
}
