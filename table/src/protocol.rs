//! The client protocol: JSON text frames, routed on `action` (README.md, "Protocol").
//!
//! Frames are parsed once, at the edge, into [`Request`]; everything a client can get wrong is a
//! [`FrameError`] value that becomes an `{"action":"error","code":…,"message":…}` answer.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where a page of history starts. Bounds are message sort keys (`MSG#{timestamp}#{id}`, or a
/// bare `MSG#{timestamp}` / `MSG#{timestamp}$` for a point in time), always exclusive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HistoryFrom {
    /// The newest messages.
    Latest,
    /// The newest messages below this key.
    Before(String),
    /// The oldest messages above this key.
    After(String),
}

/// One page of `who`: users in id order, each once with their connection count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WhoPage {
    pub users: Vec<(String, usize)>,
    /// Per user of `users`, in the same order: the version of their last transition (the
    /// `version` their presence frames carry), so a client drops a frame older than the page.
    pub versions: Vec<u64>,
    /// Users in the room (the room's count).
    pub total: u64,
    /// Pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

/// The most users one `who` page lists, and how many a `join` ack carries.
pub const MAX_WHO_PAGE: usize = 500;
pub const DEFAULT_WHO_PAGE: usize = 100;
pub const JOIN_ACK_MEMBERS: usize = 20;

/// API Gateway's WebSocket frame limit, and so the largest message a client can send.
pub const MAX_FRAME_BYTES: usize = 128 * 1024;

/// The largest frame `@connections` delivers (API Gateway's WebSocket message limit). A message
/// is accepted only if the frame every recipient gets — with its id, sender and time — fits.
pub const MAX_OUTGOING_BYTES: usize = 128 * 1024;

/// The largest `message` frame a `sendMessage` may make: a little under [`MAX_OUTGOING_BYTES`],
/// so that any one message also fits a `history` or `recover` page with its envelope.
pub const MAX_MESSAGE_FRAME_BYTES: usize = MAX_OUTGOING_BYTES - 512;
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
/// The largest `data` of a `signal`, as JSON.
pub const MAX_SIGNAL_BYTES: usize = 4096;
pub const MAX_HISTORY_LIMIT: usize = 100;

/// The longest `ref` a frame may carry (a client's request id, echoed on the answer).
pub const MAX_REF_BYTES: usize = 64;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    SendMessage {
        room: String,
        message: String,
        /// A repeat with the same key (in the tenant, within the window) writes nothing new and
        /// is answered with the first message's id.
        idempotency_key: Option<String>,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Ping,
    Info,
    /// A page of history: the newest messages, or those before or after a cursor.
    History {
        room: String,
        limit: usize,
        from: HistoryFrom,
    },
    /// The messages after `since` (the id of the last message the client saw), for a client
    /// that reconnected.
    Recover {
        room: String,
        since: String,
    },
    /// An ephemeral event (typing, a cursor) for the room's other members: never in history.
    Signal {
        room: String,
        data: Value,
    },
    /// Who is in a room now: a page of users, after the user id `after`.
    Who {
        room: String,
        limit: usize,
        after: Option<String>,
    },
    /// A new token for this connection: its claims and expiry replace the ones it connected
    /// with (same tenant and user only).
    Refresh {
        token: String,
    },
    /// `data` back to this connection, at once (a connectivity check that carries something).
    Echo {
        data: Value,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not a JSON object.
    InvalidJson,
    /// The frame has no `action` (or `type`), or names one we do not know.
    UnknownAction,
    /// A known action with missing or ill-typed fields.
    InvalidRequest,
    /// A room the connection has not joined.
    NotMember,
    /// Over [`MAX_FRAME_BYTES`].
    MessageTooLarge,
    /// The connection has no record (it closed, or expired).
    NotConnected,
    /// Our fault: the table could not be reached. Nothing was written.
    Internal,
    /// Over a rate limit: nothing was written; `retry_after_ms` says when to try again
    /// ([`crate::limits`]).
    RateLimited,
    /// A `refresh` token that is not valid, or not for this connection's tenant and user:
    /// nothing changed.
    Unauthorized,
    /// The connection's token has expired: only `refresh` and `ping` are answered until a
    /// `refresh` with a new one.
    TokenExpired,
    /// The tenant's backend disconnected this user (`disconnect_user`): the connection closes.
    Terminated,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    /// For `rate_limited`: when the client may try again.
    pub retry_after_ms: Option<u64>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError { code, message: message.into(), retry_after_ms: None }
    }
}

