//! The `$disconnect` Lambda (see `roomcast::handlers::disconnect`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_handler(roomcast::lambda::Route::Disconnect).await
}
