//! Acting on a user from the tenant's backend: what Pusher calls `terminateUserConnections` and
//! Socket.IO `disconnectSockets`. Served by the publish function (its function URL for the
//! operator, the HTTP API route for a tenant's publish token, a direct invoke), by
//! `roomcast user`, and by `roomcast dev`'s `POST /publish`: a body with an `action`.
//!
//! | `action` | fields | answer |
//! |---|---|---|
//! | `disconnect_user` | `tenant`, `user_id`, `refuse_until?` (RFC 3339) | `{"disconnected": n, "refused_until"?}` |
//! | `join_user` | `tenant`, `user_id`, `room` | `{"connections", "joined", "pending", "denied"}` |
//! | `leave_user` | `tenant`, `user_id`, `room` | `{"connections", "left"}` |
//! | `send_to_user` | `tenant`, `user_id`, `message`, `from?` | `{"id", "connections", "found"?}` (`id` null for none; `found` when more than 1,000) |
//!
//! `send_to_user` reaches every connection the user has, in any room or none: the processor
//! sends each a `user_message` frame (`id`, `from`, `message`, `timestamp`). The connections are
//! the ones open when it is written (a user with none gets nothing, and nothing is written); it
//! is not kept for history or recovery, and the tenant's plugin does not see it. A tenant's
//! token counts it against the tenant's message limits, the per-user one as the recipient's. A
//! retried request is a second message (a new id): it has no idempotency key yet.
//!
//! `join_user` joins each of the user's connections as its own `join` would, under the same
//! rules — the token's `rooms` claim, the tenant's plugin deciding joins (then `pending`), the
//! room limit — and the processor tells each connection with an `ack` for the room (its client
//! learns it is in it) and the room with `joined` (reason `server`); `leave_user` is `leave` on
//! each.
//!
//! As everywhere on the write path, nothing is pushed from here: each of the user's connection
//! records is deleted with `closeReason: terminated`, and the processor, seeing the REMOVE,
//! sends the connection a `terminated` error, closes its socket (`DELETE @connections`) and
//! announces it `left` (reason `terminated`) in its rooms. With `refuse_until`, the tenant's
//! identity keeps the user refused until then: `$connect` and `refresh` refuse their tokens
//! (`Denied::Revoked`), whatever their `iat`.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::model::{LeftReason, Name};
use crate::protocol::ServerMessage;
use crate::publish::{Caller, PublishDeps, PublishError};

/// The most a user can be refused for at once: a year.
pub const MAX_REFUSAL_SECONDS: i64 = 365 * 86_400;

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum UserRequest {
    DisconnectUser {
        tenant: String,
        user_id: String,
        #[serde(default)]
        refuse_until: Option<String>,
    },
    JoinUser {
        tenant: String,
        user_id: String,
        room: String,
    },
    LeaveUser {
        tenant: String,
        user_id: String,
        room: String,
    },
    SendToUser {
        tenant: String,
        user_id: String,
        message: String,
        #[serde(default)]
        from: Option<String>,
    },
}

impl UserRequest {
    fn who(&self) -> (&str, &str) {
        match self {
            UserRequest::DisconnectUser { tenant, user_id, .. }
            | UserRequest::JoinUser { tenant, user_id, .. }
            | UserRequest::LeaveUser { tenant, user_id, .. }
            | UserRequest::SendToUser { tenant, user_id, .. } => (tenant, user_id),
        }
    }
}

fn refuse(status: u16, message: impl Into<String>) -> PublishError {
    PublishError { status, message: message.into(), retry_after_ms: None }
}

/// Whether a request body asks for a user operation (it names an `action`).
pub fn is_user_request(body: &Value) -> bool {
    body.get("action").is_some()
}

