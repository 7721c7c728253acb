//! The `$disconnect` Lambda (see `roomcast_core::handlers::disconnect`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_core::lambda::run_handler(roomcast_core::lambda::Route::Disconnect).await
}
