//! One client frame on an open connection: what each request reads and writes, and its answer
//! (one function per request, as the frame's `action` names it).

use super::*;

pub(super) async fn act(
    request: Request,
    conn: &Connection,
    deps: &HandlerDeps,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<ServerMessage, Failure> {
    Ok(match request {
        Request::SendMessage { room, message, idempotency_key } => {
            send_message(conn, deps, now, room, message, idempotency_key).await?
        }
        Request::Join { room } => join_as(conn, deps.store.as_ref(), &deps.joins, now, room, JoinReason::Join).await?,
        Request::Leave { room } => leave_as(conn, deps.store.as_ref(), room).await?,
        Request::Ping => {
            deps.store.touch(conn, now, expiry(now, deps.connection_ttl_seconds)).await?;
            ServerMessage::Pong
        }
        Request::Info => ServerMessage::Info {
            connection_id: conn.connection_id.clone(),
            tenant: conn.tenant.clone(),
            user_id: conn.user_id.clone(),
            rooms: conn.rooms.iter().filter(|r| conn.in_room(r)).cloned().collect(),
            connected_at: format_ts(&conn.connected_at),
            deployment_id: conn.deployment_id.clone(),
            connection_type: conn.connection_type.clone(),
        },
        Request::Echo { data } => ServerMessage::Echo { data },
        Request::History { room, limit, from } => history(conn, deps, now, room, limit, from).await?,
        Request::Recover { room, since } => recover(conn, deps, now, room, since).await?,
        Request::Signal { room, data } => signal(conn, deps, now, room, data).await?,
        Request::Who { room, limit, after } => who(conn, deps, room, limit, after).await?,
        Request::Refresh { token } => refresh(conn, deps, now, &token).await?,
    })
}

/// Replaces the connection's token (its claims and expiry) with `token`, checked as the
/// `$connect` authorizer checks one: the same tenant's key, and the same user (a refresh cannot
/// change whose connection it is). A token that does not pass changes nothing.
async fn refresh(
    conn: &Connection,
    deps: &HandlerDeps,
    now: chrono::DateTime<chrono::Utc>,
    token: &str,
) -> Result<ServerMessage, Failure> {
    let refused = |why: String| Failure::Client(FrameError::new(ErrorCode::Unauthorized, why));
    let Some(verifier) = deps.verifier.as_ref() else {
        return Err(refused("this deployment checks no tokens after $connect".into()));
    };
    let claims = verifier
        .verify_connect(token, Some(&conn.tenant), now.timestamp())
        .await
        .map_err(|denied| refused(format!("the token was refused: {denied}")))?;
    if claims.tenant != conn.tenant || claims.sub != conn.user_id {
        return Err(refused(format!(
            "the token is for {}/{}, this connection is {}/{}: a refresh keeps the connection's tenant and user",
            claims.tenant, claims.sub, conn.tenant, conn.user_id
        )));
    }
    let kept = super::kept_claims(&crate::auth::context(&claims)).map_err(refused)?;
    if !deps.store.set_claims(&conn.connection_id, &kept).await? {
        return Err(Failure::Client(FrameError::new(
            ErrorCode::NotConnected,
            "this connection has no record; reconnect",
        )));
    }
    tracing::info!(connection_id = %conn.connection_id, exp = claims.exp, "token refreshed");
    let expires_at = chrono::DateTime::from_timestamp(claims.exp, 0).map(|at| format_ts(&at));
    Ok(ServerMessage::Refreshed { expires_at })
}

/// Sends a message into a room: written once (per idempotency key), acknowledged with its id.
async fn send_message(
    conn: &Connection,
    deps: &HandlerDeps,
    now: chrono::DateTime<chrono::Utc>,
    room: String,
    message: String,
    idempotency_key: Option<String>,
) -> Result<ServerMessage, Failure> {
    let store = &deps.store;
    let room = room_name(&room)?;
    member_of(conn, room.as_str())?;
    let message = Message::new(conn, room.as_str(), message, now, deps.history_ttl_seconds);
    // What every recipient will get must fit API Gateway's frame limit: refuse it here,
    // not with a 413 from every recipient after it was acknowledged. (It then also fits
    // a tenant plugin's input, which counts the same fields unescaped.)
    let outgoing = ServerMessage::Message(crate::protocol::ChatMessage::from(&message)).to_json().len();
    if outgoing > crate::protocol::MAX_MESSAGE_FRAME_BYTES {
        return Err(Failure::Client(FrameError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "the message would reach its recipients as {outgoing} bytes; the limit is {}",
                crate::protocol::MAX_MESSAGE_FRAME_BYTES
            ),
        )));
    }
    let id = match idempotency_key {
        Some(key) => {
            let record = IdempotencyRecord::new(&message, &key, now, deps.idempotency_window_seconds);
            let standing = store.put_message_once(&message, &record, now).await?;
            if (standing.room.as_str(), standing.body.as_str()) != (message.room.as_str(), message.body.as_str()) {
                return Err(Failure::Client(FrameError::new(
                    ErrorCode::InvalidRequest,
                    format!("idempotency_key {key:?} was used for another message within the window"),
                )));
            }
            standing.id
        }
        None => {
            store.put_message(&message).await?;
            message.id.clone()
        }
    };
    Ok(ServerMessage::ack("sendMessage", &message.room, Some(id)))
}

