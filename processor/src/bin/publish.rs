//! The publish Lambda: a backend's message into a room (see `roomcast_core::publish`).
#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_core::lambda::run_publish().await
}
