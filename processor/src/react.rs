//! Pure: a [`Change`] and a view of its room give a list of [`Effect`]s.
//!
//! No I/O happens here. The caller applies membership records to presence ([`crate::presence`]),
//! reads the room's live members (when [`room_needed`] says so) and performs the effects
//! ([`crate::deliver`]). Replay prints the same effects.
//!
//! | change                         | effects                                                      |
//! |--------------------------------|--------------------------------------------------------------|
//! | connection INSERT              | `welcome` to that connection, with its rooms' counts          |
//! | message INSERT                 | `message` to every live member of the room, sender included  |
//! | membership INSERT              | `presence joined` to the room, when presence says the user became present and the room announces |
//! | membership REMOVE              | `presence left` to the room, when presence says the user is no longer present and the room announces |
//! | connection REMOVE              | remove its memberships, reason `disconnect`/`expired`/`gone` |
//! | anything else                  | nothing                                                      |

use chrono::{DateTime, Utc};

pub use crate::model::Verdict;
use crate::model::{JoinReason, LeftReason, Membership};
use crate::protocol::{ChatMessage, PresenceEvent, ServerMessage};

/// What a membership record did to its room's presence ([`crate::presence`]), as the pipeline
/// found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceDecision {
    /// `joined` or `left`, when the record made the user present or absent.
    pub event: Option<PresenceEvent>,
    /// The frame id: the record's event id.
    pub id: String,
    /// The room's users after the record, when known.
    pub users: Option<u64>,
    /// The user's connections in the room after the record.
    pub connections: usize,
    /// A redelivered record (at or below its connection's presence mark).
    pub redelivered: bool,
    /// Whether the room announces it (false: more users than the tenant's limit).
    pub announce: bool,
    /// The frame's `version`: grows with each transition of the user in the room.
    pub version: u64,
}

impl std::fmt::Display for PresenceDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.event {
            Some(event) => {
                let event = if event == PresenceEvent::Joined { "joined" } else { "left" };
                write!(f, "{event} (room users {})", self.users.unwrap_or_default())?;
                if !self.announce {
                    f.write_str(", not announced: the room is over its tenant's limit")?;
                }
            }
            None => write!(f, "no change (the user's connections here: {})", self.connections)?,
        }
        if self.redelivered {
            f.write_str(", redelivered")?;
        }
        Ok(())
    }
}
use crate::stream::{Cause, Change, Record};

/// Someone to send to, with what delivery needs to know about them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Recipient {
    pub connection_id: String,
    pub endpoint: String,
    /// For the 410 rule: a connection younger than a few seconds may not be open yet.
    pub connected_at: DateTime<Utc>,
}

impl From<&Membership> for Recipient {
    fn from(m: &Membership) -> Self {
        Recipient { connection_id: m.connection_id.clone(), endpoint: m.endpoint.clone(), connected_at: m.connected_at }
    }
}

/// A tenant plugin's decision about a message (the default: deliver it as written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Deliver { rewritten: Option<String> },
    Reject { reason: String },
}

/// Who receives a delivered message beyond the default (its room's members, sender included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Members of these rooms (same tenant) receive it too; the caller reads them into `members`.
    pub extra_rooms: Vec<String>,
    /// Only these users' connections receive it.
    pub only_users: Option<Vec<String>>,
    /// False: the sending connection does not get its own message back.
    pub echo_to_sender: bool,
}

impl Default for Route {
    fn default() -> Self {
        Route { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
    }
}

/// What was decided about this change before reacting: the tenant plugin's verdicts (none
/// without plugins), the room's presence, a welcome's room counts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    pub message: Option<(Decision, Route)>,
    pub greeting: Option<String>,
    pub presence: Option<PresenceDecision>,
    /// For a welcome: users present in each of the connection's rooms.
    pub counts: std::collections::BTreeMap<String, u64>,
    /// For a welcome after `?since=`: per room, the messages the client missed (oldest first), or
    /// why they cannot all be given.
    pub recovery: Vec<(String, Result<Vec<ChatMessage>, String>)>,
    /// A join the tenant's rules decided: denied (the reason), or allowed (the `ack` the joiner
    /// gets once present).
    pub join: Option<JoinOutcome>,
    /// The record's sender is not a member of the room (a tenant whose rules decide joins):
    /// nothing is delivered.
    pub dropped: bool,
}

