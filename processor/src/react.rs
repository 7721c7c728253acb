//! The reaction's vocabulary: what a record's kind module ([`crate::pipeline`]) states purely
//! and [`crate::deliver`] performs — [`Effect`]s to [`Recipient`]s — and the frames several kinds
//! share (a room's fan-out, a reconnect's recovery, presence).
//!
//! No I/O happens here. Each kind's own reaction is a pure function beside the code that gathers
//! what it needs: [`connection::welcome`](crate::pipeline::connection::welcome) and
//! [`closed`](crate::pipeline::connection::closed), [`membership::react`](crate::pipeline::membership::react),
//! [`message::react`](crate::pipeline::message::react), [`signal::react`](crate::pipeline::signal::react).
//! Replay prints the same effects.

use chrono::{DateTime, Utc};

pub use crate::model::Verdict;
use crate::model::{LeftReason, Membership};
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

impl From<&crate::model::UserRecipient> for Recipient {
    fn from(r: &crate::model::UserRecipient) -> Self {
        Recipient { connection_id: r.connection_id.clone(), endpoint: r.endpoint.clone(), connected_at: r.connected_at }
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

/// Per room, the messages a reconnect missed (oldest first), or why they cannot all be given.
pub type Recovery = Vec<(String, Result<Vec<ChatMessage>, String>)>;

/// The missed messages of each room, then its `recover` frame, to one connection.
pub fn recovery_to(recipient: Recipient, recovery: &[(String, Result<Vec<ChatMessage>, String>)]) -> Vec<Effect> {
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

/// A `presence` frame for `m`'s user in its room.
pub fn presence_frame(m: &Membership, p: &PresenceDecision, event: PresenceEvent, reason: &str) -> ServerMessage {
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

/// One payload to each of `members`' connections (sorted by id, each once); nothing when none.
pub fn send_to_room<'a>(payload: ServerMessage, members: impl IntoIterator<Item = &'a Membership>) -> Vec<Effect> {
    let mut recipients: Vec<Recipient> = members.into_iter().map(Recipient::from).collect();
    recipients.sort_unstable();
    recipients.dedup_by(|a, b| a.connection_id == b.connection_id);
    if recipients.is_empty() {
        return Vec::new();
    }
    vec![Effect::Send { payload, recipients }]
}

#[cfg(test)]
pub(crate) mod tests {
    //! Fixtures the kinds' reaction tests share.
    use super::*;
    use crate::model::{Connection, JoinReason, Name, NewConnection};
    use chrono::TimeZone;

    pub(crate) fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_700_000_000_000 + ms).unwrap()
    }

    pub(crate) fn conn(id: &str, user: &str, rooms: &[&str], at: i64) -> Connection {
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

    pub(crate) fn member(id: &str, user: &str, at: i64) -> Membership {
        conn(id, user, &["general"], at).membership("general", JoinReason::Join, t(at))
    }

    /// Each `Send`: its payload as JSON and its recipients' connection ids.
    pub(crate) fn sent(effects: &[Effect]) -> Vec<(serde_json::Value, Vec<String>)> {
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
    fn a_room_is_sent_one_frame_each_connection_once_and_nothing_when_empty() {
        let (ann, bob) = (member("c2", "ann", 0), member("c1", "bob", 0));
        let frame = || ServerMessage::Recover {
            room: "general".into(),
            recovered: true,
            messages: Vec::new(),
            next: None,
            reason: None,
        };
        let out = sent(&send_to_room(frame(), [&ann, &bob, &ann]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, vec!["c1", "c2"]);
        assert!(send_to_room(frame(), std::iter::empty::<&Membership>()).is_empty());
    }
}
