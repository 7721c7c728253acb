//! A connection's records. Its INSERT is welcomed: the tenant's greeting, the users present in
//! each of its rooms, and, after a reconnect's `?since=`, what it missed (one budget for the whole
//! connect). Its REMOVE removes its memberships, each with why (their REMOVEs then say `left`),
//! and a connection deleted for flooding is told and closed.

use std::collections::BTreeMap;

use super::{MAX_RECOVERED_AT_CONNECT, Processor, Reaction};
use crate::model::{Connection, LeftReason};
use crate::protocol::{ErrorCode, ServerMessage};
use crate::react::{Effect, Recipient, Recovery, recovery_to};
use crate::rules::{CallRecord, Lookups, RecordAt, WelcomeInput};
use crate::store::StoreError;
use crate::stream::Cause;

/// What a welcome says besides the connection's own record.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Welcome {
    /// The tenant's greeting (its plugin's `welcome`), if any.
    pub greeting: Option<String>,
    /// Users present in each of the connection's rooms.
    pub counts: BTreeMap<String, u64>,
    /// After `?since=`: per room, the messages the client missed, or why they cannot all be given.
    pub recovery: Recovery,
}

/// A connection INSERT: gathers its welcome, then states it.
pub(super) async fn opened(
    p: &Processor,
    c: &Connection,
    sequence: &str,
    lookups: &Lookups,
) -> Result<Reaction, StoreError> {
    let (greeting, plugin_calls) = greeting(p, c, sequence, lookups).await?;
    // Counts only for rooms the connection is in: a pending room's size is not its yet.
    let rooms: Vec<String> = c.rooms.iter().filter(|r| c.in_room(r)).cloned().collect();
    let counts = crate::store::room_counts(p.presence_state().as_ref(), &c.tenant, &c.user_id, &rooms).await?;
    let recovery = recover(p, c).await?;
    let said = Welcome { greeting, counts: counts.into_iter().collect(), recovery };
    Ok(Reaction { effects: welcome(c, &said), plugin_calls, ..Reaction::default() })
}

/// The tenant's greeting for the connection, when its plugin gives one.
async fn greeting(
    p: &Processor,
    c: &Connection,
    sequence: &str,
    lookups: &Lookups,
) -> Result<(Option<String>, Vec<CallRecord>), StoreError> {
    let Some(rules) = p.rules.as_deref() else { return Ok((None, Vec::new())) };
    p.ensure_loaded(rules, &c.tenant, lookups).await?;
    let info = WelcomeInput {
        connection_id: c.connection_id.clone(),
        tenant: c.tenant.clone(),
        user_id: c.user_id.clone(),
        rooms: c.rooms.iter().cloned().collect(),
    };
    // The record's own time, never the clock: replay decides the same.
    let at = RecordAt { time_ms: c.connected_at.timestamp_millis().max(0) as u64, sequence: sequence.into() };
    Ok(match rules.greeting(&info, &at).await {
        Some((greeting, call)) => (greeting, vec![call]),
        None => (None, Vec::new()),
    })
}

/// What the connection missed in each room it asked `?since=` for. One budget for the whole
/// connect: a reconnect into many busy rooms must not post thousands of frames from one record
/// (the rest is one `recover` away). A room waiting for the tenant's rules recovers once they
/// allow it ([`super::membership`]).
async fn recover(p: &Processor, c: &Connection) -> Result<Recovery, StoreError> {
    let mut budget = MAX_RECOVERED_AT_CONNECT;
    let mut recovery = Vec::new();
    for (room, since) in c.recover.iter().filter(|(room, _)| !c.pending_rooms.contains(*room)) {
        let recovered = p.recover(&c.tenant, room, since, budget, &c.user_id).await?;
        if let Ok(messages) = &recovered {
            budget = budget.saturating_sub(messages.len());
        }
        recovery.push((room.clone(), recovered));
    }
    Ok(recovery)
}

fn me(c: &Connection) -> Recipient {
    Recipient { connection_id: c.connection_id.clone(), endpoint: c.endpoint.clone(), connected_at: c.connected_at }
}