/// Joins a room: the membership written (or left pending for the room's rules), acknowledged with
/// who is there. `reason`: the connection's own `join`, or its tenant's backend's (`join_user`),
/// under the same rules (the token's `rooms` claim, the tenant's plugin, the room limit).
pub(crate) async fn join_as(
    conn: &Connection,
    store: &dyn crate::store::Store,
    joins: &JoinRules,
    now: chrono::DateTime<chrono::Utc>,
    room: String,
    reason: JoinReason,
) -> Result<ServerMessage, Failure> {
    let room = room_name(&room)?;
    // `$connect` refused a connection whose claim does not parse, so this one does.
    if let Some(patterns) = room_patterns(&conn.claims).ok().flatten()
        && !crate::auth::room_allowed(&patterns, room.as_str())
    {
        return Ok(ServerMessage::JoinDenied { room: room.to_string(), reason: not_in_claim(room.as_str()) });
    }
    if conn.pending_rooms.contains(room.as_str()) {
        return Ok(ServerMessage::pending_join(room.as_str()));
    }
    if !conn.rooms.contains(room.as_str()) {
        if conn.rooms.len() >= MAX_ROOMS_PER_CONNECTION {
            return Err(Failure::Client(FrameError::new(
                ErrorCode::InvalidRequest,
                format!("at most {MAX_ROOMS_PER_CONNECTION} rooms per connection"),
            )));
        }
        // A connection opened before its tenant's plugin decided joins learns it here.
        let mut conn = conn.clone();
        if !conn.authorize_joins && joins.decided(store, &conn.tenant).await? {
            conn.authorize_joins = true;
        }
        let membership = conn.membership(room.as_str(), reason, now);
        // `false`: another frame's join of this room was written first (frames of one
        // connection run concurrently); its answer stands for this one too.
        if !store.join(&membership).await? {
            tracing::debug!(connection_id = %conn.connection_id, room = %room, "a concurrent join of this room was written first");
        }
        if membership.pending == Some(true) {
            // The processor asks the tenant's rules; its answer is the real `ack` (with
            // the room's users) or `join_denied`.
            return Ok(ServerMessage::pending_join(room.as_str()));
        }
    }
    // A snapshot of who is here, so the client's roster starts whole; the `joined` and
    // `left` events that follow keep it current.
    let page = store.who(&conn.tenant, room.as_str(), crate::presence::JOIN_ACK_MEMBERS, None).await?;
    Ok(ServerMessage::Ack {
        request: "join".into(),
        room: room.to_string(),
        id: None,
        users: Some(page.total),
        members: Some(crate::protocol::present_users(&page)),
        pending: None,
    })
}

/// Leaves a room (or a join still pending).
pub(crate) async fn leave_as(
    conn: &Connection,
    store: &dyn crate::store::Store,
    room: String,
) -> Result<ServerMessage, Failure> {
    let room = room_name(&room)?;
    // A join still waiting for the room's rules can be left too.
    if !conn.rooms.contains(room.as_str()) {
        member_of(conn, room.as_str())?;
    }
    store.leave(&conn.connection_id, &conn.tenant, room.as_str()).await?;
    Ok(ServerMessage::ack("leave", room.as_str(), None))
}

/// A page of a room's history, as fits in one frame.
async fn history(
    conn: &Connection,
    deps: &HandlerDeps,
    now: chrono::DateTime<chrono::Utc>,
    room: String,
    limit: usize,
    from: HistoryFrom,
) -> Result<ServerMessage, Failure> {
    let store = &deps.store;
    let room = room_name(&room)?;
    member_of(conn, room.as_str())?;
    let forward = matches!(from, HistoryFrom::After(_));
    // One more than asked says whether there is more.
    let (tenant, viewer, frame) = (&conn.tenant, Some(conn.user_id.as_str()), crate::protocol::MAX_OUTGOING_BYTES);
    let found = store.history_page(tenant, room.as_str(), &from, limit + 1, now, viewer, frame).await?;
    let (messages, next) = fit_in_a_frame(room.as_str(), found, limit, forward);
    Ok(ServerMessage::History { room: room.to_string(), messages, next })
}

