//! The backends' endpoint: what the `publish` and `tenant_publish` Lambdas, `roomcast dev`'s
//! `POST /publish` and the CLI take — a message into a room ([`crate::publish`]), or, when the
//! body names an `action`, an operation on a user ([`crate::users`]).

use serde_json::{Value, json};

use crate::publish::{Caller, PublishDeps, PublishError, caller_of, publish};

/// A publish (`{"id"}`), or a user operation when the body names an `action`
/// ([`crate::users`]).
async fn answer(deps: &PublishDeps, caller: &Caller, body: &[u8]) -> Result<Value, PublishError> {
    let named = serde_json::from_slice::<Value>(body).ok().is_some_and(|v| crate::users::is_user_request(&v));
    if named {
        return crate::users::act(deps, caller, body).await;
    }
    publish(deps, caller, body).await.map(|id| json!({ "id": id }))
}

/// One request as the `publish` Lambda receives it: an HTTP event (function URL or HTTP API) is
/// answered with an HTTP response; a direct invoke's event is the body itself, answered with
/// `{"id"}` or an error.
pub async fn handle(deps: &PublishDeps, event: &Value, secret: &[u8]) -> Result<Value, String> {
    if event.get("requestContext").is_none() {
        return answer(deps, &Caller::Operator, event.to_string().as_bytes()).await.map_err(|e| e.to_string());
    }
    let now = deps.clock.now().timestamp();
    let answer = match caller_of(event, secret, now) {
        Ok(caller) => {
            let body = event.get("body").and_then(Value::as_str).unwrap_or_default();
            let body = if event.get("isBase64Encoded").and_then(Value::as_bool) == Some(true) {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(body).unwrap_or_default()
            } else {
                body.as_bytes().to_vec()
            };
            answer(deps, &caller, &body).await
        }
        Err(e) => Err(e),
    };
    let (status, body) = match answer {
        Ok(body) => (200, body),
        Err(PublishError { status, message, retry_after_ms: Some(ms) }) => {
            (status, json!({ "error": message, "retry_after_ms": ms }))
        }
        Err(e) => (e.status, json!({ "error": e.message })),
    };
    if status >= 500 {
        tracing::error!(status, error = %body["error"], "publish failed");
    } else if status >= 400 {
        tracing::info!(status, error = %body["error"], "publish refused");
    }
    Ok(json!({
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": body.to_string(),
    }))
}
