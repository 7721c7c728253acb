//! The dev stack's own HTTP API, beside the gateway's routes.
//!
//! Plugins (`roomcast plugin … --dev URL`): the plugin operations over HTTP, so a plugin can be
//! uploaded into the embedded store (which lives inside the `roomcast dev` process) from another
//! terminal. The same records are written as against DynamoDB, and the stack's processor
//! activates them from its stream exactly as in AWS. Metrics (`roomcast bench`): the processor's
//! counts so far.
//!
//! | request | does |
//! |---|---|
//! | `GET /_dev/metrics` | the processor's counts (records, delivered, plugin faults, …) as JSON |
//! | `GET /_dev/plugins/{tenant}` | `{"active": version or null, "authorizesJoins": bool or null, "versions": [PluginMeta…]}` |
//! | `POST /_dev/plugins/{tenant}?policy=open&fuel=…&memory_mib=…&deadline_ms=…` (body: the component) | checks and uploads it; answers its `PluginMeta` |
//! | `PUT /_dev/plugins/{tenant}/active` (body `{"version": v or null}`) | activates a version, or disables the plugin |
//! | `POST /publish` (a token with the `publish` scope; body `{tenant, room, message, user_id?, idempotency_key?}`) | the `publish` Lambda's HTTP API: `{"id"}`, or `{"error"}` with its status |
//! | `GET /_dev/tenants/{tenant}/settings` | the tenant's settings (`roomcast tenant show`) |
//! | `PUT /_dev/tenants/{tenant}/settings` (body: the settings' fields) | writes them (`roomcast tenant set`) |
//! | `POST /_dev/admin` | an admin operation (`roomcast admin --dev`): the admin function's event in, its `{statusCode, body}` out |
//! | `GET /_dev/webhooks/deliveries` (`?tenant=T`: one tenant's) | the last 500 delivery attempts, oldest first: tenant, at, attempt, outcome (`delivered`, `retrying`, `dead-lettered`, `dropped`), error, retry_in_ms, the events' types and ids |
//! | `GET /_dev/webhooks/dead` | the tenants' webhook deliveries given up on: tenant, events, error, attempts |
//! | `POST /_dev/webhooks/redrive` (`?tenant=T`: one tenant's) | queues them again: `{"events": n}` |
//! | `GET /_dev/tenants/{tenant}/identity` | the tenant's own identity (`roomcast tenant identity`; the dev stack is local) |
//! | `PUT /_dev/tenants/{tenant}/identity` (body: the identity) | writes it (`roomcast tenant identity`, `roomcast tenant revoke`) |
//! | `GET /_dev/tenants/{tenant}/config` | the tenant's plugin configuration (`roomcast plugin config get`) |
//! | `PUT /_dev/tenants/{tenant}/config` (body: `{"KEY": "VALUE", …}`) | replaces it (`roomcast plugin config set/unset`) |
//!
//! Errors answer `{"error": "…"}` with 400 (a bad component or request), 404 (no such version)
//! or 503 (the store failed). The server listens on loopback only, like the rest of the stack.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;

use crate::metrics::Metrics;
use crate::model::FailurePolicy;
use crate::plugins::{LimitOverrides, PluginHost};
use crate::store::Store;

#[derive(Clone)]
struct Api {
    store: Arc<dyn Store>,
    host: Arc<PluginHost>,
    metrics: Arc<Metrics>,
    webhooks: Arc<crate::webhook::local::LocalWebhooks>,
}

pub fn routes(
    store: Arc<dyn Store>,
    host: Arc<PluginHost>,
    metrics: Arc<Metrics>,
    webhooks: Arc<crate::webhook::local::LocalWebhooks>,
) -> axum::Router {
    axum::Router::new()
        .route("/_dev/webhooks/dead", get(dead_letters))
        .route("/_dev/webhooks/deliveries", get(deliveries))
        .route("/_dev/webhooks/redrive", axum::routing::post(redrive))
        .route("/_dev/metrics", get(counts))
        .route("/_dev/plugins/{tenant}", get(list).post(upload))
        .route("/_dev/plugins/{tenant}/active", put(activate))
        .route("/_dev/tenants/{tenant}/settings", get(settings).put(set_settings))
        .route("/_dev/tenants/{tenant}/identity", get(identity).put(set_identity))
        .route("/_dev/tenants/{tenant}/config", get(plugin_config).put(set_plugin_config))
        // The host refuses components over its limit with a clear reason; let them reach it.
        .layer(DefaultBodyLimit::max(8 << 20))
        .with_state(Api { store, host, metrics, webhooks })
}