/// What became of a join that waited for the tenant's rules.
#[derive(Clone, Debug, PartialEq)]
pub enum JoinOutcome {
    Denied(String),
    /// The join `ack` with the room's users, for the joiner.
    Allowed(ServerMessage),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// One payload to each recipient (sorted by connection id).
    Send { payload: ServerMessage, recipients: Vec<Recipient> },
    /// Delete a membership, saying why (its REMOVE record then yields presence `left`).
    RemoveMembership { tenant: String, room: String, connection_id: String, reason: LeftReason },
    /// Record on a message what its tenant's rules decided, so that `history` and `recover` give
    /// what members got: a rejected message is never listed, a rewritten one as rewritten.
    MarkMessage { tenant: String, room: String, sk: String, verdict: Verdict },
    /// Keep copies of a message, as delivered, in the history of the rooms the tenant's rules
    /// routed it into ([`crate::model::Message::kept_in`]), before any of their members is sent it.
    KeepCopies(Vec<crate::model::Message>),
    /// Close the connection's socket (`DELETE @connections`): one that kept going over its rate
    /// limit, after a frame saying why.
    Close(Recipient),
}

/// The room whose live members [`react`] needs to see for this change, if any: a message's, or
/// a membership's when its presence transition is announced.
pub fn room_needed<'a>(change: &'a Change, decisions: &Decisions) -> Option<(&'a str, &'a str)> {
    match change {
        Change::Inserted(Record::Message(m)) => Some((&m.tenant, &m.room)),
        Change::Inserted(Record::Signal(s)) => Some((&s.tenant, &s.room)),
        _ => match change.joined().or(change.left()) {
            Some(m) if announced(decisions).is_some() => Some((&m.tenant, &m.room)),
            _ => None,
        },
    }
}

/// The presence decision, when it is a transition the room announces.
fn announced(decisions: &Decisions) -> Option<&PresenceDecision> {
    decisions.presence.as_ref().filter(|p| p.event.is_some() && p.announce)
}