/// Pure: the `welcome` to the connection alone, then what it missed, then a `join_denied` for
/// each room its token's `rooms` claim refused at `$connect`.
pub fn welcome(c: &Connection, welcome: &Welcome) -> Vec<Effect> {
    let hello = ServerMessage::Welcome {
        connection_id: c.connection_id.clone(),
        tenant: c.tenant.clone(),
        user_id: c.user_id.clone(),
        // Rooms waiting for the tenant's rules follow with their own `ack` or `join_denied`.
        rooms: c.rooms.iter().filter(|r| c.in_room(r)).cloned().collect(),
        greeting: welcome.greeting.clone(),
        counts: welcome.counts.clone(),
        deployment_id: c.deployment_id.clone(),
        connection_type: c.connection_type.clone(),
    };
    std::iter::once(Effect::Send { payload: hello, recipients: vec![me(c)] })
        .chain(recovery_to(me(c), &welcome.recovery))
        .chain(c.denied.iter().map(|(room, reason)| Effect::Send {
            payload: ServerMessage::JoinDenied { room: room.clone(), reason: reason.clone() },
            recipients: vec![me(c)],
        }))
        .collect()
}

/// Pure: a connection REMOVE removes each of its memberships, saying why: `expired` for DynamoDB's
/// TTL, else the reason its deleter wrote (`disconnect` when none). One deleted for flooding is
/// still open: told, then closed.
pub fn closed(c: &Connection, cause: Cause) -> Vec<Effect> {
    let reason = match (cause, c.close_reason.as_deref().and_then(LeftReason::parse)) {
        (Cause::TtlExpired, _) => LeftReason::Expired,
        (Cause::Client, Some(reason)) => reason,
        (Cause::Client, None) => LeftReason::Disconnect,
    };
    // Closed by the service: told why, then its socket closed (`DELETE @connections`).
    let why = match reason {
        LeftReason::RateLimited => {
            Some((ErrorCode::RateLimited, "this connection kept sending over its rate limit and is closed"))
        }
        LeftReason::Terminated => Some((ErrorCode::Terminated, "the service disconnected this user")),
        _ => None,
    };
    let closing = why.map(|(code, message)| {
        let payload = ServerMessage::Error { code, message: message.into(), retry_after_ms: None };
        [Effect::Send { payload, recipients: vec![me(c)] }, Effect::Close(me(c))]
    });
    c.rooms
        .iter()
        .map(|room| Effect::RemoveMembership {
            tenant: c.tenant.clone(),
            room: room.clone(),
            connection_id: c.connection_id.clone(),
            reason,
        })
        .chain(closing.into_iter().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::tests::{conn, sent};

    #[test]
    fn a_new_connection_is_welcomed_alone() {
        let c = conn("c1", "ann", &["b", "a"], 0);
        let out = sent(&welcome(&c, &Welcome::default()));
        assert_eq!(
            out,
            vec![(
                serde_json::json!({"action":"welcome","connection_id":"c1","tenant":"acme","user_id":"ann","rooms":["a","b"]}),
                vec!["c1".to_string()]
            )]
        );
    }

    #[test]
    fn a_removed_connection_removes_its_memberships_with_the_right_reason() {
        let c = conn("c1", "ann", &["a", "b"], 0);
        let reasons = |c: &Connection, cause| -> Vec<(String, LeftReason)> {
            closed(c, cause)
                .into_iter()
                .map(|e| match e {
                    Effect::RemoveMembership { room, reason, .. } => (room, reason),
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        assert_eq!(
            reasons(&c, Cause::Client),
            vec![("a".into(), LeftReason::Disconnect), ("b".into(), LeftReason::Disconnect)]
        );
        assert_eq!(reasons(&c, Cause::TtlExpired)[0].1, LeftReason::Expired);
        let gone = Connection { close_reason: Some("gone".into()), ..c };
        assert_eq!(reasons(&gone, Cause::Client)[0].1, LeftReason::Gone);
    }
}
