//! The `$connect` Lambda (see `roomcast::handlers::connect`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_handler(roomcast::lambda::Route::Connect).await
}
