//! A membership's records: who may join (`authorize`), the room's presence (`presence`),
//! and what the room and the joiner are told.
//!
//! | record | kind | reaction |
//! |--------|------|----------|
//! | INSERT, `pending` | [`Kind::Pending`] | the tenant's rules decide; denied: `join_denied` to the joiner (allowed: its MODIFY follows) |
//! | INSERT | [`Kind::Joined`] | a tenant whose rules decide joins may still deny it; else presence, and `joined` to the room when the user became present and the room announces |
//! | MODIFY `pending` → allowed | [`Kind::Joined`] | presence, the join's `ack` with the room's users, what a reconnect missed there, `joined` |
//!
//! An allowed join into a room that keeps its latest message (the tenant's
//! [`latest_on_join`](crate::model::TenantSettings::latest_on_join)) also gets the room's newest
//! message it may see, before the room's `joined` (unless a reconnect's recovery gives it).
//! | REMOVE | [`Kind::Left`] | presence, and `left` to the room with why (`expired` for TTL) |
//! | REMOVE of a pending one, other MODIFYs | [`Kind::Other`] | nothing |

mod authorize;
mod presence;

use super::{MAX_RECOVERED_AT_CONNECT, Processor, Reaction};
use crate::model::{JoinReason, LeftReason, Membership};
use crate::presence::{JOIN_ACK_MEMBERS, PresenceOp};
use crate::protocol::{ChatMessage, HistoryFrom, MAX_OUTGOING_BYTES, PresenceEvent, ServerMessage};
use crate::react::{
    Effect, JoinOutcome, PresenceDecision, Recipient, Recovery, presence_frame, recovery_to, send_to_room,
};
use crate::rules::Lookups;
use crate::store::StoreError;
#[cfg(test)]
use crate::stream::Record;
use crate::stream::{Cause, Change};
use aws_lambda_events::dynamodb::EventRecord;

