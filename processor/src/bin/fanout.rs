//! The fan-out stage's worker Lambda (see `roomcast_processor::lambda::run_fanout`): big rooms' jobs
//! from the SQS FIFO queue, delivered by the processor's own rules.
/// mimalloc, not glibc's malloc: this function does nothing but `@connections` calls, which
/// allocate per call from every worker thread (`roomcast bench fanout`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_processor::lambda::run_fanout().await
}
