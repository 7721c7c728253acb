//! A local API Gateway WebSocket API: what `roomcast dev` serves, faithful enough that what
//! works here works when deployed.
//!
//! * `GET /{stage}` upgrades to a WebSocket. `$connect` runs the deployed authorizer's rule
//!   ([`crate::auth`]) and then the real connect handler; a denial or a non-2xx answer refuses
//!   the upgrade with that status.
//! * Each text frame is routed on `$request.body.action` (a known route, else `$default`) to the
//!   real message handler, with an API Gateway-shaped event; its route response goes back to
//!   that client. Frames over 128 KB close the connection with 1009.
//! * Closing (by the client, the idle timeout, the maximum duration or `DELETE @connections`)
//!   runs `$disconnect` with the close code and reason.
//! * `/{stage}/@connections/{id}` is the management API ([`management`]): POST, GET, DELETE,
//!   with API Gateway's status codes and `x-amzn-ErrorType`s, and injectable faults.
//! * `/` is the browser page, written on `@roomcast/client` (served at `/client.js`);
//!   `/_dev/token` mints dev tokens for it.

pub mod account;
pub mod management;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::auth;
use crate::handlers::{self, HandlerDeps};
use crate::model::format_ts;
use crate::protocol::MAX_FRAME_BYTES;

pub use management::{Fault, Faults};

/// Routes the deployed API declares; any other action goes to `$default`.
pub const ROUTES: &[&str] = &["sendMessage", "join", "leave", "ping", "info", "history", "who", "recover", "signal"];

/// How callers prove who they are at `$connect`.
#[derive(Clone, Debug)]
pub enum AuthMode {
    /// The deployed rule: an HS256 JWT signed with this secret.
    Jwt { secret: Vec<u8> },
    /// Also accepts unsigned `?tenant=&user_id=` (never in production).
    InsecureDev { secret: Vec<u8> },
}

impl AuthMode {
    pub fn secret(&self) -> &[u8] {
        match self {
            AuthMode::Jwt { secret } | AuthMode::InsecureDev { secret } => secret,
        }
    }
}

