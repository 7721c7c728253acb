//! The message Lambda (`$default` and the named routes) (see `roomcast_handlers::handlers::message`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_handler(roomcast_handlers::lambda::Route::Message).await
}
