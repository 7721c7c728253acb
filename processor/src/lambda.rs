//! The processor's Lambda entry points. What every Lambda shares — [`init_tracing`],
//! [`store_from`], [`deadline_instant`] — is the table crate's (`roomcast_table::lambda`),
//! re-exported here. The fan-out stage's binary (`src/bin/fanout.rs`) is
//! `main` → [`run_fanout`], the webhook function's (`src/bin/webhook.rs`) `main` →
//! [`run_webhooks`]; the processor's (`lambda/`, crate `roomcast-processor-lambda`, which
//! adds the tenants' plugins) builds on [`hand_off_from`] and [`webhooks_from`]. The write path's are in
//! `roomcast-handlers`. Clients are built once per container; a bad configuration fails the init
//! with every problem named.

use std::sync::Arc;

use lambda_runtime::{Error, LambdaEvent, service_fn};

use crate::assembly::Assembly;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::SystemClock;

pub use roomcast_table::lambda::{deadline_instant, init_tracing, store_from};

/// The processor's fan-out stage on SQS, when `ROOMCAST_FANOUT_QUEUE_URL` names its queue (the
/// SQS endpoint is the SDK's: `AWS_ENDPOINT_URL_SQS` or `AWS_ENDPOINT_URL` point it elsewhere).
pub fn hand_off_from(config: &Config, sdk: &aws_config::SdkConfig) -> Option<crate::deliver::stage::HandOff> {
    let url = config.fanout_queue_url.as_ref()?;
    let stage = crate::deliver::stage::sqs::SqsStage::new(aws_sdk_sqs::Client::new(sdk), url);
    Some(crate::deliver::stage::HandOff { stage: Arc::new(stage), recipients: config.handoff_recipients })
}

/// The tenants' webhook events' queue, when `ROOMCAST_WEBHOOK_QUEUE_URL` names it: the
/// processor's sink ([`crate::webhook::sqs::SqsWebhooks`]). Without it no event is made.
pub fn webhooks_from(config: &Config, sdk: &aws_config::SdkConfig) -> Option<Arc<dyn crate::webhook::WebhookSink>> {
    let url = config.webhook_queue_url.as_ref()?;
    Some(Arc::new(crate::webhook::sqs::SqsWebhooks::new(aws_sdk_sqs::Client::new(sdk), url)))
}

/// Serves the `webhook` function: batches of tenants' events from the FIFO queue
/// ([`crate::webhook::sqs::Deliveries`]), posted to each tenant's URL, signed. Prints its counts
/// as the processor does (`roomcast.webhook`, and CloudWatch's embedded metric format).
pub async fn run_webhooks() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let Some(queue_url) = config.webhook_queue_url.clone() else {
        return Err(
            "ROOMCAST_WEBHOOK_QUEUE_URL is not set: name the webhook queue, to set refused batches' backoff".into()
        );
    };
    let metrics = Arc::new(Metrics::default());
    let (sdk, store) = store_from(&config, metrics.clone()).await;
    let deliveries = crate::webhook::sqs::Deliveries {
        store,
        http: crate::webhook::guard::client(
            crate::webhook::local::RetryPolicy::default().timeout,
            config.webhook_allow_private,
        ),
        sqs: aws_sdk_sqs::Client::new(&sdk),
        queue_url,
        first_backoff: config.webhook_retry,
        allow_private: config.webhook_allow_private,
        metrics: metrics.clone(),
    };
    let emf = crate::metrics::Emf {
        namespace: config.metrics_namespace.clone(),
        function: std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "webhook".into()),
    };
    let (deliveries, metrics, emf) = (&deliveries, &metrics, &emf);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<aws_lambda_events::sqs::SqsEvent>| async move {
        let before = metrics.snapshot();
        let deadline = deadline_instant(event.context.deadline);
        let finish_by = deadline.checked_sub(std::time::Duration::from_secs(1)).unwrap_or(deadline);
        let response = deliveries.handle(&event.payload, Some(finish_by)).await;
        let counts = metrics.snapshot().since(&before);
        counts.emit("roomcast.webhook");
        println!("{}", counts.emf(emf, chrono::Utc::now().timestamp_millis()));
        Ok::<_, Error>(response)
    }))
    .await
}

/// Serves the fan-out stage's worker: batches of big rooms' jobs from the SQS FIFO queue
/// ([`crate::deliver::stage::sqs::handle_jobs`]), each invocation done a second before its
/// deadline. Prints its counts as the processor does (`roomcast.fanout`, and CloudWatch's
/// embedded metric format).
pub async fn run_fanout() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let metrics = Arc::new(Metrics::default());
    let (sdk, store) = store_from(&config, metrics.clone()).await;
    let deliverer = Assembly::from_config(&config, sdk, store, Arc::new(SystemClock), metrics.clone()).deliverer();
    let emf = crate::metrics::Emf {
        namespace: config.metrics_namespace.clone(),
        function: std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "fanout".into()),
    };
    let (deliverer, metrics, emf) = (&deliverer, &metrics, &emf);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<aws_lambda_events::sqs::SqsEvent>| async move {
        let before = metrics.snapshot();
        let deadline = deadline_instant(event.context.deadline);
        let finish_by = deadline.checked_sub(std::time::Duration::from_secs(1)).unwrap_or(deadline);
        // Boxed: the delivery future nests deeper than the compiler's default query depth.
        let response =
            Box::pin(crate::deliver::stage::sqs::handle_jobs(deliverer, metrics, &event.payload, Some(finish_by)))
                .await;
        let counts = metrics.snapshot().since(&before);
        counts.emit("roomcast.fanout");
        println!("{}", counts.emf(emf, chrono::Utc::now().timestamp_millis()));
        Ok::<_, Error>(response)
    }))
    .await
}
