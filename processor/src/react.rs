//! Pure: a [`Change`] and a view of its room give a list of [`Effect`]s.
//!
//! No I/O happens here. The caller reads the room's live members (when [`room_needed`] says so)
//! and performs the effects ([`crate::deliver`]). Replay prints the same effects.
//!
//! | change                         | effects                                                      |
//! |--------------------------------|--------------------------------------------------------------|
//! | connection INSERT              | `welcome` to that connection                                 |
//! | message INSERT                 | `message` to every live member of the room, sender included  |
//! | membership INSERT              | `presence joined` to the room, unless the user was already in |
//! | membership REMOVE              | `presence left` to the room, when the user's last connection goes |
//! | connection REMOVE              | remove its memberships, reason `disconnect`/`expired`/`gone` |
//! | anything else                  | nothing                                                      |

use chrono::{DateTime, Utc};

use crate::model::{JoinReason, LeftReason, Membership};
use crate::protocol::{ChatMessage, PresenceEvent, ServerMessage};
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

/// What tenant plugins decided for this change; empty when there are no plugins.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decisions {
    pub message: Option<(Decision, Route)>,
    pub greeting: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// One payload to each recipient (sorted by connection id).
    Send { payload: ServerMessage, recipients: Vec<Recipient> },
    /// Delete a membership, saying why (its REMOVE record then yields presence `left`).
    RemoveMembership { tenant: String, room: String, connection_id: String, reason: LeftReason },
}

/// The room whose live members [`react`] needs to see for this change, if any.
pub fn room_needed(change: &Change) -> Option<(&str, &str)> {
    match change {
        Change::Inserted(Record::Message(m)) => Some((&m.tenant, &m.room)),
        Change::Inserted(Record::Membership(m)) | Change::Removed { old: Record::Membership(m), .. } => {
            Some((&m.tenant, &m.room))
        }
        _ => None,
    }
}

/// `members`: the room's live memberships, read after the change was written (so an inserted
/// membership is among them and a removed one is not), plus those of a route's extra rooms.
/// Required when [`room_needed`] is `Some`.
pub fn react(change: &Change, members: &[Membership], decisions: &Decisions) -> Vec<Effect> {
    match change {
        Change::Inserted(Record::Connection(c)) => vec![Effect::Send {
            payload: ServerMessage::Welcome {
                connection_id: c.connection_id.clone(),
                tenant: c.tenant.clone(),
                user_id: c.user_id.clone(),
                rooms: c.rooms.iter().cloned().collect(),
                greeting: decisions.greeting.clone(),
            },
            recipients: vec![Recipient {
                connection_id: c.connection_id.clone(),
                endpoint: c.endpoint.clone(),
                connected_at: c.connected_at,
            }],
        }],
        Change::Inserted(Record::Message(m)) => {
            let (decision, route) =
                decisions.message.clone().unwrap_or((Decision::Deliver { rewritten: None }, Route::default()));
            match decision {
                Decision::Reject { reason } => members
                    .iter()
                    .find(|member| member.connection_id == m.sender_connection_id)
                    .map(|sender| Effect::Send {
                        payload: ServerMessage::Rejected { id: m.id.clone(), reason },
                        recipients: vec![Recipient::from(sender)],
                    })
                    .into_iter()
                    .collect(),
                Decision::Deliver { rewritten } => {
                    let mut chat = ChatMessage::from(m);
                    if let Some(text) = rewritten {
                        chat.message = text;
                    }
                    let chosen = members
                        .iter()
                        .filter(|member| route.only_users.as_ref().is_none_or(|users| users.contains(&member.user_id)))
                        .filter(|member| route.echo_to_sender || member.connection_id != m.sender_connection_id);
                    send_to_room(ServerMessage::Message(chat), chosen)
                }
            }
        }
        Change::Inserted(Record::Membership(joined)) => {
            if first_connection_of_user(joined, members) {
                let reason = match joined.join_reason {
                    JoinReason::Connect => "connect",
                    JoinReason::Join => "join",
                };
                send_to_room(presence(joined, PresenceEvent::Joined, reason), members)
            } else {
                Vec::new()
            }
        }
        Change::Removed { old: Record::Membership(left), cause } => {
            if members.iter().any(|m| m.user_id == left.user_id) {
                return Vec::new(); // the user is still in the room on another connection
            }
            let reason = match (cause, left.left_reason.as_deref().and_then(LeftReason::parse)) {
                (Cause::TtlExpired, _) => LeftReason::Expired,
                (Cause::Client, Some(reason)) => reason,
                (Cause::Client, None) => LeftReason::Leave,
            };
            send_to_room(presence(left, PresenceEvent::Left, reason.as_str()), members)
        }
        Change::Removed { old: Record::Connection(c), cause } => {
            let reason = match (cause, c.close_reason.as_deref().and_then(LeftReason::parse)) {
                (Cause::TtlExpired, _) => LeftReason::Expired,
                (Cause::Client, Some(reason)) => reason,
                (Cause::Client, None) => LeftReason::Disconnect,
            };
            c.rooms
                .iter()
                .map(|room| Effect::RemoveMembership {
                    tenant: c.tenant.clone(),
                    room: room.clone(),
                    connection_id: c.connection_id.clone(),
                    reason,
                })
                .collect()
        }
        // Plugin records are the pipeline's business (activation), not clients'.
        Change::Inserted(Record::Plugin(_) | Record::PluginChunk { .. } | Record::PluginActive(_))
        | Change::Modified { .. }
        | Change::Removed { .. }
        | Change::Unknown { .. } => Vec::new(),
    }
}

