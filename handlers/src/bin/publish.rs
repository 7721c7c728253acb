//! The publish Lambda: a backend's message into a room (see `roomcast_handlers::publish`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_handlers::lambda::run_publish().await
}
