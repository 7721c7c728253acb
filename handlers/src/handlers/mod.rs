//! The write path: API Gateway WebSocket routes → records in the table.
//!
//! These handlers validate the request and write (or delete) records; they never call
//! `PostToConnection`. Whatever reaches other clients goes through the stream and the processor.
//! A handler answers only its own caller, through the route response (`pong`, `info`, `history`,
//! acknowledgements and errors). Bad input gets an `error` answer and writes nothing.

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use serde_json::Value;

use crate::model::{Clock, Connection, IdempotencyRecord, JoinReason, Message, Name, NewConnection, expiry, format_ts};
use crate::protocol::{
    ChatMessage, ErrorCode, FrameError, MAX_HISTORY_LIMIT, Request, ServerMessage, parse_frame_with_ref,
};
use crate::store::{HistoryFrom, Store, StoreError};

mod frames;
use frames::act;
pub(crate) use frames::{join_as, leave_as};

/// The most rooms one connection may be in (also keeps `$connect` within one transaction).
pub const MAX_ROOMS_PER_CONNECTION: usize = 50;

/// What the handlers need, built once per Lambda container (or once per `roomcast dev`).
#[derive(Clone)]
pub struct HandlerDeps {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub connection_ttl_seconds: i64,
    pub history_ttl_seconds: i64,
    /// How long an idempotency key stands for the message it wrote.
    pub idempotency_window_seconds: i64,
    /// Whether each tenant's plugin decides joins, as its `ACTIVE` pointer said a moment ago.
    pub joins: JoinRules,
    /// Rate limits per connection, user and tenant ([`crate::limits`]).
    pub limits: crate::limits::Limiter,
    /// Checks a `refresh`'s token as the `$connect` authorizer checks one (the deployment's
    /// secret, or the tenant's own identity); `None`: `refresh` is refused.
    pub verifier: Option<Arc<crate::identity::Verifier>>,
}

/// Per tenant, whether its plugin decides joins (the `ACTIVE` pointer's `authorizesJoins`),
/// read at most every [`JoinRules::FRESH`] per container: `$connect` and a `join` from a
/// connection opened before the plugin decided joins ask it.
#[derive(Clone, Default)]
pub struct JoinRules(Arc<std::sync::Mutex<std::collections::HashMap<String, (bool, std::time::Instant)>>>);

impl JoinRules {
    /// How long a read stands. A plugin activated meanwhile is caught by the processor, which
    /// asks it about every join it sees.
    pub const FRESH: std::time::Duration = std::time::Duration::from_secs(5);

    async fn decided(&self, store: &dyn Store, tenant: &str) -> Result<bool, crate::store::StoreError> {
        if let Some((decided, at)) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(tenant)
            && at.elapsed() < Self::FRESH
        {
            return Ok(*decided);
        }
        let decided = store.active_plugin(tenant).await?.and_then(|a| a.authorizes_joins).unwrap_or(false);
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(tenant.to_string(), (decided, std::time::Instant::now()));
        Ok(decided)
    }
}

/// The default idempotency window (kept with the idempotency records).
pub use crate::model::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS;

fn respond(status: i64, body: Option<String>) -> ApiGatewayProxyResponse {
    let mut response = ApiGatewayProxyResponse::default();
    response.status_code = status;
    response.body = body.map(Body::Text);
    response
}

fn internal(err: &StoreError) -> ApiGatewayProxyResponse {
    let (status, message) = unavailable(err);
    respond(status, Some(message.to_json()))
}

/// The table was unavailable: a 500 and an `internal` error.
fn unavailable(err: &StoreError) -> (i64, ServerMessage) {
    tracing::error!(error = %err, "table unavailable");
    let message = "the service is unavailable; nothing was written".into();
    (500, ServerMessage::Error { code: ErrorCode::Internal, message, retry_after_ms: None })
}

/// The caller's identity, from the `$connect` authorizer's context (never from the client).
#[derive(Debug, PartialEq, Eq)]
pub struct Identity {
    pub tenant: Name,
    pub user_id: String,
    /// The authorizer context's other string values (the token's claims it passed on), for the
    /// tenant's `authorize-join` hook; `rooms`, when present, limits the rooms it may join.
    pub claims: std::collections::BTreeMap<String, String>,
}