/// One user operation by `caller` (a tenant's token acts on its own tenant only). Nothing is
/// written for a refusal.
pub async fn act(deps: &PublishDeps, caller: &Caller, body: &[u8]) -> Result<Value, PublishError> {
    let request: UserRequest = serde_json::from_slice(body).map_err(|e| {
        refuse(
            400,
            format!(
                "a user operation is {{\"action\": \"disconnect_user\" (tenant, user_id, refuse_until?), \"join_user\" or \"leave_user\" (tenant, user_id, room), \"send_to_user\" (tenant, user_id, message, from?)}}: {e}"
            ),
        )
    })?;
    let (tenant, user_id) = request.who();
    let tenant = Name::parse("tenant", tenant).map_err(|e| refuse(400, e))?;
    // Acting on users takes a token with the `users` scope: a publish token (which a shop's
    // backend may hold) cannot sign users out or move them.
    if let Caller::Tenant(_) = caller {
        return Err(refuse(403, "acting on users takes a token with the `users` scope (this one has `publish`)"));
    }
    if let Some(allowed) = caller.tenant()
        && allowed != tenant.as_str()
    {
        return Err(refuse(403, format!("this token acts on tenant {allowed} only")));
    }
    crate::publish::check_user_id("user_id", user_id)?;
    let now = deps.clock.now();
    let unavailable = |e: crate::store::StoreError| refuse(503, e.to_string());
    match &request {
        UserRequest::SendToUser { user_id, message, from, .. } => {
            send_to_user(deps, caller, tenant.as_str(), user_id, message, from.as_deref()).await
        }
        UserRequest::JoinUser { user_id, room, .. } | UserRequest::LeaveUser { user_id, room, .. } => {
            Name::parse("room", room).map_err(|e| refuse(400, e))?;
            let joining = matches!(request, UserRequest::JoinUser { .. });
            let connections = deps.store.user_connections(tenant.as_str(), user_id, now).await.map_err(unavailable)?;
            let joins = crate::handlers::JoinRules::default();
            let (mut done, mut pending, mut denied) = (0, 0, 0);
            for conn in &connections {
                let answer = match joining {
                    true => {
                        let reason = crate::model::JoinReason::Server;
                        crate::handlers::join_as(conn, deps.store.as_ref(), &joins, now, room.clone(), reason).await
                    }
                    false => {
                        // Marked first, so the membership's REMOVE (the leave's own transaction,
                        // which also drops the room from the connection) says the backend did it:
                        // the processor tells the connection, whose client then forgets the room.
                        if conn.rooms.contains(room.as_str()) || conn.pending_rooms.contains(room.as_str()) {
                            let (tenant, id) = (conn.tenant.as_str(), conn.connection_id.as_str());
                            // A membership gone meanwhile is not marked (the mark is conditional).
                            deps.store.mark_left(tenant, room, id, LeftReason::Server).await.map_err(unavailable)?;
                        }
                        crate::handlers::leave_as(conn, deps.store.as_ref(), room.clone()).await
                    }
                };
                match answer {
                    Ok(ServerMessage::Ack { pending: Some(true), .. }) => pending += 1,
                    Ok(ServerMessage::Ack { .. }) => done += 1,
                    Ok(ServerMessage::JoinDenied { .. }) => denied += 1,
                    Ok(_) => {}
                    // Not in the room (a leave), over the room limit, gone meanwhile: not this one.
                    Err(crate::handlers::Failure::Client(e)) => {
                        tracing::info!(connection_id = %conn.connection_id, reason = %e.message, "user operation: skipped");
                    }
                    Err(crate::handlers::Failure::Platform(e)) => return Err(unavailable(e)),
                }
            }
            tracing::info!(tenant = %tenant, user_id, room, joining, connections = connections.len(), done, "user operation");
            Ok(match joining {
                true => {
                    json!({ "connections": connections.len(), "joined": done, "pending": pending, "denied": denied })
                }
                false => json!({ "connections": connections.len(), "left": done }),
            })
        }
        UserRequest::DisconnectUser { user_id, refuse_until, .. } => {
            let until = match refuse_until.as_deref() {
                None => None,
                Some(text) => {
                    let at = chrono::DateTime::parse_from_rfc3339(text)
                        .map_err(|e| refuse(400, format!("refuse_until {text:?} is not an RFC 3339 time: {e}")))?
                        .timestamp();
                    if at <= now.timestamp() || at > now.timestamp() + MAX_REFUSAL_SECONDS {
                        return Err(refuse(400, "refuse_until must be in the future, within a year"));
                    }
                    Some(at)
                }
            };
            // The tenant's identity stays small (every authorizer reads it): a bounded number
            // of refusals standing at once.
            if until.is_some() {
                let identity = deps.store.tenant_identity(tenant.as_str()).await.map_err(unavailable)?;
                let standing = identity.map_or(0, |id| {
                    id.users_refused_until.iter().filter(|(u, end)| *u != user_id && **end > now.timestamp()).count()
                });
                if standing >= crate::model::MAX_REVOKED_USERS {
                    let most = crate::model::MAX_REVOKED_USERS;
                    return Err(refuse(
                        409,
                        format!("{standing} users of this tenant are refused already: at most {most}"),
                    ));
                }
            }
            let disconnected =
                disconnect_user(deps, tenant.as_str(), user_id, until).await.map_err(|e| refuse(503, e.to_string()))?;
            let mut answer = json!({ "disconnected": disconnected });
            if let Some(until) = until.and_then(|at| chrono::DateTime::from_timestamp(at, 0)) {
                answer["refused_until"] = json!(crate::model::format_ts(&until));
            }
            Ok(answer)
        }
    }
}

