//! The stream processor Lambda (see `roomcast_core::pipeline`, with the tenants' plugins from
//! `roomcast_plugin_host`).
/// mimalloc, not glibc's malloc: fan-out allocates per `@connections` call from every worker
/// thread, and glibc's arenas took a quarter of the CPU time (`roomcast bench fanout`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_plugin_host::lambda::run_processor().await
}