impl Identity {
    /// The `rooms` claim's patterns, if the token had one.
    pub fn room_patterns(&self) -> Result<Option<Vec<String>>, String> {
        room_patterns(&self.claims)
    }
}

/// The `rooms` claim's patterns among `claims`, if there is one.
fn room_patterns(claims: &std::collections::BTreeMap<String, String>) -> Result<Option<Vec<String>>, String> {
    match claims.get("rooms") {
        None => Ok(None),
        Some(text) => serde_json::from_str::<Vec<String>>(text)
            .map(Some)
            .map_err(|e| format!("the authorizer's rooms claim is not a list of room names: {e}")),
    }
}

/// Why a `rooms` claim refuses a room.
fn not_in_claim(room: &str) -> String {
    format!("this token may not join room {room:?} (its rooms claim does not name it)")
}

/// Claims passed on to plugins: at most this many bytes, names and values together.
const MAX_CLAIMS_BYTES: usize = 4096;

/// The claims a connection keeps from its token, as the authorizer's context passes them on
/// (`$connect`) or as a `refresh` gives them: every claim but the tenant and the user, as text.
pub fn kept_claims(
    context: &std::collections::HashMap<String, Value>,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut claims = std::collections::BTreeMap::new();
    let mut size = 0;
    for (name, value) in context {
        if matches!(name.as_str(), "tenant" | "userId" | "principalId" | "integrationLatency") {
            continue;
        }
        let value = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => continue,
        };
        size += name.len() + value.len();
        if size > MAX_CLAIMS_BYTES {
            return Err(format!("the token's claims are over {MAX_CLAIMS_BYTES} bytes"));
        }
        claims.insert(name.clone(), value);
    }
    Ok(claims)
}

/// Whether the token a connection holds (its `exp` claim, when it has one) has expired.
pub fn token_expired(conn: &Connection, now: chrono::DateTime<chrono::Utc>) -> bool {
    conn.claims.get("exp").and_then(|exp| exp.parse::<i64>().ok()).is_some_and(|exp| exp <= now.timestamp())
}

/// 401 without any authorizer context; 403 when it lacks a valid tenant or user.
pub fn identity(request: &ApiGatewayWebsocketProxyRequest) -> Result<Identity, (i64, String)> {
    // A REQUEST authorizer's context arrives flat (`tenant`, `userId`, `principalId`); the event
    // types keep it in `fields`.
    let context = &request.request_context.authorizer.fields;
    if context.is_empty() {
        return Err((401, "no authorizer context: $connect must run behind the Roomcast authorizer".into()));
    }
    let text = |key: &str| match context.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let tenant = text("tenant").ok_or((403, "the authorizer context has no tenant".to_string()))?;
    let tenant = Name::parse("tenant", &tenant).map_err(|e| (403, e))?;
    let user_id = text("userId")
        .or_else(|| text("principalId"))
        .ok_or((403, "the authorizer context has neither userId nor principalId".to_string()))?;
    if user_id.len() > crate::auth::MAX_USER_ID_BYTES || user_id.chars().any(|c| c == '#' || c.is_control()) {
        return Err((
            403,
            format!(
                "the user id must be at most {} bytes, without '#' or control characters",
                crate::auth::MAX_USER_ID_BYTES
            ),
        ));
    }
    let claims = kept_claims(context).map_err(|e| (403, format!("the authorizer context: {e}")))?;
    Ok(Identity { tenant, user_id, claims })
}

fn connection_id(request: &ApiGatewayWebsocketProxyRequest) -> Option<&str> {
    request.request_context.connection_id.as_deref().filter(|id| !id.is_empty())
}

/// The longest `?deployment_id=` or `?connection_type=` a connection may carry.
pub const MAX_LABEL_BYTES: usize = 128;

