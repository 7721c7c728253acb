//! Presence as state: who is in a room, changed one membership record at a time.
//!
//! The table keeps, per room, one [`Presence`] item per present user (the set of that user's
//! connections in the room) and one [`RoomPresence`] item (the count of users, and the room's
//! watermark). The processor alone writes them, from the membership records of the stream:
//!
//! * a membership INSERT adds its connection to the user's set; a membership REMOVE (a `leave`,
//!   the cascade of a closed, expired or gone connection, or TTL) takes it out;
//! * `joined` is announced only when a set goes from empty to not empty, `left` only when it
//!   becomes empty. Both adapters make each change atomic: the embedded store under its lock,
//!   DynamoDB with a version on each item, conditional writes, and a transaction when the count
//!   changes too. A write that loses a race is planned again from a fresh read.
//!
//! Why this holds under any interleaving: the records of one room share its partition key, and
//! DynamoDB Streams and Lambda keep their order. So a user's set is a fold of the room's
//! membership records in stream order, whatever the order in which connections closed, expired
//! or were cascaded on other partitions, and one batch or many give the same result.
//!
//! Redelivery: a transition also moves the room's watermark to the record's sequence number and
//! event id. A record at or below the watermark has been applied: it changes nothing, and if it
//! is the record at the watermark (the last transition, whose frames may not all have been sent)
//! it announces again, with the same frame id (the record's event id). Records between
//! transitions only add to or take from a non-empty set, which redelivery repeats harmlessly.

use chrono::{DateTime, Utc};

use crate::model::{Presence, RoomPresence};
use crate::protocol::PresenceEvent;

/// What a membership record does to presence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceOp {
    /// A membership INSERT: the connection is in the room.
    Add,
    /// A membership REMOVE: it is not.
    Remove,
}

/// One membership record, as presence sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceUpdate {
    pub tenant: String,
    pub room: String,
    pub user_id: String,
    pub connection_id: String,
    pub op: PresenceOp,
    /// The stream record's event id: the id of any presence frame this record announces.
    pub event_id: String,
    /// The stream record's sequence number as [`crate::model::sequence_key`]; `None` (records
    /// made by hand) applies without the redelivery check.
    pub seq: Option<String>,
    /// The record's time.
    pub at: DateTime<Utc>,
}

/// What a membership record did to presence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresenceOutcome {
    /// `joined` or `left`, when this record made (or, redelivered, had made) the transition.
    pub transition: Option<PresenceEvent>,
    /// The record was at or below the room's watermark: nothing changed.
    pub redelivered: bool,
    /// The room's users after the record, when known (a transition or a redelivery reads it).
    pub users: Option<u64>,
    /// The user's connections in the room after the record.
    pub connections: usize,
}

/// The writes one update needs, planned from the items as read.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "one short-lived plan per membership record")]
pub enum Plan {
    /// Nothing to write.
    Done(PresenceOutcome),
    Write {
        /// The user's item after the update; `None` deletes it.
        presence: Option<Presence>,
        /// The version the user's item must still have (`None`: it must not exist).
        presence_ver: Option<u64>,
        /// The room's item after a transition (its `ver` is one more than the one read).
        room: Option<RoomPresence>,
        outcome: PresenceOutcome,
    },
}

/// Plans `update` against the user's item and the room's item as read.
pub fn plan(update: &PresenceUpdate, current: Option<&Presence>, room: Option<&RoomPresence>) -> Plan {
    let connections = current.map_or(0, |p| p.connections.len());
    if let (Some(seq), Some(watermark)) = (&update.seq, room.and_then(|r| r.seq.as_ref()))
        && seq <= watermark
    {
        let again = room.and_then(|r| r.last_event.as_deref()) == Some(update.event_id.as_str());
        return Plan::Done(PresenceOutcome {
            transition: again.then_some(event_of(update.op)),
            redelivered: true,
            users: room.map(|r| r.users),
            connections,
        });
    }
    let unchanged = Plan::Done(PresenceOutcome { connections, ..PresenceOutcome::default() });
    let transition = |delta: i64, event: PresenceEvent| {
        let mut next = room.cloned().unwrap_or_else(|| RoomPresence::new(&update.tenant, &update.room));
        next.users = next.users.saturating_add_signed(delta);
        if update.seq.is_some() {
            next.seq = update.seq.clone();
        }
        next.last_event = Some(update.event_id.clone());
        next.ver += 1;
        (next.users, next, event)
    };
    match (update.op, current) {
        (PresenceOp::Add, Some(p)) if p.connections.contains(&update.connection_id) => unchanged,
        (PresenceOp::Add, Some(p)) => {
            let mut next = p.clone();
            next.connections.insert(update.connection_id.clone());
            next.ver += 1;
            let connections = next.connections.len();
            Plan::Write {
                presence: Some(next),
                presence_ver: Some(p.ver),
                room: None,
                outcome: PresenceOutcome { connections, ..PresenceOutcome::default() },
            }
        }
        (PresenceOp::Add, None) => {
            let mut next = Presence::new(&update.tenant, &update.room, &update.user_id, update.at);
            next.connections.insert(update.connection_id.clone());
            next.ver = 1;
            let (users, room, event) = transition(1, PresenceEvent::Joined);
            Plan::Write {
                presence: Some(next),
                presence_ver: None,
                room: Some(room),
                outcome: PresenceOutcome {
                    transition: Some(event),
                    redelivered: false,
                    users: Some(users),
                    connections: 1,
                },
            }
        }
        (PresenceOp::Remove, Some(p)) if p.connections.contains(&update.connection_id) => {
            if p.connections.len() == 1 {
                let (users, room, event) = transition(-1, PresenceEvent::Left);
                Plan::Write {
                    presence: None,
                    presence_ver: Some(p.ver),
                    room: Some(room),
                    outcome: PresenceOutcome {
                        transition: Some(event),
                        redelivered: false,
                        users: Some(users),
                        connections: 0,
                    },
                }
            } else {
                let mut next = p.clone();
                next.connections.remove(&update.connection_id);
                next.ver += 1;
                let connections = next.connections.len();
                Plan::Write {
                    presence: Some(next),
                    presence_ver: Some(p.ver),
                    room: None,
                    outcome: PresenceOutcome { connections, ..PresenceOutcome::default() },
                }
            }
        }
        // Not in the set: already taken out, or the membership predates presence state.
        (PresenceOp::Remove, _) => unchanged,
    }
}