/// API Gateway's limits, configurable for tests.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    pub max_connection: Duration,
    /// Messages queued for one client before `@connections` answers 429.
    pub send_buffer: usize,
    /// `@connections` latency and the account's quota ([`account`]); none by default.
    pub account: account::AccountSettings,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: MAX_FRAME_BYTES,
            idle_timeout: Duration::from_secs(600),
            max_connection: Duration::from_secs(7200),
            send_buffer: 256,
            account: account::AccountSettings::default(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GatewaySettings {
    pub stage: String,
    pub auth: AuthMode,
    pub limits: Limits,
}

/// What the socket task is told to send.
#[derive(Debug)]
pub(crate) enum Outbound {
    Text(String),
}

/// How long a client may take to accept one frame before the gateway gives up on it.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection as API Gateway knows it.
#[derive(Debug)]
pub(crate) struct Live {
    tx: mpsc::Sender<Outbound>,
    /// Closes the connection with a code and reason; separate from `tx`, so that a close gets
    /// through even when the send buffer is full.
    closer: tokio::sync::watch::Sender<Option<(u16, String)>>,
    /// False until the upgrade completes: `@connections` answers 410 meanwhile, as API Gateway
    /// does while `$connect` runs.
    open: bool,
    connected_at: DateTime<Utc>,
    last_active: DateTime<Utc>,
    source_ip: String,
    user_agent: String,
}

pub struct Gateway {
    pub settings: GatewaySettings,
    deps: HandlerDeps,
    connections: Mutex<HashMap<String, Live>>,
    faults: Faults,
    account: account::Account,
    /// The authorizer's rule, with tenants' own identities from the stack's table.
    verifier: crate::identity::Verifier,
}

impl Gateway {
    pub fn new(settings: GatewaySettings, deps: HandlerDeps) -> Arc<Gateway> {
        let account = account::Account::new(settings.limits.account);
        let verifier = crate::identity::Verifier::new(settings.auth.secret().to_vec(), Some(deps.store.clone()));
        Arc::new(Gateway {
            verifier,
            settings,
            deps,
            connections: Mutex::new(HashMap::new()),
            faults: Faults::default(),
            account,
        })
    }

    /// Faults to inject into `@connections` calls.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// `@connections` as the account sees it: calls answered, throttled, most in flight.
    pub fn account(&self) -> &account::Account {
        &self.account
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.lock().values().filter(|c| c.open).count()
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn router(self: &Arc<Self>) -> axum::Router {
        let stage = format!("/{}", self.settings.stage);
        axum::Router::new()
            .route("/", get(page))
            .route("/_dev/token", get(dev_token))
            .route("/client.js", get(client_js))
            .route(&stage, get(upgrade))
            .route(&format!("{stage}/@connections/{{id}}"), management::routes())
            .with_state(self.clone())
    }

    /// Serves until `shutdown` resolves, with `extra` routes beside the gateway's own.
    pub async fn serve(
        self: &Arc<Self>,
        listener: tokio::net::TcpListener,
        extra: axum::Router,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router().merge(extra);
        axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown)
            .await
    }

    fn now(&self) -> DateTime<Utc> {
        self.deps.clock.now()
    }
}

/// The dev page; a WebSocket upgrade here is told where the WebSocket endpoint is instead of
/// getting the page's HTML (which a client reads as a failed handshake).
async fn page(State(gateway): State<Arc<Gateway>>, headers: axum::http::HeaderMap) -> Response {
    let upgrade =
        headers.get("upgrade").and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if upgrade {
        let stage = &gateway.settings.stage;
        let message = format!(
            "the WebSocket endpoint is /{stage} (ws://HOST/{stage}?token=…), not /; this path serves the dev page"
        );
        return (axum::http::StatusCode::BAD_REQUEST, message).into_response();
    }
    Html(include_str!("page.html")).into_response()
}

/// `@roomcast/client` as built (`clients/js/dist/index.js`, kept in the repository so that this
/// crate builds without Node; `scripts/test` rebuilds it and fails if it drifted from its source).
async fn client_js() -> Response {
    ([("content-type", "text/javascript; charset=utf-8")], include_str!("../../../clients/js/dist/index.js"))
        .into_response()
}

/// A token for the page and for trying things out: `roomcast dev` signs it with its secret.
async fn dev_token(State(gw): State<Arc<Gateway>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let tenant = q.get("tenant").map(String::as_str).unwrap_or("demo");
    let user = q.get("user").map(String::as_str).unwrap_or("guest");
    if let Err(e) = crate::model::Name::parse("tenant", tenant) {
        return (StatusCode::BAD_REQUEST, e).into_response();
    }
    let claims = auth::Claims {
        tenant: tenant.into(),
        sub: user.into(),
        exp: gw.now().timestamp() + 12 * 3600,
        nbf: None,
        scope: None,
        rooms: None,
        extra: Default::default(),
    };
    let websocket = format!("/{}", gw.settings.stage);
    axum::Json(json!({ "token": auth::mint(&claims, gw.settings.auth.secret()), "websocket": websocket }))
        .into_response()
}

/// A fresh connection id in API Gateway's style (base64 of 11 random bytes, e.g. `L0SM9cOFvHcCIhw=`).
fn new_connection_id() -> String {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    base64::engine::general_purpose::STANDARD.encode(&bytes[..11])
}

async fn authorize(
    gw: &Gateway,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<HashMap<String, Value>, (u16, String)> {
    // As API Gateway: the authorizer's identity source is `route.request.querystring.token`, so
    // a token in a header never reaches it there; refused here too, saying where it goes.
    if !query.contains_key("token") && headers.contains_key("authorization") {
        return Err((
            401,
            "a token in the Authorization header is not read: pass it as ?token=… (API Gateway's authorizer \
             takes it from the query string only)"
                .to_string(),
        ));
    }
    let token = query.get("token").cloned().unwrap_or_default();
    if let AuthMode::InsecureDev { .. } = gw.settings.auth
        && token.is_empty()
        && let (Some(tenant), Some(user)) = (query.get("tenant"), query.get("user_id"))
    {
        tracing::warn!(%tenant, user_id = %user, "INSECURE dev auth: accepting an unsigned identity");
        return Ok(HashMap::from([
            ("tenant".to_string(), json!(tenant)),
            ("userId".to_string(), json!(user)),
            ("principalId".to_string(), json!(user)),
        ]));
    }
    gw.verifier
        .verify_connect(&token, query.get("tenant").map(String::as_str), gw.now().timestamp())
        .await
        .map(|claims| auth::context(&claims))
        .map_err(|denied| (denied.status(), denied.to_string()))
}

/// What every event of one connection shares.
#[derive(Clone, Debug)]
struct ConnectionContext {
    id: String,
    domain: String,
    stage: String,
    connected_at: DateTime<Utc>,
    source_ip: String,
    user_agent: String,
    authorizer: HashMap<String, Value>,
    query: HashMap<String, String>,
}

impl ConnectionContext {
    /// An API Gateway WebSocket proxy event for this connection.
    fn event(
        &self,
        route_key: &str,
        event_type: &str,
        now: DateTime<Utc>,
        extra: Value,
    ) -> ApiGatewayWebsocketProxyRequest {
        let mut v = json!({
            "headers": {"Host": self.domain, "User-Agent": self.user_agent},
            "requestContext": {
                "routeKey": route_key,
                "eventType": event_type,
                "messageDirection": "IN",
                "connectionId": self.id,
                "domainName": self.domain,
                "stage": self.stage,
                "apiId": "local",
                "requestId": uuid::Uuid::new_v4().to_string(),
                "connectedAt": self.connected_at.timestamp_millis(),
                "requestTimeEpoch": now.timestamp_millis(),
                "identity": {"sourceIp": self.source_ip, "userAgent": self.user_agent},
                "authorizer": self.authorizer,
            },
            "isBase64Encoded": false,
        });
        if event_type == "CONNECT" {
            v["queryStringParameters"] = json!(self.query);
            v["multiValueQueryStringParameters"] =
                json!(self.query.iter().map(|(k, val)| (k.clone(), vec![val.clone()])).collect::<HashMap<_, _>>());
        }
        if let (Value::Object(target), Value::Object(extra)) = (&mut v, extra) {
            for (k, val) in extra {
                match (k.as_str(), target.get_mut("requestContext")) {
                    ("disconnectStatusCode" | "disconnectReason", Some(Value::Object(ctx))) => {
                        ctx.insert(k, val);
                    }
                    _ => {
                        target.insert(k, val);
                    }
                }
            }
        }
        serde_json::from_value(v).expect("a well-formed WebSocket event")
    }
}

async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let authorizer = match authorize(&gw, &query, &headers).await {
        Ok(context) => context,
        Err((status, why)) => {
            tracing::info!(status, reason = %why, "upgrade refused by the authorizer");
            return (StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN), why).into_response();
        }
    };
    let now = gw.now();
    let ctx = ConnectionContext {
        id: new_connection_id(),
        domain: headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string(),
        stage: gw.settings.stage.clone(),
        connected_at: now,
        source_ip: peer.ip().to_string(),
        user_agent: headers.get("user-agent").and_then(|h| h.to_str().ok()).unwrap_or("").to_string(),
        authorizer,
        query,
    };
    let (tx, rx) = mpsc::channel(gw.settings.limits.send_buffer.max(1));
    let (closer, close_rx) = tokio::sync::watch::channel(None);
    gw.lock().insert(
        ctx.id.clone(),
        Live {
            tx,
            closer,
            open: false,
            connected_at: now,
            last_active: now,
            source_ip: ctx.source_ip.clone(),
            user_agent: ctx.user_agent.clone(),
        },
    );
    let response = handlers::connect(&ctx.event("$connect", "CONNECT", now, json!({})), &gw.deps).await;
    if !(200..300).contains(&response.status_code) {
        gw.lock().remove(&ctx.id);
        let status = StatusCode::from_u16(response.status_code as u16).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return (status, body_text(&response).unwrap_or_default()).into_response();
    }
    let limits = gw.settings.limits.clone();
    ws.max_message_size(limits.max_frame_bytes.saturating_mul(4))
        .on_upgrade(move |socket| connection(gw, ctx, socket, rx, close_rx, limits))
}

