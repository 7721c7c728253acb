//! Idempotent sends: which message a key wrote, until its TTL.

use super::*;

// Idempotent sends: `IDEM#{tenant}#{scope}#{key}` remembers, until its TTL, which message a key
// wrote. The scope is the sender (`u:{userId}`, user ids never hold `#`) or `publish` for
// backends, so one user can never claim, or learn, another's key.

pub const IDEMPOTENCY_SK: &str = "IDEM";

/// The default idempotency window: five minutes (`ROOMCAST_IDEMPOTENCY_WINDOW_SECONDS`).
pub const DEFAULT_IDEMPOTENCY_WINDOW_SECONDS: i64 = 300;

pub fn idempotency_pk(tenant: &str, scope: &str, key: &str) -> String {
    format!("IDEM#{tenant}#{scope}#{key}")
}

/// Whose keys a message's key is among: its sender's, or the backends'.
pub fn idempotency_scope(message: &Message) -> String {
    if message.sender_connection_id.is_empty() { "publish".to_string() } else { format!("u:{}", message.user_id) }
}

/// An idempotency key: 1–128 of `A-Z a-z 0-9 _ - . :` (never the key separator `#`).
pub fn parse_idempotency_key(key: &str) -> Result<String, String> {
    if key.is_empty() || key.len() > 128 {
        return Err(format!("idempotency_key must be 1 to 128 characters, got {}", key.len()));
    }
    if let Some(bad) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))) {
        return Err(format!("idempotency_key contains {bad:?}; allowed are letters, digits and _ - . :"));
    }
    Ok(key.to_string())
}

/// Which message a key wrote, until `ttl` (the idempotency window). It holds the message itself,
/// so a repeat can finish a first send that claimed the key and died before writing it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    pub pk: String,
    pub sk: String,
    #[serde(rename = "type")]
    pub record_type: String,
    pub tenant: String,
    pub key: String,
    pub message_id: String,
    pub room: String,
    pub ttl: i64,
    pub message: Message,
}

impl IdempotencyRecord {
    pub fn new(message: &Message, key: &str, now: DateTime<Utc>, window_seconds: i64) -> IdempotencyRecord {
        IdempotencyRecord {
            pk: idempotency_pk(&message.tenant, &idempotency_scope(message), key),
            sk: IDEMPOTENCY_SK.into(),
            record_type: "idempotency".into(),
            tenant: message.tenant.clone(),
            key: key.to_string(),
            message_id: message.id.clone(),
            room: message.room.clone(),
            ttl: expiry(now, window_seconds),
            message: message.clone(),
        }
    }
}
