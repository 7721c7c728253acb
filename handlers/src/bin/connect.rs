//! The `$connect` Lambda (see `roomcast_handlers::handlers::connect`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_handler(roomcast_handlers::lambda::Route::Connect).await
}