async fn counts(State(api): State<Api>) -> Response {
    axum::Json(api.metrics.snapshot()).into_response()
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, axum::Json(json!({ "error": message.to_string() }))).into_response()
}

fn unavailable(e: crate::store::StoreError) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, e)
}

async fn list(State(api): State<Api>, Path(tenant): Path<String>) -> Response {
    let (active, joins) = match api.store.active_plugin(&tenant).await {
        Ok(active) => (active.as_ref().map(|a| a.version.clone()), active.and_then(|a| a.authorizes_joins)),
        Err(e) => return unavailable(e),
    };
    match api.store.plugins(&tenant).await {
        Ok(versions) => {
            axum::Json(json!({ "active": active, "authorizesJoins": joins, "versions": versions })).into_response()
        }
        Err(e) => unavailable(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    policy: Option<String>,
    fuel: Option<u64>,
    memory_mib: Option<usize>,
    deadline_ms: Option<u64>,
    max_extra_rooms: Option<usize>,
    max_only_users: Option<usize>,
}

async fn upload(
    State(api): State<Api>,
    Path(tenant): Path<String>,
    Query(query): Query<UploadQuery>,
    body: axum::body::Bytes,
) -> Response {
    let policy = match query.policy.as_deref() {
        None | Some("open") => FailurePolicy::Open,
        Some("closed") => FailurePolicy::Closed,
        Some(other) => return error(StatusCode::BAD_REQUEST, format!("policy {other:?} is not open or closed")),
    };
    let limits = LimitOverrides {
        fuel: query.fuel,
        memory_mib: query.memory_mib,
        deadline_ms: query.deadline_ms,
        max_extra_rooms: query.max_extra_rooms,
        max_only_users: query.max_only_users,
        ..LimitOverrides::default()
    };
    match crate::plugins::upload(&*api.store, &api.host, &tenant, &body, policy, limits, chrono::Utc::now()).await {
        Ok(meta) => axum::Json(meta).into_response(),
        Err(e) if e.downcast_ref::<crate::store::StoreError>().is_some() => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Activate {
    version: Option<String>,
}

async fn activate(State(api): State<Api>, Path(tenant): Path<String>, body: axum::body::Bytes) -> Response {
    let request: Activate = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body must be {{\"version\": …}}: {e}")),
    };
    if let Some(version) = &request.version {
        match api.store.plugins(&tenant).await {
            Ok(versions) if versions.iter().any(|m| &m.version == version) => {}
            Ok(_) => return error(StatusCode::NOT_FOUND, format!("{tenant} has no uploaded version {version}")),
            Err(e) => return unavailable(e),
        }
    }
    match api.store.set_active_plugin(&tenant, request.version.as_deref()).await {
        Ok(()) => axum::Json(json!({ "active": request.version })).into_response(),
        Err(e) => unavailable(e),
    }
}

/// `POST /publish`, as the `publish` Lambda answers it behind its HTTP API route.
/// `POST /_dev/admin`: an admin operation (the `admin` function's event as the body; its answer,
/// `{statusCode, body}`, as the response) against this stack's table, probing connections through
/// this stack's own `@connections` — `roomcast admin --dev URL`.
pub fn admin_route(admin: Arc<crate::admin::Admin>) -> axum::Router {
    async fn run(State(admin): State<Arc<crate::admin::Admin>>, body: axum::body::Bytes) -> Response {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            // On a blocking thread of its own: the sweep's future is not provably `Send` (a
            // higher-ranked lifetime in its stream of probes), which axum's handlers must be.
            Ok(event) => {
                let runtime = tokio::runtime::Handle::current();
                match tokio::task::spawn_blocking(move || runtime.block_on(admin.handle(&event))).await {
                    Ok(answer) => axum::Json(answer).into_response(),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("the admin operation failed: {e}")),
                }
            }
            Err(e) => error(StatusCode::BAD_REQUEST, format!("the body must be an admin event (JSON): {e}")),
        }
    }
    axum::Router::new().route("/_dev/admin", axum::routing::post(run)).with_state(admin)
}

pub fn publish_route(deps: crate::publish::PublishDeps, secret: Vec<u8>) -> axum::Router {
    let state = std::sync::Arc::new((deps, secret));
    axum::Router::new()
        .route(
            "/publish",
            axum::routing::post(
                |State(state): State<std::sync::Arc<(crate::publish::PublishDeps, Vec<u8>)>>,
                 headers: axum::http::HeaderMap,
                 body: axum::body::Bytes| async move {
                    let (deps, secret) = &*state;
                    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    let event = json!({
                        "requestContext": {},
                        "headers": {"authorization": authorization},
                        "body": String::from_utf8_lossy(&body),
                    });
                    let answer = match crate::backend::handle(deps, &event, secret).await {
                        Ok(answer) => answer,
                        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
                    };
                    let status = answer["statusCode"].as_u64().and_then(|s| StatusCode::from_u16(s as u16).ok());
                    let body: serde_json::Value =
                        serde_json::from_str(answer["body"].as_str().unwrap_or("{}")).unwrap_or_default();
                    (status.unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), axum::Json(body)).into_response()
                },
            ),
        )
        .layer(DefaultBodyLimit::max(1 << 20))
        .with_state(state)
}