fn body_text(response: &ApiGatewayProxyResponse) -> Option<String> {
    match &response.body {
        Some(aws_lambda_events::encodings::Body::Text(t)) => Some(t.clone()),
        Some(aws_lambda_events::encodings::Body::Binary(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

/// `$request.body.action` when it names a declared route, else `$default`.
pub fn select_route(frame: &str) -> &'static str {
    serde_json::from_str::<Value>(frame)
        .ok()
        .and_then(|v| v.get("action").and_then(|a| a.as_str()).and_then(|a| ROUTES.iter().find(|r| **r == a).copied()))
        .unwrap_or("$default")
}

/// One open connection: frames in, route responses and `@connections` messages out, until it
/// closes for any reason; then `$disconnect`.
async fn connection(
    gw: Arc<Gateway>,
    ctx: ConnectionContext,
    mut socket: WebSocket,
    mut rx: mpsc::Receiver<Outbound>,
    mut close_rx: tokio::sync::watch::Receiver<Option<(u16, String)>>,
    limits: Limits,
) {
    if let Some(live) = gw.lock().get_mut(&ctx.id) {
        live.open = true;
    }
    tracing::info!(connection_id = %ctx.id, "connection open");
    // On the records' clock (the dev stack's): a test moves it to idle a socket or end it.
    let clock = gw.deps.clock.clone();
    let after = |d: Duration| clock.now() + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let max_deadline = after(limits.max_connection);
    let mut idle_deadline = after(limits.idle_timeout);
    let (code, reason): (u16, String) = loop {
        tokio::select! {
            frame = socket.recv() => match frame {
                Some(Ok(WsMessage::Text(text))) => {
                    idle_deadline = after(limits.idle_timeout);
                    gw.touch(&ctx.id);
                    if text.len() > limits.max_frame_bytes {
                        break close(&mut socket, 1009, "Message too big").await;
                    }
                    let route = select_route(&text);
                    let event = ctx.event(route, "MESSAGE", gw.now(), json!({"body": text.as_str()}));
                    let response = handlers::message(&event, &gw.deps).await;
                    if let Some(answer) = body_text(&response)
                        && socket.send(WsMessage::Text(answer.into())).await.is_err()
                    {
                        break (1006, "Connection lost".into());
                    }
                }
                Some(Ok(WsMessage::Binary(bytes))) => {
                    idle_deadline = after(limits.idle_timeout);
                    gw.touch(&ctx.id);
                    if bytes.len() > limits.max_frame_bytes {
                        break close(&mut socket, 1009, "Message too big").await;
                    }
                    let body = base64::engine::general_purpose::STANDARD.encode(&bytes);
                    let event = ctx.event("$default", "MESSAGE", gw.now(), json!({"body": body, "isBase64Encoded": true}));
                    if let Some(answer) = body_text(&handlers::message(&event, &gw.deps).await)
                        && socket.send(WsMessage::Text(answer.into())).await.is_err()
                    {
                        break (1006, "Connection lost".into());
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => {
                    break match frame {
                        Some(f) => (f.code, f.reason.to_string()),
                        None => (1005, "Client-side close frame status not set".into()),
                    };
                }
                Some(Ok(_)) => {} // ping/pong: answered by the WebSocket layer
                Some(Err(e)) => {
                    let message = e.to_string();
                    if message.contains("too long") || message.contains("too big") {
                        break close(&mut socket, 1009, "Message too big").await;
                    }
                    break (1006, format!("Connection error: {message}"));
                }
                None => break (1006, "Connection lost".into()),
            },
            out = rx.recv() => match out {
                Some(Outbound::Text(text)) => {
                    match tokio::time::timeout(SEND_TIMEOUT, socket.send(WsMessage::Text(text.into()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break (1006, "Connection lost".into()),
                        Err(_) => break (1006, "Client not reading".into()),
                    }
                }
                None => break (1011, "Gateway stopping".into()),
            },
            _ = close_rx.changed() => {
                let (code, reason) = close_rx.borrow().clone().unwrap_or((1000, String::new()));
                // What `@connections` accepted before the DELETE goes out first, as API Gateway
                // sends a posted frame before it closes (a `terminated` error, then the close).
                while let Ok(Outbound::Text(text)) = rx.try_recv() {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(WsMessage::Text(text.into()))).await;
                }
                break close(&mut socket, code, &reason).await;
            }
            _ = clock.sleep_until(idle_deadline) => {
                break close(&mut socket, 1001, "Going away: idle timeout").await;
            }
            _ = clock.sleep_until(max_deadline) => {
                break close(&mut socket, 1001, "Going away: maximum connection duration").await;
            }
        }
    };
    gw.lock().remove(&ctx.id);
    tracing::info!(connection_id = %ctx.id, code, %reason, "connection closed");
    let event = ctx.event(
        "$disconnect",
        "DISCONNECT",
        gw.now(),
        json!({"disconnectStatusCode": code, "disconnectReason": reason}),
    );
    handlers::disconnect(&event, &gw.deps).await;
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) -> (u16, String) {
    let frame = WsMessage::Close(Some(CloseFrame { code, reason: reason.into() }));
    let _ = tokio::time::timeout(SEND_TIMEOUT, socket.send(frame)).await;
    (code, reason.to_string())
}

impl Gateway {
    fn touch(&self, id: &str) {
        let now = self.now();
        if let Some(live) = self.lock().get_mut(id) {
            live.last_active = now;
        }
    }
}

/// `GET @connections/{id}`'s answer, with the API's own JSON names.
pub(crate) fn describe(live: &Live) -> Value {
    json!({
        "connectedAt": format_ts(&live.connected_at),
        "lastActiveAt": format_ts(&live.last_active),
        "identity": {"sourceIp": live.source_ip, "userAgent": live.user_agent},
    })
}

impl Gateway {
    /// Closes every open connection with 1001, as a redeploy does; each then runs `$disconnect`.
    pub async fn close_all(&self) {
        for live in self.lock().values() {
            let _ = live.closer.send(Some((1001, "Going away: server stopping".into())));
        }
        for _ in 0..100 {
            if self.lock().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
