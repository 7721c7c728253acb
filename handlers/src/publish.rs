//! Publishing from a backend: "order shipped" into a room, without a WebSocket.
//!
//! A publish writes the same message record a client's `sendMessage` writes (sender connection
//! empty), so the processor delivers it like any other message, tenant plugins included. The
//! `publish` Lambda serves it three ways (README, "Publishing from a backend"):
//!
//! * its function URL, `AuthType: AWS_IAM`: the operator's backends, SigV4-signed, any tenant;
//! * an HTTP API route without an authorizer: a tenant's backend, with an HS256 token (the
//!   `$connect` secret) whose `scope` includes `publish`, into its own tenant only;
//! * a direct invoke (`lambda:InvokeFunction`) with the body as the event: the operator.
//!
//! `roomcast dev` serves the same HTTP API on `POST /publish` (tokens only).

use serde::Deserialize;
use serde_json::Value;

use crate::model::{Clock, IdempotencyRecord, Message, Name, parse_idempotency_key};
use crate::protocol::{ChatMessage, MAX_MESSAGE_FRAME_BYTES, ServerMessage};
use crate::store::Store;

/// The user a published message is from when the request names none.
pub const DEFAULT_PUBLISHER: &str = "backend";

/// What a backend sends.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub tenant: String,
    pub room: String,
    pub message: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Who is publishing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// IAM-authorized (the function URL) or a direct invoke: any tenant.
    Operator,
    /// A tenant's backend, by its token with the `publish` scope: that tenant only.
    Tenant(String),
    /// A tenant's backend, by its token with the `users` scope: that tenant only, publishing and
    /// acting on its users ([`crate::users`]).
    TenantUsers(String),
}

impl Caller {
    /// The tenant a token's caller is held to (`None`: the operator, any tenant).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Caller::Operator => None,
            Caller::Tenant(tenant) | Caller::TenantUsers(tenant) => Some(tenant),
        }
    }
}

/// A refusal, as an HTTP status and a reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct PublishError {
    pub status: u16,
    pub message: String,
    /// With 429: when to try again.
    pub retry_after_ms: Option<u64>,
}

fn refuse(status: u16, message: impl Into<String>) -> PublishError {
    PublishError { status, message: message.into(), retry_after_ms: None }
}

/// What a publish needs.
#[derive(Clone)]
pub struct PublishDeps {
    pub store: std::sync::Arc<dyn Store>,
    pub clock: std::sync::Arc<dyn Clock>,
    pub history_ttl_seconds: i64,
    pub idempotency_window_seconds: i64,
    /// A tenant's backend counts against its tenant's message limits (per publishing user and
    /// per tenant; [`crate::limits`]); the operator's publishes do not.
    pub limits: crate::limits::Limiter,
}

/// A user id a backend names (`field`): 1 to 128 bytes, without `#` (the table's key separator)
/// or control characters.
pub fn check_user_id(field: &str, user_id: &str) -> Result<(), PublishError> {
    if user_id.is_empty()
        || user_id.len() > crate::auth::MAX_USER_ID_BYTES
        || user_id.chars().any(|c| c == '#' || c.is_control())
    {
        return Err(refuse(
            400,
            format!("{field} must be 1 to {} bytes, without '#' or control characters", crate::auth::MAX_USER_ID_BYTES),
        ));
    }
    Ok(())
}