/// `$connect`: checks the authorizer's context, reads `rooms`, `deployment_id` and
/// `connection_type`, and writes the connection with its memberships.
pub async fn connect(request: &ApiGatewayWebsocketProxyRequest, deps: &HandlerDeps) -> ApiGatewayProxyResponse {
    let who = match identity(request) {
        Ok(who) => who,
        Err((status, why)) => {
            tracing::warn!(status, reason = %why, "connection refused");
            return respond(status, Some(why));
        }
    };
    let Some(connection_id) = connection_id(request) else {
        return respond(400, Some("the request has no connectionId".into()));
    };
    let context = &request.request_context;
    let (Some(domain), Some(stage)) = (context.domain_name.as_deref(), context.stage.as_deref()) else {
        return respond(400, Some("the request has no domainName or stage".into()));
    };
    let query = &request.query_string_parameters;
    let mut rooms = BTreeSet::new();
    for room in query.first("rooms").unwrap_or("").split(',').map(str::trim).filter(|r| !r.is_empty()) {
        match Name::parse("room", room) {
            Ok(room) => rooms.insert(room.to_string()),
            Err(why) => return respond(400, Some(why)),
        };
    }
    if rooms.len() > MAX_ROOMS_PER_CONNECTION {
        return respond(400, Some(format!("at most {MAX_ROOMS_PER_CONNECTION} rooms per connection")));
    }
    // `since=room:id,…`: per room, the last message the client saw before it reconnected; the
    // processor sends what came after, right after the welcome.
    let mut recover = std::collections::BTreeMap::new();
    for pair in query.first("since").unwrap_or("").split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((room, id)) = pair.rsplit_once(':') else {
            return respond(400, Some(format!("since: {pair:?} is not room:message-id")));
        };
        if !rooms.contains(room) {
            return respond(400, Some(format!("since: room {room:?} is not among this connection's rooms")));
        }
        if crate::model::message_sk_of_id(id).is_none() {
            return respond(400, Some(format!("since: {id:?} is not a message id")));
        }
        recover.insert(room.to_string(), id.to_string());
    }
    // The token's `rooms` claim: a room it does not name is not joined; the processor tells the
    // client (`join_denied`) right after the welcome.
    let patterns = match who.room_patterns() {
        Ok(patterns) => patterns,
        Err(why) => return respond(403, Some(why)),
    };
    let mut denied = std::collections::BTreeMap::new();
    if let Some(patterns) = &patterns {
        rooms.retain(|room| {
            let allowed = crate::auth::room_allowed(patterns, room);
            if !allowed {
                denied.insert(room.clone(), not_in_claim(room));
            }
            allowed
        });
        recover.retain(|room, _| rooms.contains(room));
    }
    let now = deps.clock.now();
    let op = crate::limits::Operation::Connect;
    match deps.limits.check(deps.store.as_ref(), op, who.tenant.as_str(), &who.user_id, None, now).await {
        Ok(None) => {}
        Ok(Some(limited)) => {
            tracing::warn!(
                connection_id,
                tenant = %who.tenant,
                user_id = %who.user_id,
                scope = limited.scope.as_str(),
                limit = limited.limit,
                "rate_limited"
            );
            return respond(429, Some(limited.frame_error().message));
        }
        Err(err) => return internal(&err),
    }
    // Whether the tenant's plugin decides joins: one read of its `ACTIVE` pointer per connect
    // (never per join or message). Then this connection's joins wait for the processor.
    let authorize_joins = match deps.joins.decided(deps.store.as_ref(), who.tenant.as_str()).await {
        Ok(decided) => decided,
        Err(err) => return internal(&err),
    };
    // The client's own labels, kept with the connection and shown in `welcome` and `info`.
    let mut labels = [None, None];
    for (slot, name) in labels.iter_mut().zip(["connection_type", "deployment_id"]) {
        if let Some(value) = query.first(name) {
            if value.is_empty() || value.len() > MAX_LABEL_BYTES || value.chars().any(char::is_control) {
                return respond(
                    400,
                    Some(format!("{name} must be 1 to {MAX_LABEL_BYTES} bytes, without control characters")),
                );
            }
            *slot = Some(value.to_string());
        }
    }
    let [connection_type, deployment_id] = labels;
    let mut conn = Connection::new(NewConnection {
        connection_id,
        tenant: &who.tenant,
        user_id: &who.user_id,
        connection_type,
        deployment_id,
        rooms,
        endpoint: format!("https://{domain}/{stage}"),
        now,
        ttl_seconds: deps.connection_ttl_seconds,
    });
    conn.recover = recover;
    conn.claims = who.claims.clone();
    conn.denied = denied;
    conn.authorize_joins = authorize_joins;
    if authorize_joins {
        conn.pending_rooms = conn.rooms.clone();
    }
    let memberships: Vec<_> = conn.rooms.iter().map(|room| conn.membership(room, JoinReason::Connect, now)).collect();
    match deps.store.put_connection(&conn, &memberships).await {
        Ok(()) => {
            tracing::info!(connection_id, tenant = %conn.tenant, user_id = %conn.user_id, rooms = conn.rooms.len(), "connected");
            respond(200, None)
        }
        Err(err) => internal(&err),
    }
}

