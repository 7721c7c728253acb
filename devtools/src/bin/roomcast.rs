//! The `roomcast` command (see `roomcast::cli`).
/// mimalloc, not glibc's malloc: fan-out allocates per call from many threads, and glibc's
/// arenas took a quarter of the processor's CPU time (`roomcast bench fanout`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    roomcast::cli::main().await
}