/// A tenant's backend counts against its tenant's message limits, per `user_id` and per tenant
/// ([`crate::limits`]): 429 with when to try again past them. The operator's requests do not.
pub async fn within_message_limits(
    deps: &PublishDeps,
    caller: &Caller,
    tenant: &str,
    user_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(), PublishError> {
    if caller.tenant().is_none() {
        return Ok(());
    }
    let op = crate::limits::Operation::Message;
    let limited = deps
        .limits
        .check(deps.store.as_ref(), op, tenant, user_id, None, now)
        .await
        .map_err(|e| refuse(503, e.to_string()))?;
    match limited {
        Some(limited) => {
            Err(PublishError { status: 429, message: limited.message(), retry_after_ms: Some(limited.retry_after_ms) })
        }
        None => Ok(()),
    }
}

/// Validates and writes one publish; answers the message's id (the first one's, for a repeated
/// idempotency key). Nothing is written for a refusal.
pub async fn publish(deps: &PublishDeps, caller: &Caller, body: &[u8]) -> Result<String, PublishError> {
    let request: PublishRequest = serde_json::from_slice(body).map_err(|e| {
        refuse(400, format!("the body must be JSON {{tenant, room, message, user_id?, idempotency_key?}}: {e}"))
    })?;
    let tenant = Name::parse("tenant", &request.tenant).map_err(|e| refuse(400, e))?;
    if let Some(allowed) = caller.tenant()
        && allowed != request.tenant
    {
        return Err(refuse(403, format!("this token publishes into tenant {allowed} only")));
    }
    let room = Name::parse("room", &request.room).map_err(|e| refuse(400, e))?;
    if request.message.is_empty() {
        return Err(refuse(400, "message is empty"));
    }
    let user_id = request.user_id.as_deref().unwrap_or(DEFAULT_PUBLISHER);
    check_user_id("user_id", user_id)?;
    let key = request.idempotency_key.as_deref().map(parse_idempotency_key).transpose().map_err(|e| refuse(400, e))?;
    let now = deps.clock.now();
    within_message_limits(deps, caller, tenant.as_str(), user_id, now).await?;
    let message =
        Message::published(tenant.as_str(), room.as_str(), user_id, request.message, now, deps.history_ttl_seconds);
    let size = ServerMessage::Message(ChatMessage::from(&message)).to_json().len();
    if size > MAX_MESSAGE_FRAME_BYTES {
        return Err(refuse(
            413,
            format!("the message would reach its recipients as {size} bytes; the limit is {MAX_MESSAGE_FRAME_BYTES}"),
        ));
    }
    match key {
        Some(key) => {
            let record = IdempotencyRecord::new(&message, &key, now, deps.idempotency_window_seconds);
            let standing =
                deps.store.put_message_once(&message, &record, now).await.map_err(|e| refuse(503, e.to_string()))?;
            if (standing.room.as_str(), standing.body.as_str(), standing.user_id.as_str())
                != (message.room.as_str(), message.body.as_str(), message.user_id.as_str())
            {
                return Err(refuse(
                    409,
                    format!("idempotency_key {key:?} was used for another message within the window"),
                ));
            }
            Ok(standing.id)
        }
        None => {
            deps.store.put_message(&message).await.map(|()| message.id.clone()).map_err(|e| refuse(503, e.to_string()))
        }
    }
}

/// Who an HTTP request (API Gateway HTTP API or function URL, payload 2.0) is from: IAM when
/// AWS authorized it, else a bearer token with the `publish` scope, checked against `secret`.
pub fn caller_of(event: &Value, secret: &[u8], now: i64) -> Result<Caller, PublishError> {
    if event.pointer("/requestContext/authorizer/iam").is_some_and(|iam| !iam.is_null()) {
        return Ok(Caller::Operator);
    }
    let headers = event.get("headers").and_then(Value::as_object);
    let token = headers
        .and_then(|h| h.iter().find(|(name, _)| name.eq_ignore_ascii_case("authorization")))
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default();
    let claims =
        crate::auth::verify(token, secret, now).map_err(|denied| refuse(denied.status(), denied.to_string()))?;
    let has = |wanted: &str| claims.scope.as_deref().is_some_and(|scope| scope.split_whitespace().any(|s| s == wanted));
    match (has("users"), has("publish")) {
        (true, _) => Ok(Caller::TenantUsers(claims.tenant)),
        (false, true) => Ok(Caller::Tenant(claims.tenant)),
        (false, false) => Err(refuse(403, "this token has no `publish` scope")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Claims, mint};
    use crate::model::ManualClock;
    use crate::store::memory::MemoryStore;
    use serde_json::json;
    use std::sync::Arc;

    const SECRET: &[u8] = b"publish-secret";

    fn deps() -> (PublishDeps, Arc<MemoryStore>) {
        let clock = ManualClock::starting_now();
        let store = MemoryStore::new(clock.clone());
        let deps = PublishDeps {
            store: store.clone(),
            clock,
            history_ttl_seconds: 3600,
            idempotency_window_seconds: 300,
            limits: Default::default(),
        };
        (deps, store)
    }

    fn token(tenant: &str, scope: Option<&str>) -> String {
        let claims = Claims {
            tenant: tenant.into(),
            sub: "b".into(),
            exp: i64::MAX / 2,
            nbf: None,
            scope: scope.map(Into::into),
            rooms: None,
            extra: Default::default(),
        };
        format!("Bearer {}", mint(&claims, SECRET))
    }

    #[test]
    fn the_caller_is_iam_or_a_token_with_the_publish_scope() {
        let iam = json!({"requestContext": {"authorizer": {"iam": {"accessKey": "AKIA", "userArn": "arn:x"}}}});
        assert_eq!(caller_of(&iam, SECRET, 0), Ok(Caller::Operator));
        let with = |auth: String| json!({"requestContext": {}, "headers": {"Authorization": auth}});
        assert_eq!(caller_of(&with(token("acme", Some("read publish"))), SECRET, 0), Ok(Caller::Tenant("acme".into())));
        assert_eq!(caller_of(&with(token("acme", None)), SECRET, 0).unwrap_err().status, 403, "a connect token");
        assert_eq!(caller_of(&with(token("acme", Some("publisher"))), SECRET, 0).unwrap_err().status, 403);
        assert_eq!(caller_of(&json!({"requestContext": {}, "headers": {}}), SECRET, 0).unwrap_err().status, 401);
        let forged = format!(
            "Bearer {}",
            mint(
                &Claims {
                    tenant: "acme".into(),
                    sub: "b".into(),
                    exp: i64::MAX / 2,
                    nbf: None,
                    scope: Some("publish".into()),
                    rooms: None,
                    extra: Default::default(),
                },
                b"other"
            )
        );
        assert_eq!(caller_of(&with(forged), SECRET, 0).unwrap_err().status, 403);
    }

    #[tokio::test]
    async fn bad_requests_get_a_clear_status_and_write_nothing() {
        let (deps, store) = deps();
        let tenant = Caller::Tenant("acme".into());
        for (body, status, says) in [
            ("not json".to_string(), 400, "must be JSON"),
            (json!({"tenant":"acme","room":"general"}).to_string(), 400, "message"),
            (json!({"tenant":"acme","room":"general","message":"x","colour":"red"}).to_string(), 400, "colour"),
            (json!({"tenant":"globex","room":"general","message":"x"}).to_string(), 403, "tenant acme only"),
            (json!({"tenant":"acme","room":"a#b","message":"x"}).to_string(), 400, "room"),
            (
                json!({"tenant":"acme","room":"general","message":"x","idempotency_key":"a b"}).to_string(),
                400,
                "idempotency_key",
            ),
            (json!({"tenant":"acme","room":"general","message":"x","user_id":"a#b"}).to_string(), 400, "user_id"),
            (json!({"tenant":"acme","room":"general","message":""}).to_string(), 400, "empty"),
            (
                json!({"tenant":"acme","room":"general","message":"x".repeat(MAX_MESSAGE_FRAME_BYTES)}).to_string(),
                413,
                "limit",
            ),
        ] {
            let refused = publish(&deps, &tenant, body.as_bytes()).await.unwrap_err();
            assert_eq!(refused.status, status, "{body:.80}: {refused}");
            assert!(refused.message.contains(says), "{refused}");
        }
        assert_eq!(store.item_count(), 0, "nothing written");

        let body =
            json!({"tenant":"acme","room":"general","message":"order shipped","idempotency_key":"o-1"}).to_string();
        let id = publish(&deps, &tenant, body.as_bytes()).await.unwrap();
        assert_eq!(publish(&deps, &Caller::Operator, body.as_bytes()).await.unwrap(), id, "the same key, the same id");
        let sk = crate::model::message_sk_of_id(&id).unwrap();
        let message = deps.store.message("acme", "general", &sk, deps.clock.now()).await.unwrap().unwrap();
        assert_eq!((message.user_id.as_str(), message.sender_connection_id.as_str()), (DEFAULT_PUBLISHER, ""));
    }
}
