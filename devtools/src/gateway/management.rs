//! The `@connections` management API, as API Gateway answers it, so that the processor's
//! `aws-sdk-apigatewaymanagement` client talks to it unchanged:
//!
//! | call   | answer |
//! |--------|--------|
//! | POST   | 200; 410 `GoneException` (unknown, or `$connect` still running); 413 `PayloadTooLargeException` over 128 KB; 429 `LimitExceededException` when the client's send buffer is full |
//! | GET    | 200 `{connectedAt, lastActiveAt, identity: {sourceIp, userAgent}}`; 410 |
//! | DELETE | 204, and the connection closes (then `$disconnect`); 410 |
//!
//! Every call first passes the account ([`super::account`]): its latency, and its quota, past
//! which it answers `429 LimitExceededException` ("Rate exceeded"). [`Faults`] make chosen calls
//! answer 410, 429, 500 or stall, for tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde_json::json;
use tokio::sync::mpsc::error::TrySendError;

use super::{Gateway, Outbound, describe};

/// What an injected fault does to a `@connections` call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer this status (410, 429, 500, …) with API Gateway's error type.
    Status(u16),
    /// Hold the call this long, then answer 504: the caller's timeout should fire first.
    Stall(Duration),
}

#[derive(Debug)]
struct Rule {
    connection_id: Option<String>,
    fault: Fault,
    remaining: usize,
}

/// Faults for the next calls: per connection, or for any connection.
#[derive(Debug, Default)]
pub struct Faults(Mutex<Vec<Rule>>);

impl Faults {
    /// The next `times` POSTs to `connection_id` (any connection, with `None`) get `fault`.
    pub fn inject(&self, connection_id: Option<&str>, fault: Fault, times: usize) {
        self.lock().push(Rule { connection_id: connection_id.map(str::to_string), fault, remaining: times });
    }

    fn take(&self, connection_id: &str) -> Option<Fault> {
        let mut rules = self.lock();
        let rule = rules
            .iter_mut()
            .find(|r| r.remaining > 0 && r.connection_id.as_deref().is_none_or(|id| id == connection_id))?;
        rule.remaining -= 1;
        let fault = rule.fault;
        rules.retain(|r| r.remaining > 0);
        Some(fault)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Rule>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn routes() -> MethodRouter<Arc<Gateway>> {
    get(get_connection).post(post_to_connection).delete(delete_connection)
}

/// An API Gateway error answer: the status, `x-amzn-ErrorType`, and `{"message": …}`.
fn error(status: u16, error_type: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, json!({ "message": message }).to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", "application/json".parse().expect("static header"));
    headers.insert("x-amzn-ErrorType", error_type.parse().unwrap_or_else(|_| "Unknown".parse().expect("static")));
    response
}

fn gone(id: &str) -> Response {
    error(410, "GoneException", &format!("connection {id} is not open"))
}

fn status_fault(status: u16) -> Response {
    let error_type = match status {
        410 => "GoneException",
        413 => "PayloadTooLargeException",
        429 => "LimitExceededException",
        403 => "ForbiddenException",
        _ => "InternalServerErrorException",
    };
    error(status, error_type, "injected fault")
}

/// The account's latency and quota, before any call is answered.
async fn through_account(gw: &Gateway) -> Result<super::account::Call<'_>, Response> {
    let (call, admitted) = gw.account.admit();
    gw.account.delay().await;
    match admitted {
        Ok(()) => Ok(call),
        Err(_) => Err(error(429, "LimitExceededException", "Rate exceeded")),
    }
}

async fn post_to_connection(State(gw): State<Arc<Gateway>>, Path(id): Path<String>, body: Bytes) -> Response {
    let _call = match through_account(&gw).await {
        Ok(call) => call,
        Err(throttled) => return throttled,
    };
    match gw.faults().take(&id) {
        Some(Fault::Status(status)) => return status_fault(status),
        Some(Fault::Stall(how_long)) => {
            tokio::time::sleep(how_long).await;
            return error(504, "InternalServerErrorException", "injected stall");
        }
        None => {}
    }
    if body.len() > gw.settings.limits.max_frame_bytes {
        return error(
            413,
            "PayloadTooLargeException",
            &format!("payload is {} bytes; the limit is {}", body.len(), gw.settings.limits.max_frame_bytes),
        );
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let sent = {
        let connections = gw.lock();
        match connections.get(&id) {
            Some(live) if live.open => live.tx.try_send(Outbound::Text(text)),
            _ => return gone(&id),
        }
    };
    match sent {
        Ok(()) => StatusCode::OK.into_response(),
        Err(TrySendError::Full(_)) => error(429, "LimitExceededException", "the client's send buffer is full"),
        Err(TrySendError::Closed(_)) => gone(&id),
    }
}

async fn get_connection(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let _call = match through_account(&gw).await {
        Ok(call) => call,
        Err(throttled) => return throttled,
    };
    match gw.lock().get(&id) {
        Some(live) if live.open => axum::Json(describe(live)).into_response(),
        _ => gone(&id),
    }
}

async fn delete_connection(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let _call = match through_account(&gw).await {
        Ok(call) => call,
        Err(throttled) => return throttled,
    };
    let connections = gw.lock();
    match connections.get(&id) {
        Some(live) if live.open => {
            let _ = live.closer.send(Some((1000, "Connection deleted via @connections".into())));
            StatusCode::NO_CONTENT.into_response()
        }
        _ => gone(&id),
    }
}