/// Parses one text frame. The older `{"type": "ping"}` form is accepted as well as `action`.
pub fn parse_frame(body: &str) -> Result<Request, FrameError> {
    parse_frame_with_ref(body).0
}

/// [`parse_frame`], and the frame's `ref` if it has one: a string of 1 to [`MAX_REF_BYTES`]
/// (a client's request id, which the handler puts on the frame's answer). A `ref` of another
/// type or length is refused, as is a field the action does not take: a client's mistake gets
/// an error, not silence. The frame is parsed once.
pub fn parse_frame_with_ref(body: &str) -> (Result<Request, FrameError>, Option<String>) {
    if body.len() > MAX_FRAME_BYTES {
        let error = FrameError::new(
            ErrorCode::MessageTooLarge,
            format!("frame is {} bytes; the limit is {MAX_FRAME_BYTES}", body.len()),
        );
        return (Err(error), None);
    }
    let value: Value = match serde_json::from_str(body) {
        Ok(value) => value,
        Err(e) => return (Err(FrameError::new(ErrorCode::InvalidJson, format!("frame is not JSON: {e}"))), None),
    };
    let Value::Object(fields) = value else {
        return (Err(FrameError::new(ErrorCode::InvalidJson, "frame must be a JSON object")), None);
    };
    let reference = match fields.get("ref") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) if !r.is_empty() && r.len() <= MAX_REF_BYTES => Some(r.clone()),
        Some(_) => {
            let message = format!("`ref` must be a string of 1 to {MAX_REF_BYTES} bytes");
            return (Err(FrameError::new(ErrorCode::InvalidRequest, message)), None);
        }
    };
    (parse_fields(&fields), reference)
}

