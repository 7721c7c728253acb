//! The client protocol: JSON text frames, routed on `action` (README.md, "Protocol").
//!
//! Frames are parsed once, at the edge, into [`Request`]; everything a client can get wrong is a
//! [`FrameError`] value that becomes an `{"action":"error","code":…,"message":…}` answer.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// API Gateway's WebSocket frame limit, and so the largest message a client can send.
pub const MAX_FRAME_BYTES: usize = 128 * 1024;

/// The largest frame `@connections` delivers (API Gateway's WebSocket message limit). A message
/// is accepted only if the frame every recipient gets — with its id, sender and time — fits.
pub const MAX_OUTGOING_BYTES: usize = 128 * 1024;
pub const DEFAULT_HISTORY_LIMIT: usize = 50;
pub const MAX_HISTORY_LIMIT: usize = 100;

/// What a client asked for.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    SendMessage {
        room: String,
        message: String,
    },
    Join {
        room: String,
    },
    Leave {
        room: String,
    },
    Ping,
    Info,
    History {
        room: String,
        limit: usize,
        before: Option<String>,
    },
    /// Who is in a room now: a page of users, after the user id `after`.
    Who {
        room: String,
        limit: usize,
        after: Option<String>,
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
}

#[derive(Clone, Debug, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError { code, message: message.into() }
    }
}

/// Parses one text frame. The older `{"type": "ping"}` form is accepted as well as `action`.
pub fn parse_frame(body: &str) -> Result<Request, FrameError> {
    if body.len() > MAX_FRAME_BYTES {
        return Err(FrameError::new(
            ErrorCode::MessageTooLarge,
            format!("frame is {} bytes; the limit is {MAX_FRAME_BYTES}", body.len()),
        ));
    }
    let value: Value = serde_json::from_str(body)
        .map_err(|e| FrameError::new(ErrorCode::InvalidJson, format!("frame is not JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(FrameError::new(ErrorCode::InvalidJson, "frame must be a JSON object"));
    };
    let action = match fields.get("action").or_else(|| fields.get("type")) {
        Some(Value::String(a)) => a.as_str(),
        Some(_) => return Err(FrameError::new(ErrorCode::UnknownAction, "`action` must be a string")),
        None => return Err(FrameError::new(ErrorCode::UnknownAction, "frame has no `action`")),
    };
    let room = || -> Result<String, FrameError> { string_field(&fields, action, "room") };
    Ok(match action {
        "sendMessage" => Request::SendMessage { room: room()?, message: string_field(&fields, action, "message")? },
        "join" => Request::Join { room: room()? },
        "leave" => Request::Leave { room: room()? },
        "ping" => Request::Ping,
        "info" => Request::Info,
        "who" => {
            let max = crate::presence::MAX_WHO_PAGE;
            let limit = match fields.get("limit") {
                None | Some(Value::Null) => crate::presence::DEFAULT_WHO_PAGE,
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
                Some(Value::String(s)) => Some(s.clone()),
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
            let before = match fields.get("before") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => {
                    crate::model::parse_ts(s)
                        .map_err(|e| FrameError::new(ErrorCode::InvalidRequest, format!("history: `before`: {e}")))?;
                    Some(s.clone())
                }
                Some(_) => {
                    return Err(FrameError::new(
                        ErrorCode::InvalidRequest,
                        "history: `before` must be a timestamp string",
                    ));
                }
            };
            Request::History { room: room()?, limit, before }
        }
        other => {
            return Err(FrameError::new(
                ErrorCode::UnknownAction,
                format!("unknown action {other:?}; known: sendMessage, join, leave, ping, info, history, who"),
            ));
        }
    })
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
            message: m.body.clone(),
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
        /// Users present in each of `rooms` as the welcome was sent (this connection's own
        /// membership may not be counted yet: its `joined` follows).
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        counts: std::collections::BTreeMap<String, u64>,
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
    },
    Pong,
    Info {
        connection_id: String,
        tenant: String,
        user_id: String,
        rooms: Vec<String>,
        connected_at: String,
    },
    History {
        room: String,
        messages: Vec<ChatMessage>,
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
        /// … and the first of them, by user id (at most [`crate::presence::JOIN_ACK_MEMBERS`];
        /// `who` pages through the rest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        members: Option<Vec<PresentUser>>,
    },
}

/// A user present in a room, with how many connections they have in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentUser {
    pub user_id: String,
    pub connections: usize,
}

impl ServerMessage {
    /// An `ack` with no presence snapshot.
    pub fn ack(request: &str, room: &str, id: Option<String>) -> ServerMessage {
        ServerMessage::Ack { request: request.into(), room: room.into(), id, users: None, members: None }
    }
}

/// The users of a [`crate::presence::WhoPage`] as the protocol lists them.
pub fn present_users(users: &[(String, usize)]) -> Vec<PresentUser> {
    users
        .iter()
        .map(|(user_id, connections)| PresentUser { user_id: user_id.clone(), connections: *connections })
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
        ServerMessage::Error { code: e.code, message: e.message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> ErrorCode {
        parse_frame(body).unwrap_err().code
    }

    #[test]
    fn parses_every_action_and_the_older_type_field() {
        assert_eq!(
            parse_frame(r#"{"action":"sendMessage","room":"general","message":"hi"}"#).unwrap(),
            Request::SendMessage { room: "general".into(), message: "hi".into() }
        );
        assert_eq!(parse_frame(r#"{"type":"ping"}"#).unwrap(), Request::Ping);
        assert_eq!(parse_frame(r#"{"action":"info"}"#).unwrap(), Request::Info);
        assert_eq!(parse_frame(r#"{"action":"join","room":"a"}"#).unwrap(), Request::Join { room: "a".into() });
        assert_eq!(parse_frame(r#"{"action":"leave","room":"a"}"#).unwrap(), Request::Leave { room: "a".into() });
        assert_eq!(
            parse_frame(r#"{"action":"history","room":"a"}"#).unwrap(),
            Request::History { room: "a".into(), limit: DEFAULT_HISTORY_LIMIT, before: None }
        );
        assert_eq!(
            parse_frame(r#"{"action":"history","room":"a","limit":3,"before":"2024-01-15T10:30:00.000Z"}"#).unwrap(),
            Request::History { room: "a".into(), limit: 3, before: Some("2024-01-15T10:30:00.000Z".into()) }
        );
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
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"action":"presence","id":"e1","room":"r","user_id":"u","event":"left","reason":"expired","users":3})
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