/// `$disconnect`: deletes the connection record (the processor removes its memberships).
/// Idempotent; logs API Gateway's close code and reason.
pub async fn disconnect(request: &ApiGatewayWebsocketProxyRequest, deps: &HandlerDeps) -> ApiGatewayProxyResponse {
    let Some(connection_id) = connection_id(request) else {
        return respond(400, Some("the request has no connectionId".into()));
    };
    let context = &request.request_context;
    match deps.store.delete_connection(connection_id, None).await {
        Ok(old) => {
            tracing::info!(
                connection_id,
                close_code = context.disconnect_status_code,
                close_reason = context.disconnect_reason.as_deref().unwrap_or(""),
                existed = old.is_some(),
                "disconnected"
            );
            respond(200, None)
        }
        Err(err) => internal(&err),
    }
}

/// `$default` and the named routes: one client frame. A frame's `ref` (a client's request id)
/// comes back on its answer, so a client with several requests in flight matches each answer
/// to its request.
pub async fn message(request: &ApiGatewayWebsocketProxyRequest, deps: &HandlerDeps) -> ApiGatewayProxyResponse {
    let Some(connection_id) = connection_id(request) else {
        return respond(400, Some("the request has no connectionId".into()));
    };
    let (parsed, reference) = match (&request.body, request.is_base64_encoded) {
        (_, true) => {
            (Err(FrameError::new(ErrorCode::InvalidJson, "binary frames are not supported; send JSON text")), None)
        }
        (None, _) => (Err(FrameError::new(ErrorCode::InvalidJson, "empty frame")), None),
        (Some(body), false) => parse_frame_with_ref(body),
    };
    let (status, message) = answer_frame(connection_id, parsed, deps).await;
    let body = match (reference, serde_json::to_value(&message)) {
        (Some(reference), Ok(Value::Object(mut fields))) => {
            fields.insert("ref".into(), Value::String(reference));
            Value::Object(fields).to_string()
        }
        _ => message.to_json(),
    };
    respond(status, Some(body))
}

/// The answer to one parsed frame, and its HTTP status (500: the table was unavailable).
async fn answer_frame(
    connection_id: &str,
    parsed: Result<Request, FrameError>,
    deps: &HandlerDeps,
) -> (i64, ServerMessage) {
    let request = match parsed {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(connection_id, code = ?e.code, reason = %e.message, "bad frame");
            return (200, e.into());
        }
    };
    let now = deps.clock.now();
    let conn = match deps.store.get_connection(connection_id, now).await {
        Ok(Some(conn)) => conn,
        Ok(None) => {
            return (200, FrameError::new(ErrorCode::NotConnected, "this connection has no record; reconnect").into());
        }
        Err(err) => return unavailable(&err),
    };
    if let Some(operation) = crate::limits::operation_of(&request) {
        let (tenant, user) = (conn.tenant.as_str(), conn.user_id.as_str());
        match deps.limits.check(deps.store.as_ref(), operation, tenant, user, Some(connection_id), now).await {
            Ok(None) => {}
            Ok(Some(limited)) => return (200, refuse(&limited, &conn, deps).await.into()),
            Err(err) => return unavailable(&err),
        }
    }
    // After the limits: a connection past its token's expiry is held to them all the same.
    if token_expired(&conn, now) && !matches!(request, Request::Refresh { .. } | Request::Ping) {
        let message = "this connection's token has expired: send {\"action\":\"refresh\",\"token\":…} with a new one";
        return (200, FrameError::new(ErrorCode::TokenExpired, message).into());
    }
    match act(request, &conn, deps, now).await {
        Ok(message) => (200, message),
        Err(Failure::Client(e)) => {
            tracing::info!(connection_id, code = ?e.code, reason = %e.message, "request refused");
            (200, e.into())
        }
        Err(Failure::Platform(err)) => unavailable(&err),
    }
}