/// `members`: the room's live memberships, read after the change was written (so an inserted
/// membership is among them and a removed one is not), plus those of a route's extra rooms.
/// Required when [`room_needed`] is `Some`.
pub fn react(change: &Change, members: &[Membership], decisions: &Decisions) -> Vec<Effect> {
    match change {
        Change::Inserted(Record::Connection(c)) => std::iter::once(Effect::Send {
            payload: ServerMessage::Welcome {
                connection_id: c.connection_id.clone(),
                tenant: c.tenant.clone(),
                user_id: c.user_id.clone(),
                // Rooms waiting for the tenant's rules follow with their own `ack` or `join_denied`.
                rooms: c.rooms.iter().filter(|r| c.in_room(r)).cloned().collect(),
                greeting: decisions.greeting.clone(),
                counts: decisions.counts.clone(),
            },
            recipients: vec![Recipient {
                connection_id: c.connection_id.clone(),
                endpoint: c.endpoint.clone(),
                connected_at: c.connected_at,
            }],
        })
        .chain(recovery_effects(c, &decisions.recovery))
        // Rooms the token's `rooms` claim refused at `$connect`.
        .chain(c.denied.iter().map(|(room, reason)| Effect::Send {
            payload: ServerMessage::JoinDenied { room: room.clone(), reason: reason.clone() },
            recipients: vec![Recipient {
                connection_id: c.connection_id.clone(),
                endpoint: c.endpoint.clone(),
                connected_at: c.connected_at,
            }],
        }))
        .collect(),
        Change::Inserted(Record::Message(m)) => {
            let (decision, route) =
                decisions.message.clone().unwrap_or((Decision::Deliver { rewritten: None }, Route::default()));
            let mark = |verdict| Effect::MarkMessage {
                tenant: m.tenant.clone(),
                room: m.room.clone(),
                sk: m.sk.clone(),
                verdict,
            };
            match decision {
                Decision::Reject { reason } => std::iter::once(mark(Verdict::Rejected(reason.clone())))
                    .chain(members.iter().find(|member| member.connection_id == m.sender_connection_id).map(|sender| {
                        Effect::Send {
                            payload: ServerMessage::Rejected { id: m.id.clone(), reason },
                            recipients: vec![Recipient::from(sender)],
                        }
                    }))
                    .collect(),
                Decision::Deliver { rewritten } => {
                    let mut chat = ChatMessage::from(m);
                    let mut effects = Vec::new();
                    if let Some(text) = rewritten {
                        chat.message = text.clone();
                        effects.push(mark(Verdict::Rewritten(text)));
                    }
                    if let Some(users) = &route.only_users {
                        effects.push(mark(Verdict::Audience(users.clone())));
                    }
                    // Kept before it is sent, so that whoever got it can recover after it there.
                    let delivered = (chat.message != m.body).then(|| chat.message.clone());
                    if !route.extra_rooms.is_empty() {
                        effects.push(Effect::KeepCopies(
                            route
                                .extra_rooms
                                .iter()
                                .map(|room| m.kept_copy(room, delivered.clone(), route.only_users.clone()))
                                .collect(),
                        ));
                    }
                    let chosen = members
                        .iter()
                        .filter(|member| route.only_users.as_ref().is_none_or(|users| users.contains(&member.user_id)))
                        .filter(|member| route.echo_to_sender || member.connection_id != m.sender_connection_id);
                    effects.extend(send_to_room(ServerMessage::Message(chat), chosen));
                    effects
                }
            }
        }
        // A signal reaches the room's other members; it is never kept for history.
        Change::Inserted(Record::Signal(_)) if decisions.dropped => Vec::new(),
        Change::Inserted(Record::Signal(s)) => {
            let data = serde_json::from_str(&s.data).unwrap_or(serde_json::Value::Null);
            let payload =
                ServerMessage::Signal { id: s.id.clone(), room: s.room.clone(), user_id: s.user_id.clone(), data };
            send_to_room(payload, members.iter().filter(|member| member.connection_id != s.sender_connection_id))
        }
        Change::Inserted(Record::Membership(pending)) if pending.pending == Some(true) => match &decisions.join {
            Some(JoinOutcome::Denied(reason)) => vec![Effect::Send {
                payload: ServerMessage::JoinDenied { room: pending.room.clone(), reason: reason.clone() },
                recipients: vec![Recipient::from(pending)],
            }],
            // Allowed: its MODIFY makes it present and acknowledges it.
            _ => Vec::new(),
        },
        Change::Inserted(Record::Membership(_)) | Change::Modified { new: Record::Membership(_), .. } => {
            let Some(joined) = change.joined() else { return Vec::new() };
            let mut effects = match &decisions.join {
                Some(JoinOutcome::Denied(reason)) => {
                    return vec![Effect::Send {
                        payload: ServerMessage::JoinDenied { room: joined.room.clone(), reason: reason.clone() },
                        recipients: vec![Recipient::from(joined)],
                    }];
                }
                // The ack, then what the connection missed in the room if it reconnected with
                // `?since=` (held back until the rules allowed the room).
                Some(JoinOutcome::Allowed(ack)) => {
                    let mut effects =
                        vec![Effect::Send { payload: ack.clone(), recipients: vec![Recipient::from(joined)] }];
                    effects.extend(recovery_to(Recipient::from(joined), &decisions.recovery));
                    effects
                }
                None => Vec::new(),
            };
            if let Some(p) = announced(decisions).filter(|p| p.event == Some(PresenceEvent::Joined)) {
                let reason = match joined.join_reason {
                    JoinReason::Connect => "connect",
                    JoinReason::Join => "join",
                };
                effects.extend(send_to_room(presence(joined, p, PresenceEvent::Joined, reason), members));
            }
            effects
        }
        Change::Removed { old: Record::Membership(m), .. } if m.pending == Some(true) => Vec::new(),
        Change::Removed { old: Record::Membership(left), cause } => match announced(decisions) {
            Some(p) if p.event == Some(PresenceEvent::Left) => {
                let reason = match (cause, left.left_reason.as_deref().and_then(LeftReason::parse)) {
                    (Cause::TtlExpired, _) => LeftReason::Expired,
                    (Cause::Client, Some(reason)) => reason,
                    (Cause::Client, None) => LeftReason::Leave,
                };
                send_to_room(presence(left, p, PresenceEvent::Left, reason.as_str()), members)
            }
            _ => Vec::new(),
        },
        Change::Removed { old: Record::Connection(c), cause } => {
            let reason = match (cause, c.close_reason.as_deref().and_then(LeftReason::parse)) {
                (Cause::TtlExpired, _) => LeftReason::Expired,
                (Cause::Client, Some(reason)) => reason,
                (Cause::Client, None) => LeftReason::Disconnect,
            };
            let me = Recipient {
                connection_id: c.connection_id.clone(),
                endpoint: c.endpoint.clone(),
                connected_at: c.connected_at,
            };
            // A connection deleted for flooding is still open: told, then closed.
            let closing = (reason == LeftReason::RateLimited).then(|| {
                let payload = ServerMessage::Error {
                    code: crate::protocol::ErrorCode::RateLimited,
                    message: "this connection kept sending over its rate limit and is closed".into(),
                    retry_after_ms: None,
                };
                [Effect::Send { payload, recipients: vec![me.clone()] }, Effect::Close(me)]
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
        // Plugin records are the pipeline's business (activation), not clients'.
        Change::Inserted(
            Record::Plugin(_) | Record::PluginChunk { .. } | Record::PluginActive(_) | Record::State { .. },
        )
        | Change::Modified { .. }
        | Change::Removed { .. }
        | Change::Unknown { .. } => Vec::new(),
    }
}

/// After a welcome: each room's missed messages to the connection, in order, then a `recover`
/// frame saying whether that was all of them.
fn recovery_effects(
    c: &crate::model::Connection,
    recovery: &[(String, Result<Vec<ChatMessage>, String>)],
) -> Vec<Effect> {
    let me = Recipient {
        connection_id: c.connection_id.clone(),
        endpoint: c.endpoint.clone(),
        connected_at: c.connected_at,
    };
    recovery_to(me, recovery)
}

/// The missed messages of each room, then its `recover` frame, to one connection.
fn recovery_to(recipient: Recipient, recovery: &[(String, Result<Vec<ChatMessage>, String>)]) -> Vec<Effect> {
    let me = || vec![recipient.clone()];
    let mut effects = Vec::new();
    for (room, outcome) in recovery {
        let (recovered, reason) = match outcome {
            Ok(messages) => {
                effects.extend(
                    messages
                        .iter()
                        .map(|m| Effect::Send { payload: ServerMessage::Message(m.clone()), recipients: me() }),
                );
                (true, None)
            }
            Err(reason) => (false, Some(reason.clone())),
        };
        effects.push(Effect::Send {
            payload: ServerMessage::Recover { room: room.clone(), recovered, messages: Vec::new(), next: None, reason },
            recipients: me(),
        });
    }
    effects
}

fn presence(m: &Membership, p: &PresenceDecision, event: PresenceEvent, reason: &str) -> ServerMessage {
    ServerMessage::Presence {
        id: p.id.clone(),
        room: m.room.clone(),
        user_id: m.user_id.clone(),
        event,
        reason: reason.into(),
        users: p.users.unwrap_or_default(),
        version: p.version,
    }
}

fn send_to_room<'a>(payload: ServerMessage, members: impl IntoIterator<Item = &'a Membership>) -> Vec<Effect> {
    let mut recipients: Vec<Recipient> = members.into_iter().map(Recipient::from).collect();
    recipients.sort_unstable();
    recipients.dedup_by(|a, b| a.connection_id == b.connection_id);
    if recipients.is_empty() {
        return Vec::new();
    }
    vec![Effect::Send { payload, recipients }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Connection, Message, Name, NewConnection};
    use chrono::{Duration, TimeZone};

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_700_000_000_000 + ms).unwrap()
    }

    fn conn(id: &str, user: &str, rooms: &[&str], at: i64) -> Connection {
        Connection::new(NewConnection {
            connection_id: id,
            tenant: &Name::parse("tenant", "acme").unwrap(),
            user_id: user,
            connection_type: None,
            deployment_id: None,
            rooms: rooms.iter().map(|r| r.to_string()).collect(),
            endpoint: format!("https://gw/{id}"),
            now: t(at),
            ttl_seconds: 600,
        })
    }

    fn member(id: &str, user: &str, at: i64) -> Membership {
        conn(id, user, &["general"], at).membership("general", JoinReason::Join, t(at))
    }

    fn sent(effects: &[Effect]) -> Vec<(serde_json::Value, Vec<String>)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send { payload, recipients } => Some((
                    serde_json::to_value(payload).unwrap(),
                    recipients.iter().map(|r| r.connection_id.clone()).collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_new_connection_is_welcomed_alone() {
        let c = conn("c1", "ann", &["b", "a"], 0);
        let out = sent(&react(&Change::Inserted(Record::Connection(c)), &[], &Decisions::default()));
        assert_eq!(
            out,
            vec![(
                serde_json::json!({"action":"welcome","connection_id":"c1","tenant":"acme","user_id":"ann","rooms":["a","b"]}),
                vec!["c1".to_string()]
            )]
        );
    }

    #[test]
    fn a_message_reaches_every_member_sender_included_in_id_order() {
        let sender = conn("c2", "ann", &["general"], 0);
        let msg = Message::new(&sender, "general", "hi".into(), t(5), 60);
        let members = [member("c3", "bob", 1), member("c2", "ann", 0)];
        let out = sent(&react(&Change::Inserted(Record::Message(msg.clone())), &members, &Decisions::default()));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0["message"], "hi");
        assert_eq!(out[0].0["id"], msg.id.as_str());
        assert_eq!(out[0].1, vec!["c2", "c3"]);
    }

    fn decided(event: Option<PresenceEvent>, announce: bool) -> Decisions {
        Decisions {
            presence: Some(PresenceDecision {
                event,
                id: "ev-1".into(),
                users: Some(2),
                connections: 1,
                redelivered: false,
                announce,
                version: 1,
            }),
            ..Decisions::default()
        }
    }

    #[test]
    fn joined_is_announced_only_for_a_transition_the_room_announces() {
        let ann = member("c1", "ann", 0);
        let members = [ann.clone(), member("c9", "bob", 0)];
        let change = Change::Inserted(Record::Membership(ann));
        let out = sent(&react(&change, &members, &decided(Some(PresenceEvent::Joined), true)));
        assert_eq!(
            out,
            vec![(
                serde_json::json!({"action":"presence","id":"ev-1","room":"general","user_id":"ann","event":"joined","reason":"join","users":2,"version":1}),
                vec!["c1".to_string(), "c9".to_string()]
            )]
        );
        assert!(room_needed(&change, &decided(Some(PresenceEvent::Joined), true)).is_some());
        for quiet in [decided(None, true), decided(Some(PresenceEvent::Joined), false), Decisions::default()] {
            assert!(react(&change, &members, &quiet).is_empty(), "{quiet:?}");
            assert!(room_needed(&change, &quiet).is_none(), "no members are read for nothing to send");
        }
    }

    #[test]
    fn left_names_the_reason() {
        let tab = member("c2", "ann", 1);
        let bob = member("c9", "bob", 0);
        let removed = |m: &Membership, cause| Change::Removed { old: Record::Membership(m.clone()), cause };
        let left = decided(Some(PresenceEvent::Left), true);
        let out = sent(&react(&removed(&tab, Cause::Client), std::slice::from_ref(&bob), &left));
        assert_eq!(out[0].0["event"], "left");
        assert_eq!(out[0].0["reason"], "leave");
        assert_eq!(out[0].1, vec!["c9"]);

        let marked = Membership { left_reason: Some("disconnect".into()), ..tab.clone() };
        assert_eq!(
            sent(&react(&removed(&marked, Cause::Client), std::slice::from_ref(&bob), &left))[0].0["reason"],
            "disconnect"
        );
        assert_eq!(sent(&react(&removed(&tab, Cause::TtlExpired), &[bob], &left))[0].0["reason"], "expired");
    }

    #[test]
    fn a_removed_connection_removes_its_memberships_with_the_right_reason() {
        let c = conn("c1", "ann", &["a", "b"], 0);
        let reasons = |change: Change| -> Vec<(String, LeftReason)> {
            react(&change, &[], &Decisions::default())
                .into_iter()
                .map(|e| match e {
                    Effect::RemoveMembership { room, reason, .. } => (room, reason),
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        let client = Change::Removed { old: Record::Connection(c.clone()), cause: Cause::Client };
        assert_eq!(reasons(client), vec![("a".into(), LeftReason::Disconnect), ("b".into(), LeftReason::Disconnect)]);
        let ttl = Change::Removed { old: Record::Connection(c.clone()), cause: Cause::TtlExpired };
        assert_eq!(reasons(ttl)[0].1, LeftReason::Expired);
        let gone = Connection { close_reason: Some("gone".into()), ..c };
        assert_eq!(
            reasons(Change::Removed { old: Record::Connection(gone), cause: Cause::Client })[0].1,
            LeftReason::Gone
        );
    }

    #[test]
    fn plugin_decisions_reject_rewrite_and_route() {
        let sender = conn("c2", "ann", &["general"], 0);
        let msg = Message::new(&sender, "general", "hi".into(), t(5), 60);
        let members = [member("c2", "ann", 0), member("c3", "bob", 1), member("c4", "cid", 1)];
        let with = |decision: Decision, route: Route| {
            sent(&react(
                &Change::Inserted(Record::Message(msg.clone())),
                &members,
                &Decisions { message: Some((decision, route)), ..Decisions::default() },
            ))
        };
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

    #[test]
    fn modifications_and_unknown_records_do_nothing() {
        let c = conn("c1", "ann", &["a"], 0);
        let later = Connection { ttl: c.ttl + Duration::minutes(5).num_seconds(), ..c.clone() };
        assert!(
            react(
                &Change::Modified { old: Record::Connection(c), new: Record::Connection(later) },
                &[],
                &Decisions::default()
            )
            .is_empty()
        );
        assert!(react(&Change::Unknown { reason: "x".into() }, &[], &Decisions::default()).is_empty());
    }
}
