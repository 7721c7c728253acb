//! The message Lambda (`$default` and the named routes) (see `roomcast_core::handlers::message`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_core::lambda::run_handler(roomcast_core::lambda::Route::Message).await
}
