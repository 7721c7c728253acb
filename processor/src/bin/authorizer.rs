//! The `authorizer` Lambda (see `roomcast::lambda::run_authorizer`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_authorizer().await
}