fn parse_fields(fields: &serde_json::Map<String, Value>) -> Result<Request, FrameError> {
    let action = match fields.get("action").or_else(|| fields.get("type")) {
        Some(Value::String(a)) => a.as_str(),
        Some(_) => return Err(FrameError::new(ErrorCode::UnknownAction, "`action` must be a string")),
        None => return Err(FrameError::new(ErrorCode::UnknownAction, "frame has no `action`")),
    };
    if let Some(takes) = fields_of(action)
        && let Some(unknown) =
            fields.keys().find(|k| !matches!(k.as_str(), "action" | "type" | "ref") && !takes.contains(&k.as_str()))
    {
        let takes = if takes.is_empty() { "none".to_string() } else { takes.join(", ") };
        return Err(FrameError::new(
            ErrorCode::InvalidRequest,
            format!("{action}: unknown field `{unknown}` (it takes: {takes}; and `ref`)"),
        ));
    }
    let room = || -> Result<String, FrameError> { string_field(fields, action, "room") };
    Ok(match action {
        "sendMessage" => Request::SendMessage {
            room: room()?,
            message: match string_field(fields, action, "message")? {
                empty if empty.is_empty() => {
                    return Err(FrameError::new(ErrorCode::InvalidRequest, "sendMessage: `message` is empty"));
                }
                message => message,
            },
            idempotency_key: match fields.get("idempotency_key") {
                None | Some(Value::Null) => None,
                Some(Value::String(key)) => Some(
                    crate::model::parse_idempotency_key(key)
                        .map_err(|e| FrameError::new(ErrorCode::InvalidRequest, format!("sendMessage: {e}")))?,
                ),
                Some(_) => {
                    return Err(FrameError::new(
                        ErrorCode::InvalidRequest,
                        "sendMessage: `idempotency_key` must be a string",
                    ));
                }
            },
        },
        "join" => Request::Join { room: room()? },
        "leave" => Request::Leave { room: room()? },
        "ping" => Request::Ping,
        "refresh" => Request::Refresh { token: string_field(fields, action, "token")? },
        "echo" => {
            let data = fields.get("data").cloned().unwrap_or(Value::Null);
            let size = data.to_string().len();
            if size > MAX_SIGNAL_BYTES {
                return Err(FrameError::new(
                    ErrorCode::MessageTooLarge,
                    format!("echo: `data` is {size} bytes as JSON; the limit is {MAX_SIGNAL_BYTES}"),
                ));
            }
            Request::Echo { data }
        }
        "info" => Request::Info,
        "signal" => {
            let data = fields.get("data").cloned().unwrap_or(Value::Null);
            let size = data.to_string().len();
            if size > MAX_SIGNAL_BYTES {
                return Err(FrameError::new(
                    ErrorCode::MessageTooLarge,
                    format!("signal: `data` is {size} bytes as JSON; the limit is {MAX_SIGNAL_BYTES}"),
                ));
            }
            Request::Signal { room: room()?, data }
        }
        "who" => {
            let max = MAX_WHO_PAGE;
            let limit = match fields.get("limit") {
                None | Some(Value::Null) => DEFAULT_WHO_PAGE,
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=max as u64).contains(&n) => n as usize,
                    _ => {
                        return Err(FrameError::new(
                            ErrorCode::InvalidRequest,
                            format!("who: `limit` must be a whole number from 1 to {max}"),
                        ));
                    }
                },
            };
            let after = match fields.get("after") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s.len() <= crate::model::MAX_USER_ID_BYTES => Some(s.clone()),
                Some(_) => {
                    return Err(FrameError::new(
                        ErrorCode::InvalidRequest,
                        "who: `after` must be the `next` of the previous page",
                    ));
                }
            };
            Request::Who { room: room()?, limit, after }
        }
        "history" => {
            let limit = match fields.get("limit") {
                None | Some(Value::Null) => DEFAULT_HISTORY_LIMIT,
                Some(v) => match v.as_u64() {
                    Some(n) if (1..=MAX_HISTORY_LIMIT as u64).contains(&n) => n as usize,
                    _ => {
                        return Err(FrameError::new(
                            ErrorCode::InvalidRequest,
                            format!("history: `limit` must be a whole number from 1 to {MAX_HISTORY_LIMIT}"),
                        ));
                    }
                },
            };
            let cursor = |name: &str| match fields.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => parse_cursor(s, name == "before")
                    .map(Some)
                    .map_err(|e| FrameError::new(ErrorCode::InvalidRequest, format!("history: `{name}`: {e}"))),
                Some(_) => {
                    Err(FrameError::new(ErrorCode::InvalidRequest, format!("history: `{name}` must be a string")))
                }
            };
            let from = match (cursor("before")?, cursor("after")?) {
                (Some(_), Some(_)) => {
                    return Err(FrameError::new(
                        ErrorCode::InvalidRequest,
                        "history: give `before` or `after`, not both",
                    ));
                }
                (Some(before), None) => HistoryFrom::Before(before),
                (None, Some(after)) => HistoryFrom::After(after),
                (None, None) => HistoryFrom::Latest,
            };
            Request::History { room: room()?, limit, from }
        }
        "recover" => {
            let since = string_field(fields, action, "since")?;
            if crate::model::message_sk_of_id(&since).is_none() {
                return Err(FrameError::new(
                    ErrorCode::InvalidRequest,
                    "recover: `since` must be the id of a message (a UUID v7)",
                ));
            }
            Request::Recover { room: room()?, since }
        }
        other => {
            return Err(FrameError::new(
                ErrorCode::UnknownAction,
                format!(
                    "unknown action {other:?}; known: sendMessage, join, leave, ping, info, history, recover, signal, who, refresh, echo"
                ),
            ));
        }
    })
}

/// The fields each action takes besides `action` (or `type`) and `ref`; `None` for an unknown
/// action.
fn fields_of(action: &str) -> Option<&'static [&'static str]> {
    Some(match action {
        "sendMessage" => &["room", "message", "idempotency_key"],
        "join" | "leave" => &["room"],
        "ping" | "info" => &[],
        "refresh" => &["token"],
        "echo" => &["data"],
        "signal" => &["room", "data"],
        "who" => &["room", "limit", "after"],
        "history" => &["room", "limit", "before", "after"],
        "recover" => &["room", "since"],
        _ => return None,
    })
}

