//! The webhook function (see `roomcast_processor::lambda::run_webhooks`): tenants' events from the
//! SQS FIFO queue, posted to each tenant's URL, signed, with backoff on refusal.

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    roomcast_processor::lambda::run_webhooks().await
}