fn event_of(op: PresenceOp) -> PresenceEvent {
    match op {
        PresenceOp::Add => PresenceEvent::Joined,
        PresenceOp::Remove => PresenceEvent::Left,
    }
}

/// One page of `who`: users in id order, each once with their connection count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WhoPage {
    pub users: Vec<(String, usize)>,
    /// Users in the room (the room's count).
    pub total: u64,
    /// Pass as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

/// The most users one `who` page lists, and how many a `join` ack carries.
pub const MAX_WHO_PAGE: usize = 500;
pub const DEFAULT_WHO_PAGE: usize = 100;
pub const JOIN_ACK_MEMBERS: usize = 20;

/// Rooms with more users than this announce no `joined`/`left` unless configured otherwise: a
/// room of N users where everyone joins costs N² presence posts.
pub const DEFAULT_ANNOUNCE_MAX_USERS: u64 = 100;

/// Whether a room of `users` (the user counted) announces `joined`/`left`.
pub fn announces(users: u64, max_users: u64) -> bool {
    users <= max_users
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn update(op: PresenceOp, conn: &str, seq: u64) -> PresenceUpdate {
        PresenceUpdate {
            tenant: "acme".into(),
            room: "general".into(),
            user_id: "ann".into(),
            connection_id: conn.into(),
            op,
            event_id: format!("e{seq}"),
            seq: Some(crate::model::sequence_key(&seq.to_string())),
            at: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
        }
    }

    /// Applies plans in a tiny model of the table.
    #[derive(Default)]
    struct Model {
        user: Option<Presence>,
        room: Option<RoomPresence>,
    }

    impl Model {
        fn apply(&mut self, u: &PresenceUpdate) -> PresenceOutcome {
            match plan(u, self.user.as_ref(), self.room.as_ref()) {
                Plan::Done(outcome) => outcome,
                Plan::Write { presence, room, outcome, .. } => {
                    self.user = presence;
                    if room.is_some() {
                        self.room = room;
                    }
                    outcome
                }
            }
        }
    }

    #[test]
    fn transitions_only_at_empty_and_a_redelivered_suffix_repeats_only_the_last_transition() {
        let records = [
            update(PresenceOp::Add, "c1", 1),
            update(PresenceOp::Add, "c2", 2),
            update(PresenceOp::Remove, "c1", 3),
            update(PresenceOp::Remove, "c2", 4),
        ];
        let mut m = Model::default();
        let events: Vec<_> = records.iter().map(|r| m.apply(r).transition).collect();
        assert_eq!(events, [Some(PresenceEvent::Joined), None, None, Some(PresenceEvent::Left)]);
        assert_eq!(m.room.as_ref().unwrap().users, 0);
        // Redeliver from every position: state unchanged, and only the record at the watermark
        // announces again.
        for from in 0..records.len() {
            let again: Vec<_> = records[from..].iter().map(|r| m.apply(r)).collect();
            assert!(again.iter().all(|o| o.redelivered));
            let announced: Vec<_> = again.iter().filter_map(|o| o.transition).collect();
            assert_eq!(announced, [PresenceEvent::Left], "from {from}");
            assert!(m.user.is_none());
            assert_eq!(m.room.as_ref().unwrap().users, 0);
        }
    }

    #[test]
    fn records_between_transitions_redeliver_harmlessly() {
        let mut m = Model::default();
        let records =
            [update(PresenceOp::Add, "c1", 1), update(PresenceOp::Add, "c2", 2), update(PresenceOp::Remove, "c2", 3)];
        for r in &records {
            m.apply(r);
        }
        for r in &records[1..] {
            assert_eq!(m.apply(r).transition, None);
        }
        assert_eq!(m.user.as_ref().unwrap().connections.iter().collect::<Vec<_>>(), ["c1"]);
        assert_eq!(m.room.as_ref().unwrap().users, 1);
    }

    #[test]
    fn a_remove_of_a_connection_never_added_changes_nothing() {
        let mut m = Model::default();
        assert_eq!(m.apply(&update(PresenceOp::Remove, "c9", 1)), PresenceOutcome::default());
        assert!(m.user.is_none() && m.room.is_none());
    }
}