/// A history cursor as a sort-key bound: a message id (a UUID v7, whose time gives its key), a
/// message's sort key (`MSG#…`), or a point in time in RFC 3339 with any offset (normalised to
/// UTC; `before` a time excludes its millisecond, so does `after`).
pub fn parse_cursor(value: &str, before: bool) -> Result<String, String> {
    if let Some(sk) = crate::model::message_sk_of_id(value) {
        return Ok(sk);
    }
    if let Some(rest) = value.strip_prefix("MSG#") {
        let (ts, id) = rest.split_once('#').ok_or("a message key is MSG#{timestamp}#{id}")?;
        let at = crate::model::parse_ts(ts)?;
        if id.is_empty() || id.contains('#') {
            return Err("a message key is MSG#{timestamp}#{id}".into());
        }
        // Rebuilt, so that a time with another offset or precision compares as the keys do.
        return Ok(crate::model::message_sk(&at, id));
    }
    let at = crate::model::parse_ts(value)
        .map_err(|_| format!("{value:?} is neither a message id, a message key nor an RFC 3339 time"))?;
    let ts = crate::model::format_ts(&at);
    Ok(if before { format!("MSG#{ts}") } else { format!("MSG#{ts}$") })
}

fn string_field(fields: &serde_json::Map<String, Value>, action: &str, name: &str) -> Result<String, FrameError> {
    match fields.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(FrameError::new(ErrorCode::InvalidRequest, format!("{action}: `{name}` must be a string"))),
        None => Err(FrameError::new(ErrorCode::InvalidRequest, format!("{action}: `{name}` is missing"))),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PresenceEvent {
    Joined,
    Left,
}

/// A message in the form clients receive it (`room`, `user_id`, `message`, `timestamp`, plus its id).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub id: String,
    pub room: String,
    pub user_id: String,
    pub message: String,
    pub timestamp: String,
}

impl From<&crate::model::Message> for ChatMessage {
    fn from(m: &crate::model::Message) -> Self {
        ChatMessage {
            id: m.id.clone(),
            room: m.room.clone(),
            user_id: m.user_id.clone(),
            // What members got: the tenant's rewrite, once the processor has recorded it.
            message: m.delivered_body.clone().unwrap_or_else(|| m.body.clone()),
            timestamp: crate::model::format_ts(&m.timestamp),
        }
    }
}

