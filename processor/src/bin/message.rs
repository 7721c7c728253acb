//! The message Lambda (`$default` and the named routes) (see `roomcast::handlers::message`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast::lambda::run_handler(roomcast::lambda::Route::Message).await
}