/// Whether `joined` is the user's earliest live connection in the room: by join time, then the
/// join's nanosecond order (two tabs in the same millisecond), then connection id. Records of one
/// room are processed in stream order, and an earlier join ranks first, so `joined` is announced
/// once: a later tab never outranks the one already announced, and of joins written together
/// exactly one is first.
fn first_connection_of_user(joined: &Membership, members: &[Membership]) -> bool {
    fn rank(m: &Membership) -> (DateTime<Utc>, Option<i64>, &str) {
        (m.joined_at, m.joined_ns, m.connection_id.as_str())
    }
    !members
        .iter()
        .any(|m| m.user_id == joined.user_id && m.connection_id != joined.connection_id && rank(m) < rank(joined))
}

fn presence(m: &Membership, event: PresenceEvent, reason: &str) -> ServerMessage {
    ServerMessage::Presence { room: m.room.clone(), user_id: m.user_id.clone(), event, reason: reason.into() }
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

    #[test]
    fn joined_is_announced_once_per_user_even_for_simultaneous_joins() {
        let first = member("c1", "ann", 0);
        let second = member("c2", "ann", 0); // same instant: the connection id breaks the tie
        let bob = member("c9", "bob", 0);
        let members = [first.clone(), second.clone(), bob];
        let a = react(&Change::Inserted(Record::Membership(first)), &members, &Decisions::default());
        let b = react(&Change::Inserted(Record::Membership(second)), &members, &Decisions::default());
        assert_eq!(sent(&a).len(), 1);
        assert_eq!(sent(&a)[0].0["event"], "joined");
        assert_eq!(sent(&a)[0].0["reason"], "join");
        assert_eq!(sent(&a)[0].1, vec!["c1", "c2", "c9"]);
        assert!(b.is_empty(), "the second tab must not re-announce: {b:?}");
    }

    #[test]
    fn a_later_tab_in_the_same_millisecond_never_re_announces() {
        // Seen in the gateway test: the first tab's join was processed alone and announced; the
        // second tab joined within the same millisecond, with a smaller connection id. Ranked by
        // (millisecond, id) alone it came first and announced Ann again.
        let first = member("zz-first", "ann", 0);
        let second = member("aa-second", "ann", 0);
        let bob = member("c9", "bob", 0);
        let alone = [first.clone(), bob.clone()];
        let a = react(&Change::Inserted(Record::Membership(first.clone())), &alone, &Decisions::default());
        assert_eq!(sent(&a).len(), 1, "the first tab announces");
        let both = [first, second.clone(), bob];
        let b = react(&Change::Inserted(Record::Membership(second)), &both, &Decisions::default());
        assert!(b.is_empty(), "the later tab must not re-announce: {b:?}");
    }

    #[test]
    fn left_waits_for_the_users_last_connection_and_names_the_reason() {
        let tab1 = member("c1", "ann", 0);
        let tab2 = member("c2", "ann", 1);
        let bob = member("c9", "bob", 0);
        let removed = |m: &Membership, cause| Change::Removed { old: Record::Membership(m.clone()), cause };
        assert!(react(&removed(&tab1, Cause::Client), &[tab2.clone(), bob.clone()], &Decisions::default()).is_empty());

        let out = sent(&react(&removed(&tab2, Cause::Client), std::slice::from_ref(&bob), &Decisions::default()));
        assert_eq!(out[0].0["event"], "left");
        assert_eq!(out[0].0["reason"], "leave");
        assert_eq!(out[0].1, vec!["c9"]);

        let marked = Membership { left_reason: Some("disconnect".into()), ..tab2.clone() };
        assert_eq!(
            sent(&react(&removed(&marked, Cause::Client), std::slice::from_ref(&bob), &Decisions::default()))[0].0["reason"],
            "disconnect"
        );
        assert_eq!(
            sent(&react(&removed(&tab2, Cause::TtlExpired), &[bob], &Decisions::default()))[0].0["reason"],
            "expired"
        );
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
                &Decisions { message: Some((decision, route)), greeting: None },
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