/// The messages since one the client saw, or why they cannot all be given.
async fn recover(
    conn: &Connection,
    deps: &HandlerDeps,
    now: chrono::DateTime<chrono::Utc>,
    room: String,
    since: String,
) -> Result<ServerMessage, Failure> {
    let store = &deps.store;
    let room = room_name(&room)?;
    member_of(conn, room.as_str())?;
    let sk = crate::model::message_sk_of_id(&since).unwrap_or_default();
    Ok(if let Some(seen) = store.message(&conn.tenant, room.as_str(), &sk, now).await? {
        let from = crate::store::recovery_start(&seen);
        let (limit, frame) = (MAX_HISTORY_LIMIT + 2, crate::protocol::MAX_OUTGOING_BYTES);
        let read =
            store.history_page(&conn.tenant, room.as_str(), &from, limit, now, Some(&conn.user_id), frame).await?;
        // The read stopped on the frame's budget, which counted `seen` too: what is left
        // may all fit, yet there may be more after it.
        let stopped_on_budget =
            read.iter().map(|m| m.delivered_body.as_ref().unwrap_or(&m.body).len()).sum::<usize>() > frame;
        let found: Vec<Message> = read.into_iter().filter(|m| m.id != seen.id).collect();
        let last = found.last().map(|m| m.sk.clone());
        let (messages, next) = fit_in_a_frame(room.as_str(), found, MAX_HISTORY_LIMIT, true);
        let next = next.or(last.filter(|_| stopped_on_budget));
        ServerMessage::Recover { room: room.to_string(), recovered: true, messages, next, reason: None }
    } else {
        ServerMessage::Recover {
            room: room.to_string(),
            recovered: false,
            messages: Vec::new(),
            next: None,
            reason: Some("that message is no longer in history: reload the room".into()),
        }
    })
}

/// A signal to a room's members: written, never kept in history.
async fn signal(
    conn: &Connection,
    deps: &HandlerDeps,
    now: chrono::DateTime<chrono::Utc>,
    room: String,
    data: Value,
) -> Result<ServerMessage, Failure> {
    let store = &deps.store;
    let room = room_name(&room)?;
    member_of(conn, room.as_str())?;
    let signal = crate::model::Signal::new(conn, room.as_str(), data.to_string(), now);
    store.put_signal(&signal).await?;
    Ok(ServerMessage::ack("signal", room.as_str(), Some(signal.id)))
}

/// A page of who is in a room.
async fn who(
    conn: &Connection,
    deps: &HandlerDeps,
    room: String,
    limit: usize,
    after: Option<String>,
) -> Result<ServerMessage, Failure> {
    let store = &deps.store;
    let room = room_name(&room)?;
    member_of(conn, room.as_str())?;
    let page = store.who(&conn.tenant, room.as_str(), limit, after.as_deref()).await?;
    Ok(ServerMessage::Who {
        room: room.to_string(),
        users: crate::protocol::present_users(&page),
        total: page.total,
        next: page.next,
    })
}

/// At most `limit` of `found` (oldest first; one more than `limit` means there is more) whose
/// frame fits API Gateway's 128 KB, keeping those nearest the cursor: the oldest when paging
/// forward, the newest otherwise. `next` is the cursor for the page after: the sort key of the
/// last message kept in the direction of travel, when anything was left out (a key, not an id:
/// ids of messages written before ids carried their time do not give their key).
fn fit_in_a_frame(room: &str, found: Vec<Message>, limit: usize, forward: bool) -> (Vec<ChatMessage>, Option<String>) {
    let total = found.len();
    let mut order: Vec<Message> = found;
    if !forward {
        order.reverse(); // nearest the cursor first: the newest
    }
    // The frame around the messages, with the longest `next` a page can carry.
    // (`recover`'s frame is the larger of the two.)
    let envelope = ServerMessage::Recover {
        room: room.to_string(),
        recovered: true,
        messages: Vec::new(),
        next: Some("x".repeat(96)),
        reason: None,
    }
    .to_json()
    .len();
    let mut used = envelope;
    let mut kept: Vec<ChatMessage> = Vec::new();
    let mut last_key = None;
    for message in order.into_iter().take(limit) {
        let chat = ChatMessage::from(&message);
        let size = serde_json::to_string(&chat).map_or(usize::MAX, |s| s.len()) + 1;
        if used + size > crate::protocol::MAX_OUTGOING_BYTES && !kept.is_empty() {
            break;
        }
        used += size;
        kept.push(chat);
        last_key = Some(message.sk);
    }
    let next = if kept.len() < total { last_key } else { None };
    if !forward {
        kept.reverse();
    }
    (kept, next)
}