/// Over a rate limit: the `rate_limited` answer; a connection that kept going after it was
/// told is also deleted (`closeReason: rate_limited`), and the processor closes its socket.
async fn refuse(limited: &crate::limits::Limited, conn: &Connection, deps: &HandlerDeps) -> FrameError {
    let connection_id = conn.connection_id.as_str();
    tracing::warn!(
        connection_id,
        tenant = %conn.tenant,
        user_id = %conn.user_id,
        operation = limited.operation.as_str(),
        scope = limited.scope.as_str(),
        limit = limited.limit,
        close = limited.close,
        "rate_limited"
    );
    let mut refused = limited.frame_error();
    if limited.close {
        match deps.store.delete_connection(connection_id, Some(crate::model::LeftReason::RateLimited)).await {
            Ok(_) => refused.message = format!("{}; this connection is being closed", refused.message),
            Err(err) => tracing::error!(connection_id, error = %err, "could not close a flooding connection"),
        }
    }
    refused
}

pub(crate) enum Failure {
    Client(FrameError),
    Platform(StoreError),
}

impl From<StoreError> for Failure {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NoConnection(_) => {
                Failure::Client(FrameError::new(ErrorCode::NotConnected, "this connection has no record; reconnect"))
            }
            other => Failure::Platform(other),
        }
    }
}

fn room_name(room: &str) -> Result<Name, Failure> {
    Name::parse("room", room).map_err(|e| Failure::Client(FrameError::new(ErrorCode::InvalidRequest, e)))
}

fn member_of(conn: &Connection, room: &str) -> Result<(), Failure> {
    if conn.pending_rooms.contains(room) {
        Err(Failure::Client(FrameError::new(
            ErrorCode::NotMember,
            format!("your join of room {room:?} is waiting for the room's rules"),
        )))
    } else if conn.rooms.contains(room) {
        Ok(())
    } else {
        Err(Failure::Client(FrameError::new(ErrorCode::NotMember, format!("you have not joined room {room:?}"))))
    }
}

/// The `$connect` REQUEST authorizer: the same rule as the local gateway ([`crate::auth`]).
/// Allowed → an `Allow` policy for the route with the flat context (`tenant`, `userId`, and a
/// `rooms` claim as its JSON text);
/// a bad token → a `Deny` policy (API Gateway answers 403); no token at all →
/// `Err("Unauthorized")`, which API Gateway answers with 401; a tenant's identity that cannot be
/// read → an error (500). The token is never logged. Each tenant's own identity
/// ([`crate::identity`]) is read through `verifier`; `?tenant=` names the tenant of an identity
/// provider's token, which has no `tenant` claim.
pub async fn authorize(
    request: &aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest,
    verifier: &crate::identity::Verifier,
    now: i64,
) -> Result<Value, &'static str> {
    // The query string only: API Gateway calls the authorizer only when `token` is there (its
    // identity source), so a header would never get this far in AWS.
    let token = request.query_string_parameters.first("token").map(str::to_string).unwrap_or_default();
    let resource = request.method_arn.clone().unwrap_or_else(|| "*".into());
    let policy = |principal: &str, effect: &str| {
        serde_json::json!({
            "principalId": principal,
            "policyDocument": {
                "Version": "2012-10-17",
                "Statement": [{"Action": "execute-api:Invoke", "Effect": effect, "Resource": [resource]}]
            },
        })
    };
    let hint = request.query_string_parameters.first("tenant");
    match verifier.verify_connect(&token, hint, now).await {
        Ok(claims) => {
            tracing::info!(tenant = %claims.tenant, user_id = %claims.sub, "allowed");
            let mut allow = policy(&claims.sub, "Allow");
            // The same context as the local gateway's (`rooms` included); API Gateway adds
            // `principalId` itself.
            let mut context = crate::auth::context(&claims);
            context.remove("principalId");
            allow["context"] = serde_json::json!(context);
            Ok(allow)
        }
        Err(crate::auth::Denied::Missing) => {
            tracing::info!("no token: unauthorized");
            Err("Unauthorized")
        }
        Err(crate::auth::Denied::Unavailable(reason)) => {
            tracing::error!(%reason, "a tenant's identity could not be read");
            Err("the tenant's identity is unavailable")
        }
        Err(denied) => {
            tracing::info!(reason = %denied, "denied");
            Ok(policy("anonymous", "Deny"))
        }
    }
}
