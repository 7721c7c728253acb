//! The Lambda entry points of this crate: each binary in `src/bin` is `main` → [`run_handler`],
//! [`run_authorizer`], [`run_publish`], [`run_admin`], [`run_sweeper`] or [`run_fanout`] (the processor's is in the plugin host
//! crate, which uses [`store_from`] and [`deadline_instant`] from here). Clients are built once
//! per container; a bad configuration fails the init with every problem named.

use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use lambda_runtime::{Error, LambdaEvent, service_fn};

use crate::assembly::Assembly;
use crate::config::{self, Config};
use crate::handlers::{self, HandlerDeps};
use crate::metrics::Metrics;
use crate::model::SystemClock;
use crate::store::dynamodb::DynamoStore;

/// JSON logs for CloudWatch; `RUST_LOG` sets the filter (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().json().with_env_filter(filter).with_current_span(true).without_time().init();
}

/// The table, counting items that do not decode in `metrics`.
pub async fn store_from(config: &Config, metrics: Arc<Metrics>) -> (aws_config::SdkConfig, Arc<DynamoStore>) {
    let sdk = config::load_aws().await;
    let client = config::dynamodb_client(&sdk, config.dynamodb_endpoint.as_deref());
    (sdk, Arc::new(DynamoStore::new(client, &config.table_name).with_metrics(metrics)))
}

#[derive(Clone, Copy, Debug)]
pub enum Route {
    Connect,
    Disconnect,
    Message,
}

/// Serves one of the write-path routes.
pub async fn run_handler(route: Route) -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    // The handlers emit no counts: an item that does not decode is told by its log line.
    let (_, store) = store_from(&config, Arc::default()).await;
    let deps = HandlerDeps {
        joins: Default::default(),
        limits: crate::limits::Limiter::new(config.rate_limits),
        store,
        clock: Arc::new(SystemClock),
        connection_ttl_seconds: config.connection_ttl_seconds,
        history_ttl_seconds: config.history_ttl_seconds,
        idempotency_window_seconds: config.idempotency_window_seconds,
    };
    let deps = &deps;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<ApiGatewayWebsocketProxyRequest>| async move {
        let response: ApiGatewayProxyResponse = match route {
            Route::Connect => handlers::connect(&event.payload, deps).await,
            Route::Disconnect => handlers::disconnect(&event.payload, deps).await,
            Route::Message => handlers::message(&event.payload, deps).await,
        };
        Ok::<_, Error>(response)
    }))
    .await
}

/// The invocation's deadline (milliseconds since the epoch, as the Runtime API gives it) on
/// this process's monotonic clock.
pub fn deadline_instant(deadline_ms: u64) -> std::time::Instant {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    std::time::Instant::now() + std::time::Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}

/// Serves the `$connect` REQUEST authorizer. The secret is read once per container: from the SSM
/// parameter named by `ROOMCAST_JWT_SECRET_PARAMETER` (decrypted), or `ROOMCAST_JWT_SECRET`.
pub async fn run_authorizer() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let secret = jwt_secret().await?;
    // Tenants' own identities are read from the table (cached per container).
    let (_, store) = store_from(&config, Arc::default()).await;
    let verifier = crate::identity::Verifier::new(secret, Some(store));
    let verifier = &verifier;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest>| async move {
            handlers::authorize(&event.payload, verifier, chrono::Utc::now().timestamp()).await.map_err(Error::from)
        },
    ))
    .await
}

/// Serves `publish` (function URL, HTTP API route, or direct invoke).
pub async fn run_publish() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let secret = jwt_secret().await?;
    let (_, store) = store_from(&config, Arc::default()).await;
    let deps = crate::publish::PublishDeps {
        store,
        clock: Arc::new(SystemClock),
        history_ttl_seconds: config.history_ttl_seconds,
        idempotency_window_seconds: config.idempotency_window_seconds,
        limits: crate::limits::Limiter::new(config.rate_limits),
    };
    let (deps, secret) = (&deps, &secret);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        crate::publish::handle(deps, &event.payload, secret).await.map_err(Error::from)
    }))
    .await
}

