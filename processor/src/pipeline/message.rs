//! A message INSERT. The tenant's rules give their verdict (deliver, rewritten or not, or reject)
//! and route (extra rooms, only some users, no echo); the room's live members are read (from the
//! container's roster when it stands), with the route's extra rooms; a sender whose join was
//! just denied reaches no one. Then the reaction: the verdict marked on the message for history,
//! copies kept in the extra rooms, and one frame to every chosen member.

use futures::StreamExt;

use super::{EXTRA_ROOMS_AT_ONCE, Processor, Reaction};
use crate::model::{Membership, Message, Verdict};
use crate::protocol::{ChatMessage, ServerMessage};
use crate::react::{Decision, Effect, Recipient, Route, send_to_room};
use crate::rules::{CallRecord, Lookups, MessageInput, RecordAt};
use crate::store::StoreError;

/// A message INSERT: gathers the verdict and the members, then states the reaction.
pub(super) async fn sent(
    p: &Processor,
    m: &Message,
    sequence: &str,
    lookups: &Lookups,
) -> Result<Reaction, StoreError> {
    let (mut decision, route, plugin_calls) = verdict(p, m, sequence, lookups).await?;
    let mut members = p.room_members(&m.tenant, &m.room, true).await?;
    members.extend(extra_members(p, &m.tenant, &route).await?);
    if p.refused_sender(&m.tenant, &m.room, &m.sender_connection_id, &members).await? {
        decision = Decision::Reject { reason: format!("you are not a member of room {:?}", m.room) };
    }
    let effects = react(m, &members, &decision, &route);
    Ok(Reaction { effects, plugin_calls, room_size: Some(members.len()), ..Reaction::default() })
}

/// The tenant's rules' verdict and route (deliver as written, to the room, without rules).
async fn verdict(
    p: &Processor,
    m: &Message,
    sequence: &str,
    lookups: &Lookups,
) -> Result<(Decision, Route, Vec<CallRecord>), StoreError> {
    let as_written = (Decision::Deliver { rewritten: None }, Route::default(), Vec::new());
    let Some(rules) = p.rules.as_deref() else { return Ok(as_written) };
    p.ensure_loaded(rules, &m.tenant, lookups).await?;
    let message = MessageInput {
        id: m.id.clone(),
        tenant: m.tenant.clone(),
        room: m.room.clone(),
        user_id: m.user_id.clone(),
        body: m.body.clone(),
        timestamp: crate::model::format_ts(&m.timestamp),
    };
    // The record's own time, never the clock: replay decides the same.
    let at = RecordAt { time_ms: m.timestamp.timestamp_millis().max(0) as u64, sequence: sequence.into() };
    Ok(match rules.decide_message(&message, &at).await {
        Some((decision, route, calls)) => (decision, route, calls),
        None => as_written,
    })
}

/// The members of the route's extra rooms: already without repeats and within the tenant's limit
/// (the plugin host's `calls::narrow`); read a few at a time, not one after another. Read, not
/// kept: another room's records are ordered on their own key, so its version may not yet have
/// moved for a join or leave acknowledged before this message was written.
async fn extra_members(p: &Processor, tenant: &str, route: &Route) -> Result<Vec<Membership>, StoreError> {
    let reads: Vec<_> = route.extra_rooms.iter().map(|extra| p.room_members(tenant, extra, false)).collect();
    let mut members = Vec::new();
    for read in futures::stream::iter(reads).buffered(EXTRA_ROOMS_AT_ONCE).collect::<Vec<_>>().await {
        members.extend(read?);
    }
    Ok(members)
}

/// Pure. `members`: the room's live memberships (sender included), plus those of the route's
/// extra rooms. Rejected: marked so, and the sender told why. Delivered: marked when rewritten or
/// narrowed, kept in the extra rooms' history before any of their members is sent it, then one
/// frame to the chosen members.
pub fn react(m: &Message, members: &[Membership], decision: &Decision, route: &Route) -> Vec<Effect> {
    let mark =
        |verdict| Effect::MarkMessage { tenant: m.tenant.clone(), room: m.room.clone(), sk: m.sk.clone(), verdict };
    let rewritten = match decision {
        Decision::Reject { reason } => {
            let sender = members.iter().find(|member| member.connection_id == m.sender_connection_id);
            return std::iter::once(mark(Verdict::Rejected(reason.clone())))
                .chain(sender.map(|sender| Effect::Send {
                    payload: ServerMessage::Rejected { id: m.id.clone(), reason: reason.clone() },
                    recipients: vec![Recipient::from(sender)],
                }))
                .collect();
        }
        Decision::Deliver { rewritten } => rewritten,
    };
    let mut chat = ChatMessage::from(m);
    let mut effects = Vec::new();
    if let Some(text) = rewritten {
        chat.message = text.clone();
        effects.push(mark(Verdict::Rewritten(text.clone())));
    }
    if let Some(users) = &route.only_users {
        effects.push(mark(Verdict::Audience(users.clone())));
    }
    // Kept before it is sent, so that whoever got it can recover after it there.
    let delivered = (chat.message != m.body).then(|| chat.message.clone());
    if !route.extra_rooms.is_empty() {
        let copies =
            route.extra_rooms.iter().map(|room| m.kept_copy(room, delivered.clone(), route.only_users.clone()));
        effects.push(Effect::KeepCopies(copies.collect()));
    }
    let chosen = members
        .iter()
        .filter(|member| route.only_users.as_ref().is_none_or(|users| users.contains(&member.user_id)))
        .filter(|member| route.echo_to_sender || member.connection_id != m.sender_connection_id);
    effects.extend(send_to_room(ServerMessage::Message(chat), chosen));
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::react::tests::{conn, member, sent, t};

    #[test]
    fn a_message_reaches_every_member_sender_included_in_id_order() {
        let sender = conn("c2", "ann", &["general"], 0);
        let msg = Message::new(&sender, "general", "hi".into(), t(5), 60);
        let members = [member("c3", "bob", 1), member("c2", "ann", 0)];
        let out = sent(&react(&msg, &members, &Decision::Deliver { rewritten: None }, &Route::default()));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0["message"], "hi");
        assert_eq!(out[0].0["id"], msg.id.as_str());
        assert_eq!(out[0].1, vec!["c2", "c3"]);
    }

    #[test]
    fn plugin_decisions_reject_rewrite_and_route() {
        let sender = conn("c2", "ann", &["general"], 0);
        let msg = Message::new(&sender, "general", "hi".into(), t(5), 60);
        let members = [member("c2", "ann", 0), member("c3", "bob", 1), member("c4", "cid", 1)];
        let with = |decision: Decision, route: Route| sent(&react(&msg, &members, &decision, &route));
        let rejected = with(Decision::Reject { reason: "no".into() }, Route::default());
        assert_eq!(
            rejected,
            vec![(serde_json::json!({"action":"rejected","id":msg.id,"reason":"no"}), vec!["c2".to_string()])]
        );

        let rewritten = with(Decision::Deliver { rewritten: Some("HI".into()) }, Route::default());
        assert_eq!(rewritten[0].0["message"], "HI");
        assert_eq!(rewritten[0].1, vec!["c2", "c3", "c4"]);

        let only = Route { only_users: Some(vec!["bob".into(), "ann".into()]), ..Route::default() };
        assert_eq!(with(Decision::Deliver { rewritten: None }, only)[0].1, vec!["c2", "c3"]);
        let no_echo = Route { echo_to_sender: false, ..Route::default() };
        assert_eq!(with(Decision::Deliver { rewritten: None }, no_echo)[0].1, vec!["c3", "c4"]);
    }
}