/// What a membership change is, read once.
#[derive(Clone, Copy, Debug)]
pub enum Kind<'a> {
    /// Written waiting for the tenant's rules.
    Pending(&'a Membership),
    /// Makes the user's connection present: an INSERT that did not wait, or the MODIFY by which
    /// the processor allowed one that did.
    Joined { membership: &'a Membership, inserted: bool },
    /// Takes a present connection out of the room.
    Left(&'a Membership, Cause),
    /// Nothing to do: a denied join's REMOVE, a MODIFY that changes no presence.
    Other,
}

impl<'a> Kind<'a> {
    pub fn of(change: &'a Change) -> Kind<'a> {
        if let Some(m) = change.pending_join() {
            return Kind::Pending(m);
        }
        if let Some(membership) = change.joined() {
            return Kind::Joined { membership, inserted: matches!(change, Change::Inserted(_)) };
        }
        match (change.left(), change) {
            (Some(m), Change::Removed { cause, .. }) => Kind::Left(m, *cause),
            _ => Kind::Other,
        }
    }
}

/// What was decided about a membership before reacting.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decided {
    /// The tenant's rules' answer: denied (the reason), or allowed (the `ack` the joiner gets).
    pub join: Option<JoinOutcome>,
    /// What the record did to the room's presence.
    pub presence: Option<PresenceDecision>,
    /// After an allowed join from a reconnect's `?since=`: what the connection missed there.
    pub recovery: Recovery,
    /// After an allowed join into a room that keeps its latest message: that message.
    pub latest: Option<ChatMessage>,
}

/// A membership record: gathers the tenant's answer, the presence transition and the room's
/// members it is announced to, then states the reaction.
pub(super) async fn changed(
    p: &Processor,
    change: &Change,
    record: &EventRecord,
    lookups: &Lookups,
) -> Result<Reaction, StoreError> {
    let sequence = record.change.sequence_number.as_deref().unwrap_or("");
    let kind = Kind::of(change);
    let (join, plugin_calls) = match kind {
        Kind::Pending(m) => authorize::authorize(p, m, true, sequence, lookups).await?,
        Kind::Joined { membership, inserted: true } => {
            authorize::authorize(p, membership, false, sequence, lookups).await?
        }
        _ => (None, Vec::new()),
    };
    let mut decided = Decided { join, ..Decided::default() };
    let (m, op) = match kind {
        Kind::Joined { membership, .. } => (membership, PresenceOp::Add),
        Kind::Left(m, _) => (m, PresenceOp::Remove),
        Kind::Pending(_) | Kind::Other => return Ok(react_with(kind, &[], decided, plugin_calls)),
    };
    if decided.join.is_none() {
        decided.presence = Some(presence::apply(p, m, op, record, lookups).await?);
    }
    // A join the tenant's rules allowed (its MODIFY), and one the tenant's backend made: the
    // connection did not ask, so the `ack` tells it (and its client) that it is in the room.
    if let Kind::Joined { membership, inserted } = kind
        && (!inserted || membership.join_reason == JoinReason::Server)
        && decided.join.is_none()
    {
        let (ack, recovery) = acknowledge(p, membership).await?;
        decided.join = Some(JoinOutcome::Allowed(ack));
        decided.recovery = recovery;
    }
    if let Kind::Joined { membership, .. } = kind
        && !matches!(decided.join, Some(JoinOutcome::Denied(_)))
        && decided.recovery.is_empty()
    {
        decided.latest = latest(p, membership, lookups).await?;
    }
    let members = match decided.presence.as_mut() {
        Some(presence) => audience(p, kind, m, presence, lookups).await?,
        None => Vec::new(),
    };
    Ok(react_with(kind, &members, decided, plugin_calls))
}

fn react_with(
    kind: Kind,
    members: &[Membership],
    decided: Decided,
    plugin_calls: Vec<crate::rules::CallRecord>,
) -> Reaction {
    let effects = react(kind, members, &decided);
    Reaction { effects, plugin_calls, presence: decided.presence, ..Reaction::default() }
}

/// A join the tenant's rules allowed: its `ack`, with the room's users now that the joiner is
/// among them, and, for a reconnect's room, what it missed (its share of the connect's budget).
async fn acknowledge(p: &Processor, m: &Membership) -> Result<(ServerMessage, Recovery), StoreError> {
    let page = p.presence_state().who(&m.tenant, &m.room, JOIN_ACK_MEMBERS, None).await?;
    let mut recovery = Vec::new();
    if m.join_reason == JoinReason::Connect
        && let Some(conn) = p.store.get_connection(&m.connection_id, p.clock.now()).await?
        && let Some(since) = conn.recover.get(&m.room)
    {
        let share = (MAX_RECOVERED_AT_CONNECT / conn.recover.len().max(1)).max(1);
        recovery.push((m.room.clone(), p.recover(&m.tenant, &m.room, since, share, &m.user_id).await?));
    }
    let ack = ServerMessage::Ack {
        request: "join".into(),
        room: m.room.clone(),
        id: None,
        users: Some(page.total),
        members: Some(crate::protocol::present_users(&page)),
        pending: None,
    };
    Ok((ack, recovery))
}

/// The newest message of a room that keeps its latest message, as the joiner may see it
/// (`history`'s rules: never a rejected message, a direct one only to its users); `None` for
/// other rooms, and for a connect that recovers the room. `history`'s read of the newest message
/// (strongly consistent), per join.
async fn latest(p: &Processor, m: &Membership, lookups: &Lookups) -> Result<Option<ChatMessage>, StoreError> {
    let settings = p.tenant_settings(&m.tenant, lookups).await?;
    if !settings.get().and_then(Option::as_ref).is_some_and(|s| s.keeps_latest(&m.room)) {
        return Ok(None);
    }
    // A connect that recovers the room with `?since=` gets what it missed there instead.
    if m.join_reason == JoinReason::Connect
        && let Some(conn) = p.store.get_connection(&m.connection_id, p.clock.now()).await?
        && conn.recover.contains_key(&m.room)
    {
        return Ok(None);
    }
    let (now, viewer) = (p.clock.now(), Some(m.user_id.as_str()));
    let found =
        p.store.history_page(&m.tenant, &m.room, &HistoryFrom::Latest, 1, now, viewer, MAX_OUTGOING_BYTES).await?;
    Ok(found.last().map(ChatMessage::from))
}

/// The room's members a transition is announced to: read afresh (the writer's bump of the
/// roster version may not have landed yet, and the frame goes to the room as it is now); none
/// when nothing is announced. In a join storm the room's memberships run ahead of presence: a
/// room past the tenant's limit announces no `joined` (its members would get one per join, the
/// limit times the room), and the user's `left` will not be told either.
async fn audience(
    p: &Processor,
    kind: Kind<'_>,
    m: &Membership,
    presence: &mut PresenceDecision,
    lookups: &Lookups,
) -> Result<Vec<Membership>, StoreError> {
    if presence.event.is_none() || !presence.announce {
        return Ok(Vec::new());
    }
    let joined = matches!(kind, Kind::Joined { .. }) && presence.event == Some(PresenceEvent::Joined);
    if joined && lookups.past_limit(&m.tenant, &m.room) {
        // Found past its limit earlier in the batch: not read again.
        unannounce(p, presence, m).await?;
        return Ok(Vec::new());
    }
    let members = p.room_members(&m.tenant, &m.room, false).await?;
    if joined {
        let users: std::collections::HashSet<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
        if users.len() as u64 > p.announce_max_users(&m.tenant, lookups).await? {
            lookups.mark_past_limit(&m.tenant, &m.room);
            unannounce(p, presence, m).await?;
        }
    }
    Ok(members)
}

/// A `joined` not told after all (the room past its limit): nor will its `left` be.
async fn unannounce(p: &Processor, presence: &mut PresenceDecision, m: &Membership) -> Result<(), StoreError> {
    p.presence_state().unannounce(&m.tenant, &m.room, &m.user_id).await?;
    presence.announce = false;
    crate::metrics::Metrics::add(&p.metrics.presence_unannounced, 1);
    Ok(())
}

/// The presence decision, when it is a transition of `event` the room announces.
fn announced(decided: &Decided, event: PresenceEvent) -> Option<&PresenceDecision> {
    decided.presence.as_ref().filter(|p| p.event == Some(event) && p.announce)
}

/// Pure. `members`: the room's live memberships, read after the change was written (an
/// inserted membership among them, a removed one not); needed only when a transition is
/// announced.
pub fn react(kind: Kind, members: &[Membership], decided: &Decided) -> Vec<Effect> {
    let denied = |m: &Membership, reason: &String| Effect::Send {
        payload: ServerMessage::JoinDenied { room: m.room.clone(), reason: reason.clone() },
        recipients: vec![Recipient::from(m)],
    };
    match (kind, &decided.join) {
        (Kind::Pending(m) | Kind::Joined { membership: m, .. }, Some(JoinOutcome::Denied(reason))) => {
            vec![denied(m, reason)]
        }
        (Kind::Joined { membership, .. }, join) => joined(membership, members, join.as_ref(), decided),
        (Kind::Left(m, cause), _) => {
            let reason = match (cause, m.left_reason.as_deref().and_then(LeftReason::parse)) {
                (Cause::TtlExpired, _) => LeftReason::Expired,
                (Cause::Client, Some(reason)) => reason,
                (Cause::Client, None) => LeftReason::Leave,
            };
            // The tenant's backend took it out (`leave_user`): the connection did not ask, so
            // an `ack` for `leave` tells it (and its client, which forgets the room).
            let told = (reason == LeftReason::Server).then(|| Effect::Send {
                payload: ServerMessage::ack("leave", &m.room, None),
                recipients: vec![Recipient::from(m)],
            });
            let announced = match announced(decided, PresenceEvent::Left) {
                Some(p) => send_to_room(presence_frame(m, p, PresenceEvent::Left, reason.as_str()), members),
                None => Vec::new(),
            };
            told.into_iter().chain(announced).collect()
        }
        // Pending and allowed: its MODIFY makes it present and acknowledges it.
        (Kind::Pending(_) | Kind::Other, _) => Vec::new(),
    }
}

/// An allowed join's `ack`, then what the connection missed in the room if it reconnected with
/// `?since=` (held back until the rules allowed the room), or the room's latest message if it
/// keeps one; `joined` to the room when announced.
fn joined(m: &Membership, members: &[Membership], join: Option<&JoinOutcome>, decided: &Decided) -> Vec<Effect> {
    let mut effects = Vec::new();
    if let Some(JoinOutcome::Allowed(ack)) = join {
        effects.push(Effect::Send { payload: ack.clone(), recipients: vec![Recipient::from(m)] });
        effects.extend(recovery_to(Recipient::from(m), &decided.recovery));
    }
    if let Some(latest) = &decided.latest {
        effects.push(Effect::Send {
            payload: ServerMessage::Message(latest.clone()),
            recipients: vec![Recipient::from(m)],
        });
    }
    if let Some(p) = announced(decided, PresenceEvent::Joined) {
        let reason = match m.join_reason {
            JoinReason::Connect => "connect",
            JoinReason::Join => "join",
            JoinReason::Server => "server",
        };
        effects.extend(send_to_room(presence_frame(m, p, PresenceEvent::Joined, reason), members));
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::tests::{member, sent};

    fn decided(event: Option<PresenceEvent>, announce: bool) -> Decided {
        Decided {
            presence: Some(PresenceDecision {
                event,
                id: "ev-1".into(),
                users: Some(2),
                connections: 1,
                redelivered: false,
                announce,
                version: 1,
            }),
            ..Decided::default()
        }
    }

    #[test]
    fn joined_is_announced_only_for_a_transition_the_room_announces() {
        let ann = member("c1", "ann", 0);
        let members = [ann.clone(), member("c9", "bob", 0)];
        let change = Change::Inserted(Record::Membership(ann));
        let kind = Kind::of(&change);
        let out = sent(&react(kind, &members, &decided(Some(PresenceEvent::Joined), true)));
        assert_eq!(
            out,
            vec![(
                serde_json::json!({"action":"presence","id":"ev-1","room":"general","user_id":"ann","event":"joined","reason":"join","users":2,"version":1}),
                vec!["c1".to_string(), "c9".to_string()]
            )]
        );
        for quiet in [decided(None, true), decided(Some(PresenceEvent::Joined), false), Decided::default()] {
            assert!(react(kind, &members, &quiet).is_empty(), "{quiet:?}");
        }
    }

    #[test]
    fn left_names_the_reason() {
        let tab = member("c2", "ann", 1);
        let bob = member("c9", "bob", 0);
        let removed = |m: &Membership, cause| Change::Removed { old: Record::Membership(m.clone()), cause };
        let left = decided(Some(PresenceEvent::Left), true);
        let react_to = |change: &Change, members: &[Membership]| sent(&react(Kind::of(change), members, &left));
        let out = react_to(&removed(&tab, Cause::Client), std::slice::from_ref(&bob));
        assert_eq!(out[0].0["event"], "left");
        assert_eq!(out[0].0["reason"], "leave");
        assert_eq!(out[0].1, vec!["c9"]);

        let marked = Membership { left_reason: Some("disconnect".into()), ..tab.clone() };
        assert_eq!(react_to(&removed(&marked, Cause::Client), std::slice::from_ref(&bob))[0].0["reason"], "disconnect");
        assert_eq!(react_to(&removed(&tab, Cause::TtlExpired), &[bob])[0].0["reason"], "expired");
    }

    #[test]
    fn a_room_that_keeps_its_latest_message_gives_it_to_the_joiner_before_the_room_hears_of_the_join() {
        let ann = member("c1", "ann", 0);
        let members = [ann.clone(), member("c9", "bob", 0)];
        let change = Change::Inserted(Record::Membership(ann));
        let latest = ChatMessage {
            id: "m-7".into(),
            room: "general".into(),
            user_id: "bob".into(),
            message: "3-1".into(),
            timestamp: "2026-12-07T10:00:00Z".into(),
        };
        let with_latest = Decided { latest: Some(latest), ..decided(Some(PresenceEvent::Joined), true) };
        let out = sent(&react(Kind::of(&change), &members, &with_latest));
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!((out[0].0["action"].as_str(), out[0].0["message"].as_str()), (Some("message"), Some("3-1")));
        assert_eq!(out[0].1, vec!["c1"], "the joiner alone");
        assert_eq!(out[1].0["event"], "joined");
        // Denied: the joiner hears only that.
        let denied = Decided { join: Some(JoinOutcome::Denied("members only".into())), ..with_latest };
        let out = sent(&react(Kind::of(&change), &members, &denied));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0["action"], "join_denied");
    }

    #[test]
    fn a_denied_join_tells_the_joiner_alone_and_a_pending_one_waits() {
        let ann = Membership { pending: Some(true), ..member("c1", "ann", 0) };
        let change = Change::Inserted(Record::Membership(ann));
        let denied = Decided { join: Some(JoinOutcome::Denied("members only".into())), ..Decided::default() };
        let out = sent(&react(Kind::of(&change), &[member("c9", "bob", 0)], &denied));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0["action"], "join_denied");
        assert_eq!(out[0].1, vec!["c1"]);
        assert!(react(Kind::of(&change), &[], &Decided::default()).is_empty());
    }
}