/// Everything the server sends: by the processor through `@connections`, or by a handler as the
/// route response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        connection_id: String,
        tenant: String,
        user_id: String,
        rooms: Vec<String>,
        /// The tenant plugin's greeting, when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        greeting: Option<String>,
        /// Users present in each of `rooms` as the welcome was sent, this connection's user counted
        /// (whether or not its own membership has been applied yet).
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        counts: std::collections::BTreeMap<String, u64>,
        /// What the client said at connect (`?deployment_id=`, `?connection_type=`), if it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deployment_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_type: Option<String>,
    },
    Message(ChatMessage),
    /// A user became present in a room (their first connection joined) or stopped being present
    /// (their last one left). `id` is the same when a redelivered record sends it again: a client
    /// applies each id once.
    Presence {
        id: String,
        room: String,
        user_id: String,
        event: PresenceEvent,
        reason: String,
        /// The room's users after this event.
        users: u64,
        /// Grows with each `joined` and `left` of this user in this room: frames of one user may
        /// arrive out of order (two shards are handled at once), so a client keeps the highest
        /// version per user and room and drops a lower one. 0 from processors before versions.
        #[serde(default)]
        version: u64,
    },
    /// An ephemeral event from another member of the room.
    Signal {
        id: String,
        room: String,
        user_id: String,
        data: Value,
    },
    /// A backend's message to this connection's user (`send_to_user`), whatever rooms they are
    /// in: each of the user's connections gets it once; `id` is the same when a redelivered
    /// record sends it again.
    UserMessage {
        id: String,
        /// Who the backend says it is from.
        from: String,
        message: String,
        timestamp: String,
    },
    /// The answer to `who`: a page of the users present, each once with their connection count.
    Who {
        room: String,
        users: Vec<PresentUser>,
        /// Users in the room.
        total: u64,
        /// Pass as `after` for the next page; absent on the last page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    Rejected {
        id: String,
        reason: String,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Pong,
    /// A `refresh` was taken: the connection's token now expires at `expires_at` (RFC 3339;
    /// absent for a token without `exp`).
    Refreshed {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<String>,
    },
    Info {
        connection_id: String,
        tenant: String,
        user_id: String,
        rooms: Vec<String>,
        connected_at: String,
        /// What the client said at connect (`?deployment_id=`, `?connection_type=`), if it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deployment_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection_type: Option<String>,
    },
    /// The answer to `echo`: its `data`.
    Echo {
        data: Value,
    },
    History {
        room: String,
        messages: Vec<ChatMessage>,
        /// More in the same direction: pass as `before` (or `after`, when paging forward).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// The answer to `recover`, and the processor's word after a reconnect's recovery (`?since=`):
    /// `recovered: false` when the messages since the client's last one cannot all be given (its
    /// message has expired from history, or too many were missed): the client reloads instead of
    /// trusting a gap.
    Recover {
        room: String,
        recovered: bool,
        messages: Vec<ChatMessage>,
        /// More: ask `recover` again with this as `since`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Confirms `sendMessage` (with the message's id, which a later `rejected` refers to),
    /// `join` and `leave`. Presence and the message itself arrive through the stream.
    Ack {
        request: String,
        room: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
        /// For `join`: the room's users as the join was acknowledged (this connection's user is
        /// counted once its `joined` is processed) …
        #[serde(default, skip_serializing_if = "Option::is_none")]
        users: Option<u64>,
        /// … and the first of them, by user id (at most [`JOIN_ACK_MEMBERS`];
        /// `who` pages through the rest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        members: Option<Vec<PresentUser>>,
        /// For `join` in a tenant whose rules decide joins: the join waits for them. The same
        /// `ack`, without `pending` and with the room's users, follows when they allow it, or
        /// `join_denied` when they do not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pending: Option<bool>,
    },
    /// A join the tenant's rules (or the token's `rooms` claim) refused: nothing of the room
    /// reaches this connection.
    JoinDenied {
        room: String,
        reason: String,
    },
}

/// A user present in a room, with how many connections they have in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentUser {
    pub user_id: String,
    pub connections: usize,
    /// The version of the user's last `joined` (what this snapshot shows): a client drops a
    /// presence frame of this user with a lower version that arrives after it.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ServerMessage {
    /// A `join`'s first answer when the tenant's rules decide: the real `ack` or `join_denied`
    /// follows from the processor.
    pub fn pending_join(room: &str) -> ServerMessage {
        ServerMessage::Ack {
            request: "join".into(),
            room: room.into(),
            id: None,
            users: None,
            members: None,
            pending: Some(true),
        }
    }

    /// An `ack` with no presence snapshot.
    pub fn ack(request: &str, room: &str, id: Option<String>) -> ServerMessage {
        ServerMessage::Ack { request: request.into(), room: room.into(), id, users: None, members: None, pending: None }
    }
}

/// The users of a [`WhoPage`] as the protocol lists them.
pub fn present_users(page: &WhoPage) -> Vec<PresentUser> {
    page.users
        .iter()
        .enumerate()
        .map(|(i, (user_id, connections))| PresentUser {
            user_id: user_id.clone(),
            connections: *connections,
            version: page.versions.get(i).copied().unwrap_or_default(),
        })
        .collect()
}

impl ServerMessage {
    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail: no maps with non-string keys, no floats.
        serde_json::to_string(self)
            .unwrap_or_else(|e| format!(r#"{{"action":"error","code":"internal","message":"{e}"}}"#))
    }
}

impl From<FrameError> for ServerMessage {
    fn from(e: FrameError) -> Self {
        ServerMessage::Error { code: e.code, message: e.message, retry_after_ms: e.retry_after_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> ErrorCode {
        parse_frame(body).unwrap_err().code
    }

    #[test]
    fn a_clients_mistakes_are_errors_not_silence() {
        let refused = |frame: Value| parse_frame_with_ref(&frame.to_string()).0.unwrap_err();
        for (frame, says) in [
            (serde_json::json!({"action": "ping", "ref": "r".repeat(MAX_REF_BYTES + 1)}), "`ref` must be"),
            (serde_json::json!({"action": "ping", "ref": 7}), "`ref` must be"),
            (serde_json::json!({"action": "ping", "ref": {"id": 1}}), "`ref` must be"),
            (serde_json::json!({"action": "ping", "ref": ""}), "`ref` must be"),
            (serde_json::json!({"action": "sendMessage", "room": "general", "message": ""}), "`message` is empty"),
            (
                serde_json::json!({"action": "sendMessage", "room": "general", "message": "x", "colour": "red"}),
                "unknown field `colour`",
            ),
            (serde_json::json!({"action": "join", "room": "general", "rooms": ["a"]}), "unknown field `rooms`"),
            (serde_json::json!({"action": "ping", "room": "general"}), "it takes: none"),
        ] {
            let error = refused(frame.clone());
            assert_eq!(error.code, ErrorCode::InvalidRequest, "{frame}");
            assert!(error.message.contains(says), "{frame}: {}", error.message);
        }
        let (ok, reference) =
            parse_frame_with_ref(&serde_json::json!({"action": "ping", "ref": "r".repeat(MAX_REF_BYTES)}).to_string());
        assert_eq!((ok.unwrap(), reference.map(|r| r.len())), (Request::Ping, Some(MAX_REF_BYTES)));
        let keyed = serde_json::json!({"type": "sendMessage", "room": "g", "message": "x", "idempotency_key": "k-1", "ref": "1"});
        assert!(matches!(parse_frame(&keyed.to_string()), Ok(Request::SendMessage { .. })));
    }

    #[test]
    fn parses_every_action_and_the_older_type_field() {
        assert_eq!(
            parse_frame(r#"{"action":"sendMessage","room":"general","message":"hi"}"#).unwrap(),
            Request::SendMessage { room: "general".into(), message: "hi".into(), idempotency_key: None }
        );
        assert_eq!(parse_frame(r#"{"type":"ping"}"#).unwrap(), Request::Ping);
        assert_eq!(parse_frame(r#"{"action":"info"}"#).unwrap(), Request::Info);
        assert_eq!(parse_frame(r#"{"action":"join","room":"a"}"#).unwrap(), Request::Join { room: "a".into() });
        assert_eq!(parse_frame(r#"{"action":"leave","room":"a"}"#).unwrap(), Request::Leave { room: "a".into() });
        assert_eq!(
            parse_frame(r#"{"action":"history","room":"a"}"#).unwrap(),
            Request::History { room: "a".into(), limit: DEFAULT_HISTORY_LIMIT, from: HistoryFrom::Latest }
        );
        assert_eq!(
            parse_frame(r#"{"action":"history","room":"a","limit":3,"before":"2024-01-15T10:30:00.000Z"}"#).unwrap(),
            Request::History {
                room: "a".into(),
                limit: 3,
                from: HistoryFrom::Before("MSG#2024-01-15T10:30:00.000Z".into())
            }
        );
        // Any offset is normalised to the keys' UTC; `after` a time skips that millisecond.
        assert_eq!(
            parse_frame(r#"{"action":"history","room":"a","after":"2024-01-15T12:30:00.000+02:00"}"#).unwrap(),
            Request::History {
                room: "a".into(),
                limit: DEFAULT_HISTORY_LIMIT,
                from: HistoryFrom::After("MSG#2024-01-15T10:30:00.000Z$".into())
            }
        );
        let at = chrono::DateTime::parse_from_rfc3339("2024-01-15T10:30:00.123Z").unwrap().with_timezone(&chrono::Utc);
        let id = crate::model::message_id_at(at);
        let sk = crate::model::message_sk(&at, &id);
        let frame = format!(r#"{{"action":"history","room":"a","before":"{id}"}}"#);
        assert_eq!(
            parse_frame(&frame).unwrap(),
            Request::History { room: "a".into(), limit: DEFAULT_HISTORY_LIMIT, from: HistoryFrom::Before(sk.clone()) }
        );
        let frame = format!(r#"{{"action":"history","room":"a","after":"{sk}"}}"#);
        assert_eq!(
            parse_frame(&frame).unwrap(),
            Request::History { room: "a".into(), limit: DEFAULT_HISTORY_LIMIT, from: HistoryFrom::After(sk) }
        );
        let frame = format!(r#"{{"action":"recover","room":"a","since":"{id}"}}"#);
        assert_eq!(parse_frame(&frame).unwrap(), Request::Recover { room: "a".into(), since: id });
    }

    #[test]
    fn bad_frames_are_values_with_specific_codes() {
        assert_eq!(code("hello"), ErrorCode::InvalidJson);
        assert_eq!(code("[1,2]"), ErrorCode::InvalidJson);
        assert_eq!(code("{}"), ErrorCode::UnknownAction);
        assert_eq!(code(r#"{"action":"dance"}"#), ErrorCode::UnknownAction);
        assert_eq!(code(r#"{"action":7}"#), ErrorCode::UnknownAction);
        assert_eq!(code(r#"{"action":"sendMessage","room":"a"}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"action":"sendMessage","room":"a","message":{"x":1}}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"action":"history","room":"a","limit":0}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"action":"history","room":"a","before":"yesterday"}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"action":"history","room":"a","before":"MSG#nope"}"#), ErrorCode::InvalidRequest);
        assert_eq!(
            code(r#"{"action":"history","room":"a","before":"2024-01-15T10:30:00Z","after":"2024-01-15T10:30:00Z"}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(code(r#"{"action":"recover","room":"a","since":"yesterday"}"#), ErrorCode::InvalidRequest);
        assert_eq!(
            code(r#"{"action":"sendMessage","room":"a","message":"x","idempotency_key":"a#b"}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            code(r#"{"action":"sendMessage","room":"a","message":"x","idempotency_key":7}"#),
            ErrorCode::InvalidRequest
        );
        let big = format!(r#"{{"action":"sendMessage","room":"a","message":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES));
        assert_eq!(code(&big), ErrorCode::MessageTooLarge);
    }

    #[test]
    fn server_messages_have_the_documented_shape() {
        let m = ServerMessage::Presence {
            id: "e1".into(),
            room: "r".into(),
            user_id: "u".into(),
            event: PresenceEvent::Left,
            reason: "expired".into(),
            users: 3,
            version: 2,
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"action":"presence","id":"e1","room":"r","user_id":"u","event":"left","reason":"expired","users":3,"version":2})
        );
        assert_eq!(
            parse_frame(r#"{"action":"who","room":"a","limit":2,"after":"bob"}"#).unwrap(),
            Request::Who { room: "a".into(), limit: 2, after: Some("bob".into()) }
        );
        assert_eq!(code(r#"{"action":"who","room":"a","limit":501}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"action":"who","room":"a","after":7}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(r#"{"action":"who"}"#), ErrorCode::InvalidRequest);
        let e: ServerMessage = FrameError::new(ErrorCode::NotMember, "x").into();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"action":"error","code":"not_member","message":"x"})
        );
        assert_eq!(ServerMessage::Pong.to_json(), r#"{"action":"pong"}"#);
        assert_eq!(
            parse_frame(r#"{"action":"refresh","token":"t.o.k"}"#),
            Ok(Request::Refresh { token: "t.o.k".into() })
        );
        assert_eq!(parse_frame(r#"{"action":"refresh"}"#).unwrap_err().code, ErrorCode::InvalidRequest);
        let refreshed = ServerMessage::Refreshed { expires_at: Some("2026-12-07T10:00:00.000Z".into()) };
        assert_eq!(refreshed.to_json(), r#"{"action":"refreshed","expires_at":"2026-12-07T10:00:00.000Z"}"#);
        let msg = ServerMessage::Message(ChatMessage {
            id: "1".into(),
            room: "general".into(),
            user_id: "u".into(),
            message: "hi".into(),
            timestamp: "2024-01-15T10:30:00.000Z".into(),
        });
        assert_eq!(
            serde_json::to_value(&msg).unwrap(),
            serde_json::json!({"action":"message","id":"1","room":"general","user_id":"u","message":"hi","timestamp":"2024-01-15T10:30:00.000Z"})
        );
    }
}
