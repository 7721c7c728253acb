//! The `roomcast` command (see `roomcast::cli`).
#[tokio::main]
async fn main() -> std::process::ExitCode {
    roomcast::cli::main().await
}
