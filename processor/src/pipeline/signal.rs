//! A signal INSERT: an ephemeral event (typing, cursors) for the room's other members, never kept
//! for history. A sender whose join was just denied reaches no one.

use super::{Processor, Reaction};
use crate::model::{Membership, Signal};
use crate::protocol::ServerMessage;
use crate::react::{Effect, send_to_room};
use crate::store::StoreError;

/// A signal INSERT: reads the room's members, then states the reaction.
pub(super) async fn sent(p: &Processor, s: &Signal) -> Result<Reaction, StoreError> {
    let members = p.room_members(&s.tenant, &s.room, true).await?;
    let effects = match p.refused_sender(&s.tenant, &s.room, &s.sender_connection_id, &members).await? {
        true => Vec::new(),
        false => react(s, &members),
    };
    Ok(Reaction { effects, room_size: Some(members.len()), ..Reaction::default() })
}

/// Pure: one `signal` frame to every member of the room but its sender; data that is not JSON
/// arrives as `null`.
pub fn react(s: &Signal, members: &[Membership]) -> Vec<Effect> {
    let data = serde_json::from_str(&s.data).unwrap_or(serde_json::Value::Null);
    let payload = ServerMessage::Signal { id: s.id.clone(), room: s.room.clone(), user_id: s.user_id.clone(), data };
    send_to_room(payload, members.iter().filter(|member| member.connection_id != s.sender_connection_id))
}