/// Writes one message to every connection `user_id` has now (nothing when none); answers its id
/// and how many connections it names.
async fn send_to_user(
    deps: &PublishDeps,
    caller: &Caller,
    tenant: &str,
    user_id: &str,
    message: &str,
    from: Option<&str>,
) -> Result<Value, PublishError> {
    let from = from.unwrap_or(crate::publish::DEFAULT_PUBLISHER);
    crate::publish::check_user_id("from", from)?;
    let now = deps.clock.now();
    // Counted against the user it goes to (and the tenant): a `from` of the backend's choosing
    // must not open a way around the per-user limit onto one person's tabs.
    crate::publish::within_message_limits(deps, caller, tenant, user_id, now).await?;
    let connections =
        deps.store.user_connections(tenant, user_id, now).await.map_err(|e| refuse(503, e.to_string()))?;
    let record = crate::model::UserMessage::new(tenant, user_id, from, message.to_string(), &connections, now);
    let frame = ServerMessage::UserMessage {
        id: record.id.clone(),
        from: record.from.clone(),
        message: record.body.clone(),
        timestamp: crate::model::format_ts(&now),
    };
    let size = frame.to_json().len();
    if size > crate::protocol::MAX_MESSAGE_FRAME_BYTES {
        let most = crate::protocol::MAX_MESSAGE_FRAME_BYTES;
        return Err(refuse(413, format!("the message would reach the user as {size} bytes; the limit is {most}")));
    }
    if record.recipients.is_empty() {
        tracing::info!(tenant, user_id, "send to user: no connection");
        return Ok(json!({ "id": null, "connections": 0 }));
    }
    deps.store.put_user_message(&record).await.map_err(|e| refuse(503, e.to_string()))?;
    let (named, found) = (record.recipients.len(), connections.len());
    tracing::info!(tenant, user_id, id = %record.id, connections = named, found, "send to user");
    let mut answer = json!({ "id": record.id, "connections": named });
    if found > named {
        // More connections than one record names: the first ones by id get it.
        answer["found"] = json!(found);
    }
    Ok(answer)
}

/// Keeps the user refused until `until` (if given), then closes each of their connections;
/// the number closed. The refusal is written first, so a reconnect racing the close is refused
/// (by an authorizer container whose view of the tenant's identity is fresh: up to 30 s old).
pub async fn disconnect_user(
    deps: &PublishDeps,
    tenant: &str,
    user_id: &str,
    until: Option<i64>,
) -> Result<usize, crate::store::StoreError> {
    let now = deps.clock.now();
    if let Some(until) = until {
        let mut identity =
            deps.store.tenant_identity(tenant).await?.unwrap_or_else(|| crate::model::TenantIdentity::new(tenant));
        identity.refuse_user(user_id, until, now.timestamp());
        deps.store.put_tenant_identity(&identity).await?;
    }
    let connections = deps.store.user_connections(tenant, user_id, now).await?;
    let mut closed = 0;
    for conn in &connections {
        if deps.store.delete_connection(&conn.connection_id, Some(LeftReason::Terminated)).await?.is_some() {
            closed += 1;
        }
    }
    tracing::info!(tenant, user_id, closed, refused_until = until, "user disconnected");
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ManualClock, Name, NewConnection};
    use crate::store::ConnectionStore;
    use crate::store::memory::MemoryStore;
    use std::sync::Arc;

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

    async fn send(deps: &PublishDeps, body: Value) -> Result<Value, PublishError> {
        act(deps, &Caller::TenantUsers("acme".into()), body.to_string().as_bytes()).await
    }

    #[tokio::test]
    async fn a_message_to_a_user_is_one_record_naming_their_connections_and_bad_ones_write_nothing() {
        let (deps, store) = deps();
        let to = |user: &str, from: &str| json!({"action": "send_to_user", "tenant": "acme", "user_id": user, "message": "paid", "from": from});
        for (body, status) in [
            (to("ann", "acme#admin"), 400),
            (to("ann", "bill\ning"), 400),
            (to("an\u{7}n", "billing"), 400),
            (to("", "billing"), 400),
            (json!({"action": "send_to_user", "tenant": "globex", "user_id": "ann", "message": "x"}), 403),
            (json!({"action": "send_to_user", "tenant": "acme", "user_id": "ann"}), 400),
        ] {
            let refused = send(&deps, body.clone()).await.unwrap_err();
            assert_eq!(refused.status, status, "{body}: {refused}");
        }
        assert_eq!(send(&deps, to("ann", "billing")).await.unwrap(), json!({"id": null, "connections": 0}));
        assert_eq!(store.item_count(), 0, "nothing written, a user without connections included");

        let tenant = Name::parse("tenant", "acme").unwrap();
        for id in ["c2", "c1"] {
            let conn = crate::model::Connection::new(NewConnection {
                connection_id: id,
                tenant: &tenant,
                user_id: "ann",
                connection_type: None,
                deployment_id: None,
                rooms: Default::default(),
                endpoint: format!("https://gw/{id}"),
                now: deps.clock.now(),
                ttl_seconds: 600,
            });
            store.put_connection(&conn, &[]).await.unwrap();
        }
        let before = store.item_count();
        let sent = send(&deps, to("ann", "billing")).await.unwrap();
        assert_eq!(sent["connections"], 2, "{sent}");
        assert!(sent.get("found").is_none(), "all of them named: {sent}");
        assert_eq!(store.item_count(), before + 1, "one record");
    }
}