async fn identity(State(api): State<Api>, Path(tenant): Path<String>) -> Response {
    match api.store.tenant_identity(&tenant).await {
        Ok(identity) => {
            axum::Json(identity.unwrap_or_else(|| crate::identity::TenantIdentity::new(&tenant))).into_response()
        }
        Err(e) => unavailable(e),
    }
}

async fn set_identity(State(api): State<Api>, Path(tenant): Path<String>, body: axum::body::Bytes) -> Response {
    let identity: crate::identity::TenantIdentity = match serde_json::from_slice(&body) {
        Ok(identity) => identity,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body must be the tenant's identity: {e}")),
    };
    if let Err(e) = crate::model::Name::parse("tenant", &tenant) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let identity = crate::identity::TenantIdentity {
        pk: crate::model::tenant_pk(&tenant),
        sk: crate::identity::IDENTITY_SK.into(),
        record_type: "identity".into(),
        tenant: tenant.clone(),
        ..identity
    };
    if let Err(e) = identity.check() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match api.store.put_tenant_identity(&identity).await {
        Ok(()) => axum::Json(identity).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn settings(State(api): State<Api>, Path(tenant): Path<String>) -> Response {
    match api.store.tenant_settings(&tenant).await {
        Ok(settings) => {
            axum::Json(redacted(settings.unwrap_or_else(|| crate::model::TenantSettings::new(&tenant)))).into_response()
        }
        Err(e) => unavailable(e),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SetSettings {
    presence_announce_max_users: Option<u64>,
    #[serde(default)]
    rate_limits: std::collections::BTreeMap<String, u32>,
    #[serde(default)]
    latest_on_join: Vec<String>,
    #[serde(default)]
    webhook: Option<crate::model::WebhookSettings>,
}

/// Settings as the API gives them: a webhook's secret left out (empty).
fn redacted(mut settings: crate::model::TenantSettings) -> crate::model::TenantSettings {
    if let Some(webhook) = settings.webhook.as_mut() {
        webhook.secret.clear();
    }
    settings
}

async fn deliveries(State(api): State<Api>, Query(q): Query<TenantFilter>) -> Response {
    axum::Json(api.webhooks.deliveries(q.tenant.as_deref())).into_response()
}

async fn dead_letters(State(api): State<Api>) -> Response {
    axum::Json(api.webhooks.dead_letters()).into_response()
}

/// `?tenant=T`: one tenant's.
#[derive(Debug, Deserialize)]
struct TenantFilter {
    tenant: Option<String>,
}

async fn redrive(State(api): State<Api>, Query(q): Query<TenantFilter>) -> Response {
    let events = api.webhooks.redrive(q.tenant.as_deref()).await;
    axum::Json(serde_json::json!({ "events": events })).into_response()
}

async fn set_settings(State(api): State<Api>, Path(tenant): Path<String>, body: axum::body::Bytes) -> Response {
    let request: SetSettings = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body must be the settings' fields: {e}")),
    };
    if let Err(e) = crate::model::Name::parse("tenant", &tenant) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    for (name, value) in &request.rate_limits {
        if let Err(e) = crate::limits::RateLimits::default().set(name, *value) {
            return error(StatusCode::BAD_REQUEST, e);
        }
    }
    if request.latest_on_join.len() > crate::model::TenantSettings::MAX_LATEST_ON_JOIN {
        let most = crate::model::TenantSettings::MAX_LATEST_ON_JOIN;
        return error(StatusCode::BAD_REQUEST, format!("latestOnJoin: at most {most} patterns"));
    }
    for pattern in &request.latest_on_join {
        if let Err(e) = crate::model::parse_room_pattern(pattern) {
            return error(StatusCode::BAD_REQUEST, format!("latestOnJoin: {e}"));
        }
    }
    let mut request = request;
    if let Some(webhook) = request.webhook.as_mut()
        && webhook.secret.is_empty()
    {
        // No secret given: the stored one stands (the API never gives it out).
        match api.store.tenant_settings(&tenant).await {
            Ok(stored) => webhook.secret = stored.and_then(|s| s.webhook).map(|w| w.secret).unwrap_or_default(),
            Err(e) => return unavailable(e),
        }
    }
    if let Some(webhook) = &request.webhook
        && let Err(e) = crate::webhook::check(webhook)
    {
        return error(StatusCode::BAD_REQUEST, format!("webhook: {e}"));
    }
    let settings = crate::model::TenantSettings {
        webhook: request.webhook,
        presence_announce_max_users: request.presence_announce_max_users,
        rate_limits: request.rate_limits,
        latest_on_join: request.latest_on_join,
        ..crate::model::TenantSettings::new(&tenant)
    };
    match api.store.put_tenant_settings(&settings).await {
        Ok(()) => axum::Json(redacted(settings)).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn plugin_config(State(api): State<Api>, Path(tenant): Path<String>) -> Response {
    match api.store.plugin_config(&tenant).await {
        Ok(config) => axum::Json(config.map(|c| c.values).unwrap_or_default()).into_response(),
        Err(e) => unavailable(e),
    }
}

async fn set_plugin_config(State(api): State<Api>, Path(tenant): Path<String>, body: axum::body::Bytes) -> Response {
    let values: std::collections::BTreeMap<String, String> = match serde_json::from_slice(&body) {
        Ok(values) => values,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body must be an object of strings: {e}")),
    };
    if let Err(e) = crate::model::Name::parse("tenant", &tenant) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    let config = match crate::model::PluginConfig::new(&tenant, values, chrono::Utc::now()) {
        Ok(config) => config,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    match api.store.put_plugin_config(&config).await {
        Ok(()) => axum::Json(config.values).into_response(),
        Err(e) => unavailable(e),
    }
}

/// The client side: one request to a running dev stack's API; its `{"error"}` answers become
/// errors.
pub async fn request(base: &str, method: http::Method, path: &str, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
    request_as(base, method, path, body, None).await
}

/// [`request`] with an `Authorization: Bearer` token.
pub async fn request_as(
    base: &str,
    method: http::Method,
    path: &str,
    body: Vec<u8>,
    bearer: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let uri = format!("{}{path}", base.trim_end_matches('/'));
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<bytes::Bytes>>();
    let mut request =
        http::Request::builder().method(method).uri(&uri).header("content-type", "application/octet-stream");
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::new(bytes::Bytes::from(body)))?;
    let response = tokio::time::timeout(Duration::from_secs(60), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{uri}: no answer within 60 s"))?
        .map_err(|e| anyhow::anyhow!("{uri}: {e} (is `roomcast dev` running there?)"))?;
    let status = response.status();
    let bytes = response.into_body().collect().await.map_err(|e| anyhow::anyhow!("{uri}: {e}"))?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| anyhow::anyhow!("{uri}: answered {status} with {}", String::from_utf8_lossy(&bytes)))?;
    if !status.is_success() {
        anyhow::bail!("{} ({status})", answer["error"].as_str().unwrap_or(&answer.to_string()));
    }
    Ok(answer)
}
