//! The write path's Lambda entry points: each binary in `src/bin` is `main` → [`run_handler`],
//! [`run_authorizer`], [`run_publish`], [`run_admin`] or [`run_sweeper`]. Clients are built once
//! per container; a bad configuration fails the init with every problem named.

use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use roomcast_processor::assembly::Assembly;
use roomcast_table::config::{self, Config};
use roomcast_table::lambda::{deadline_instant, init_tracing, store_from};

use crate::handlers::{self, HandlerDeps};
use crate::metrics::Metrics;
use crate::model::SystemClock;

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
    // The message route checks `refresh` tokens as the authorizer does (the secret read once
    // per container; tenants' own identities from the table).
    // Without it (no secret configured, or SSM unavailable at this cold start) the route works
    // and `refresh` is refused, logged.
    let verifier = match route {
        Route::Message => match jwt_secret().await {
            Ok(secret) => Some(Arc::new(crate::identity::Verifier::new(secret, Some(store.clone())))),
            Err(e) => {
                tracing::error!(error = %e, "no JWT secret: this container refuses `refresh`");
                None
            }
        },
        Route::Connect | Route::Disconnect => None,
    };
    let deps = HandlerDeps {
        verifier,
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
        crate::backend::handle(deps, &event.payload, secret).await.map_err(Error::from)
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