/// The HS256 secret of `$connect` tokens (and tenants' publish tokens): the SSM parameter named
/// by `ROOMCAST_JWT_SECRET_PARAMETER`, or `ROOMCAST_JWT_SECRET` itself.
async fn jwt_secret() -> Result<Vec<u8>, Error> {
    let secret = match (std::env::var("ROOMCAST_JWT_SECRET_PARAMETER"), std::env::var("ROOMCAST_JWT_SECRET")) {
        (Ok(name), _) if !name.is_empty() => {
            let sdk = config::load_aws().await;
            let out = aws_sdk_ssm::Client::new(&sdk)
                .get_parameter()
                .name(&name)
                .with_decryption(true)
                .send()
                .await
                .map_err(|e| {
                    format!("reading the JWT secret parameter {name}: {}", aws_sdk_ssm::error::DisplayErrorContext(&e))
                })?;
            out.parameter.and_then(|p| p.value).ok_or_else(|| format!("SSM parameter {name} has no value"))?
        }
        (_, Ok(secret)) if !secret.is_empty() => secret,
        _ => return Err("set ROOMCAST_JWT_SECRET_PARAMETER (an SSM parameter name) or ROOMCAST_JWT_SECRET".into()),
    };
    Ok(secret.into_bytes())
}

async fn admin_from(config: &Config) -> crate::admin::Admin {
    let metrics = Arc::new(Metrics::default());
    let (sdk, store) = store_from(config, metrics.clone()).await;
    let clock: Arc<dyn crate::model::Clock> = Arc::new(SystemClock);
    let deliverer = Assembly::from_config(config, sdk, store.clone(), clock.clone(), metrics).deliverer();
    crate::admin::Admin {
        store,
        deliverer: Arc::new(deliverer),
        clock,
        idle_limit: config.idle_limit,
        presence_grace: config.presence_repair_grace,
        connection_ttl: std::time::Duration::from_secs(config.connection_ttl_seconds.max(0) as u64),
    }
}

/// Serves the admin operations (direct invoke).
pub async fn run_admin() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let admin = admin_from(&config).await;
    let admin = &admin;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        // Boxed: the admin future holds the whole replay pipeline, and its layout nests deeper
        // than the compiler's default query depth when built as a test target.
        Ok::<_, Error>(Box::pin(admin.handle(&event.payload)).await)
    }))
    .await
}

/// Serves the scheduled sweeper: stale connection records, confirmed gone, deleted.
pub async fn run_sweeper() -> Result<(), Error> {
    init_tracing();
    let config = Config::from_env()?;
    let admin = admin_from(&config).await;
    let admin = &admin;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| async move {
        let finish_by = deadline_instant(event.context.deadline);
        let report =
            admin.sweep_until(admin.idle_limit, Some(finish_by)).await.map_err(|e| Error::from(e.to_string()))?;
        Ok::<_, Error>(serde_json::to_value(report)?)
    }))
    .await
}

/// The processor's fan-out stage on SQS, when `ROOMCAST_FANOUT_QUEUE_URL` names its queue (the
/// SQS endpoint is the SDK's: `AWS_ENDPOINT_URL_SQS` or `AWS_ENDPOINT_URL` point it elsewhere).
pub fn hand_off_from(config: &Config, sdk: &aws_config::SdkConfig) -> Option<crate::deliver::stage::HandOff> {
    let url = config.fanout_queue_url.as_ref()?;
    let stage = crate::deliver::stage::sqs::SqsStage::new(aws_sdk_sqs::Client::new(sdk), url);
    Some(crate::deliver::stage::HandOff { stage: Arc::new(stage), recipients: config.handoff_recipients })
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
