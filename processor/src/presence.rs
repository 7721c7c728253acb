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

use std::collections::BTreeSet;

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
    /// The membership's join time (a new presence's `since`).
    pub at: DateTime<Utc>,
    /// Now, for the TTL of a room whose last user left.
    pub now: DateTime<Utc>,
    /// The tenant's limit: rooms with more users announce no `joined`.
    pub announce_max_users: u64,
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
    /// Whether the transition is announced: a `joined` when the room, with the user in it, was
    /// within its tenant's limit; a `left` when its `joined` was announced (so no roster keeps a
    /// user whose `left` was never told).
    pub announce: bool,
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

/// How long a room's count outlives its last user (DynamoDB's TTL then deletes it): longer than
/// a record can wait in the stream, so a redelivery still finds the watermark.
pub const EMPTY_ROOM_TTL_SECONDS: i64 = 2 * 86_400;

/// Plans `update` against the user's item and the room's item as read.
pub fn plan(update: &PresenceUpdate, current: Option<&Presence>, room: Option<&RoomPresence>) -> Plan {
    let connections = current.map_or(0, |p| p.connections.len());
    // Applied already: at or below the room's watermark (its last transition) or the user's own
    // (their last change between transitions).
    let watermark =
        [room.and_then(|r| r.seq.as_ref()), current.and_then(|p| p.seq.as_ref())].into_iter().flatten().max();
    if let (Some(seq), Some(watermark)) = (&update.seq, watermark)
        && seq <= watermark
    {
        let again = room.and_then(|r| r.last_event.as_deref()) == Some(update.event_id.as_str());
        return Plan::Done(PresenceOutcome {
            transition: again.then_some(event_of(update.op)),
            redelivered: true,
            users: room.map(|r| r.users),
            connections,
            announce: again && room.is_some_and(|r| r.last_announced),
        });
    }
    let unchanged = Plan::Done(PresenceOutcome { connections, ..PresenceOutcome::default() });
    let transition = |delta: i64, announce: bool| {
        let mut next = room.cloned().unwrap_or_else(|| RoomPresence::new(&update.tenant, &update.room));
        next.users = next.users.saturating_add_signed(delta);
        if update.seq.is_some() {
            next.seq = update.seq.clone();
        }
        next.last_event = Some(update.event_id.clone());
        next.last_announced = announce;
        next.ttl = (next.users == 0).then(|| crate::model::expiry(update.now, EMPTY_ROOM_TTL_SECONDS));
        next.ver += 1;
        next
    };
    // Between transitions the user's own item carries the record's sequence number.
    let changed = |p: &Presence, connections: BTreeSet<String>| {
        let mut next = p.clone();
        next.connections = connections;
        if update.seq.is_some() {
            next.seq = update.seq.clone();
        }
        next.ver += 1;
        let outcome = PresenceOutcome { connections: next.connections.len(), ..PresenceOutcome::default() };
        Plan::Write { presence: Some(next), presence_ver: Some(p.ver), room: None, outcome }
    };
    match (update.op, current) {
        (PresenceOp::Add, Some(p)) if p.connections.contains(&update.connection_id) => unchanged,
        (PresenceOp::Add, Some(p)) => {
            let mut connections = p.connections.clone();
            connections.insert(update.connection_id.clone());
            changed(p, connections)
        }
        (PresenceOp::Add, None) => {
            let users = room.map_or(0, |r| r.users) + 1;
            // Announced when the room, with the user in it, is within its tenant's limit; the
            // `left` will be announced exactly when this `joined` was.
            let announce = announces(users, update.announce_max_users);
            let mut next = Presence::new(&update.tenant, &update.room, &update.user_id, update.at);
            next.connections.insert(update.connection_id.clone());
            next.seq = update.seq.clone();
            next.announced = announce;
            next.ver = 1;
            Plan::Write {
                presence: Some(next),
                presence_ver: None,
                room: Some(transition(1, announce)),
                outcome: PresenceOutcome {
                    transition: Some(PresenceEvent::Joined),
                    redelivered: false,
                    users: Some(users),
                    connections: 1,
                    announce,
                },
            }
        }
        (PresenceOp::Remove, Some(p)) if p.connections.contains(&update.connection_id) => {
            if p.connections.len() == 1 {
                let room = transition(-1, p.announced);
                Plan::Write {
                    presence: None,
                    presence_ver: Some(p.ver),
                    outcome: PresenceOutcome {
                        transition: Some(PresenceEvent::Left),
                        redelivered: false,
                        users: Some(room.users),
                        connections: 0,
                        announce: p.announced,
                    },
                    room: Some(room),
                }
            } else {
                let mut connections = p.connections.clone();
                connections.remove(&update.connection_id);
                changed(p, connections)
            }
        }
        // Not in the set: already taken out.
        (PresenceOp::Remove, _) => unchanged,
    }
}

/// The most users one run changes: DynamoDB takes at most 100 writes in one transaction, and the
/// room's item is one of them.
pub const RUN_USERS: usize = 99;

/// The most connections the users a run changes may hold: their items, written in one
/// transaction, stay well within DynamoDB's 4 MB (a connection id is ~20 bytes; at most 128).
pub const RUN_CONNECTIONS: usize = 8_000;

/// The users whose items a run of `updates` reads: the first `max_users` (at least one), in
/// order of first appearance. [`plan_run`] ends before anyone else's record.
pub fn run_users(updates: &[PresenceUpdate], max_users: usize) -> Vec<&str> {
    let mut users: Vec<&str> = Vec::new();
    for u in updates {
        if !users.contains(&u.user_id.as_str()) {
            if users.len() >= max_users.max(1) {
                break;
            }
            users.push(&u.user_id);
        }
    }
    users
}

/// A run of one room's membership records, folded in stream order against the items as read
/// ([`plan_run`]): what DynamoDB writes in one transaction instead of a read and a write per
/// record. A join storm (API Gateway admits 500 new connections a second) is applied ~99 records
/// a round trip, at two write units per user.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunPlan {
    /// One outcome per record applied: a prefix of the run, never empty when the run is not.
    pub outcomes: Vec<PresenceOutcome>,
    /// Each user the run changed, in order of first change: their item after it (`None`: delete).
    pub users: Vec<(String, Option<Presence>)>,
    /// The room's item after the run, when a transition changed it.
    pub room: Option<RoomPresence>,
}

/// Folds `updates` (one room's, in stream order) with [`plan`], one after another, against the
/// users' items as read (`users`, by user id; a user not in it has no item) and the room's.
///
/// The run stops after the first record whose transition is announced (or re-announced, when
/// redelivered): the room's watermark names one record, the last transition, so a batch cut off
/// after that record's writes and before its frames repeats exactly that record's frames when it
/// is redelivered — as when each record is applied on its own. It also stops before the first
/// record of a user who is not among the first `max_users` users of `updates` (those are the
/// users whose items were read: [`run_users`]), and once the users changed hold more than
/// [`RUN_CONNECTIONS`] connections (a transaction's 4 MB).
pub fn plan_run(
    updates: &[PresenceUpdate],
    users: &std::collections::HashMap<String, Presence>,
    room: Option<&RoomPresence>,
    max_users: usize,
) -> RunPlan {
    let mut run = RunPlan { room: room.cloned(), ..RunPlan::default() };
    let mut room_changed = false;
    let mut state: std::collections::HashMap<&str, Option<Presence>> = std::collections::HashMap::new();
    let read = run_users(updates, max_users);
    for update in updates {
        let user = update.user_id.as_str();
        let connections: usize = run.users.iter().filter_map(|(_, p)| p.as_ref()).map(|p| p.connections.len()).sum();
        if !run.outcomes.is_empty() && (!read.contains(&user) || connections > RUN_CONNECTIONS) {
            break;
        }
        let current = match state.get(user) {
            Some(after) => after.as_ref(),
            None => users.get(user),
        };
        let outcome = match plan(update, current, run.room.as_ref()) {
            Plan::Done(outcome) => outcome,
            Plan::Write { presence, room, outcome, .. } => {
                state.insert(user, presence.clone());
                match run.users.iter_mut().find(|(u, _)| u == user) {
                    Some((_, after)) => *after = presence,
                    None => run.users.push((user.to_string(), presence)),
                }
                if room.is_some() {
                    run.room = room;
                    room_changed = true;
                }
                outcome
            }
        };
        let announced = outcome.transition.is_some() && outcome.announce;
        run.outcomes.push(outcome);
        if announced {
            break;
        }
    }
    if !room_changed {
        run.room = None;
    }
    run
}

/// A batch's membership records that change presence, per room in stream order, so that one
/// record's write can apply the room's next ones too ([`crate::store::Store::apply_presence_run`]).
/// Their outcomes wait here, by event id, until each record's turn comes.
#[derive(Debug, Default)]
pub struct PresenceRuns {
    rooms: std::collections::HashMap<(String, String), Vec<RunRecord>>,
    ahead: std::sync::Mutex<std::collections::HashMap<String, PresenceOutcome>>,
}

/// One membership record of a run.
#[derive(Clone, Debug)]
pub struct RunRecord {
    pub event_id: String,
    /// As [`crate::model::sequence_key`].
    pub seq: Option<String>,
    pub membership: crate::model::Membership,
    pub op: PresenceOp,
    /// A membership INSERT: its presence waits on the tenant's rules when they decide joins.
    pub inserted: bool,
}

impl PresenceRuns {
    /// The runs of a batch's records, given in stream order: only rooms with two or more.
    pub fn of(records: impl IntoIterator<Item = RunRecord>) -> PresenceRuns {
        let mut rooms: std::collections::HashMap<(String, String), Vec<RunRecord>> = Default::default();
        for r in records {
            rooms.entry((r.membership.tenant.clone(), r.membership.room.clone())).or_default().push(r);
        }
        rooms.retain(|_, records| records.len() > 1);
        PresenceRuns { rooms, ahead: Default::default() }
    }

    /// The room's records after `event_id`, in stream order (none when it is not among them).
    pub fn after(&self, tenant: &str, room: &str, event_id: &str) -> &[RunRecord] {
        let Some(records) = self.rooms.get(&(tenant.to_string(), room.to_string())) else { return &[] };
        match records.iter().position(|r| r.event_id == event_id) {
            Some(at) => &records[at + 1..],
            None => &[],
        }
    }

    /// Keeps the outcome of a record applied ahead of its turn.
    pub fn keep(&self, event_id: &str, outcome: PresenceOutcome) {
        self.ahead.lock().unwrap_or_else(|p| p.into_inner()).insert(event_id.to_string(), outcome);
    }

    /// The outcome of a record applied ahead of its turn, once.
    pub fn take(&self, event_id: &str) -> Option<PresenceOutcome> {
        self.ahead.lock().unwrap_or_else(|p| p.into_inner()).remove(event_id)
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
            now: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
            announce_max_users: 100,
        }
    }

    /// Applies plans in a tiny model of the table: one room, its users' items, Ann's at hand.
    #[derive(Default)]
    struct Model {
        users: std::collections::BTreeMap<String, Presence>,
        user: Option<Presence>,
        room: Option<RoomPresence>,
    }

    impl Model {
        fn apply(&mut self, u: &PresenceUpdate) -> PresenceOutcome {
            let current = self.users.get(&u.user_id).cloned();
            match plan(u, current.as_ref(), self.room.as_ref()) {
                Plan::Done(outcome) => outcome,
                Plan::Write { presence, room, outcome, .. } => {
                    match presence {
                        Some(p) => self.users.insert(u.user_id.clone(), p),
                        None => self.users.remove(&u.user_id),
                    };
                    self.user = self.users.get("ann").cloned();
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
    fn a_tab_that_leaves_and_rejoins_between_transitions_redelivers_harmlessly() {
        // Ann's two tabs are in; then, with no transition of the room after, tab 1 leaves and
        // rejoins and tab 2 leaves. Replayed, that stretch must not empty her set.
        let mut m = Model::default();
        m.apply(&update(PresenceOp::Add, "a1", 1));
        m.apply(&update(PresenceOp::Add, "a2", 2));
        let stretch = [
            update(PresenceOp::Remove, "a1", 3),
            update(PresenceOp::Add, "a1", 4),
            update(PresenceOp::Remove, "a2", 5),
        ];
        for r in &stretch {
            assert_eq!(m.apply(r).transition, None);
        }
        for from in 0..stretch.len() {
            for r in &stretch[from..] {
                let outcome = m.apply(r);
                assert_eq!((outcome.transition, outcome.redelivered), (None, true), "{r:?}");
            }
        }
        assert_eq!(m.user.as_ref().unwrap().connections.iter().collect::<Vec<_>>(), ["a1"]);
    }

    #[test]
    fn left_is_announced_exactly_when_its_joined_was() {
        let mut m = Model::default();
        let big = |op, conn: &str, seq, max| PresenceUpdate {
            user_id: conn.to_string(),
            announce_max_users: max,
            ..update(op, conn, seq)
        };
        // Two users in a room whose limit is 1: the first is announced, the second is not.
        assert!(m.apply(&big(PresenceOp::Add, "u1", 1, 1)).announce);
        assert!(!m.apply(&big(PresenceOp::Add, "u2", 2, 1)).announce);
        // The second leaves while the room is small again: still not announced, no ghost.
        let left = m.apply(&big(PresenceOp::Remove, "u2", 3, 1));
        assert_eq!((left.transition, left.announce), (Some(PresenceEvent::Left), false));
        let left = m.apply(&big(PresenceOp::Remove, "u1", 4, 1));
        assert_eq!((left.transition, left.announce), (Some(PresenceEvent::Left), true));
        // The empty room's count expires after its last user, later than any redelivery.
        assert!(m.room.as_ref().unwrap().ttl.is_some());
    }

    #[test]
    fn a_remove_of_a_connection_never_added_changes_nothing() {
        let mut m = Model::default();
        assert_eq!(m.apply(&update(PresenceOp::Remove, "c9", 1)), PresenceOutcome::default());
        assert!(m.user.is_none() && m.room.is_none());
    }

    impl Model {
        /// Applies a run as one write would: every user's item and the room's at once.
        fn apply_run(&mut self, updates: &[PresenceUpdate], max_users: usize) -> Vec<PresenceOutcome> {
            let users: std::collections::HashMap<String, Presence> =
                self.users.iter().map(|(u, p)| (u.clone(), p.clone())).collect();
            let run = plan_run(updates, &users, self.room.as_ref(), max_users);
            for (user, after) in run.users {
                match after {
                    Some(p) => self.users.insert(user, p),
                    None => self.users.remove(&user),
                };
            }
            if run.room.is_some() {
                self.room = run.room;
            }
            run.outcomes
        }
    }

    /// A seeded stream of one room's membership records: users with one or more tabs joining
    /// and leaving.
    fn storm(seed: u64, records: usize) -> Vec<PresenceUpdate> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut open: Vec<(String, String)> = Vec::new();
        let max = rng.u64(0..6);
        (1..=records as u64)
            .map(|seq| {
                let (op, user, conn) = if open.is_empty() || rng.u8(0..3) > 0 {
                    let user = format!("u{}", rng.u8(0..8));
                    let conn = format!("{user}-c{seq}");
                    open.push((user.clone(), conn.clone()));
                    (PresenceOp::Add, user, conn)
                } else {
                    let (user, conn) = open.swap_remove(rng.usize(0..open.len()));
                    (PresenceOp::Remove, user, conn)
                };
                PresenceUpdate { user_id: user, announce_max_users: max, ..update(op, &conn, seq) }
            })
            .collect()
    }

    #[test]
    fn a_run_applied_at_once_is_the_records_applied_one_by_one() {
        for seed in 0..300 {
            let records = storm(seed, 40);
            let mut one_by_one = Model::default();
            let expected: Vec<_> = records.iter().map(|r| one_by_one.apply(r)).collect();
            let max_users = 1 + seed as usize % 4;
            let mut runs = Model::default();
            let mut outcomes = Vec::new();
            while outcomes.len() < records.len() {
                let run = runs.apply_run(&records[outcomes.len()..], max_users);
                assert!(!run.is_empty(), "seed {seed}: a run applies at least its first record");
                // It ends at its first announced transition, and at its limit of users.
                let announced = run.iter().position(|o| o.transition.is_some() && o.announce);
                assert!(announced.is_none_or(|at| at == run.len() - 1), "seed {seed}: {run:?}");
                let changed: std::collections::BTreeSet<_> =
                    records[outcomes.len()..][..run.len()].iter().map(|r| &r.user_id).collect();
                assert!(changed.len() <= max_users, "seed {seed}");
                outcomes.extend(run);
            }
            assert_eq!(outcomes, expected, "seed {seed}");
            assert_eq!(runs.users, one_by_one.users, "seed {seed}");
            assert_eq!(runs.room, one_by_one.room, "seed {seed}");
        }
    }

    #[test]
    fn a_run_never_reaches_a_user_whose_item_was_not_read() {
        // Ann is present; records that change nothing (removes of connections never added)
        // come first from 3 other users, then Ann's second tab. With room for 2 users, the run
        // must stop before Ann's record: her item was not read.
        let mut m = Model::default();
        m.apply(&PresenceUpdate { user_id: "ann".into(), ..update(PresenceOp::Add, "a1", 1) });
        let noop = |user: &str, seq| PresenceUpdate { user_id: user.into(), ..update(PresenceOp::Remove, "x", seq) };
        let records = [noop("u1", 2), noop("u2", 3), noop("u3", 4), {
            PresenceUpdate { user_id: "ann".into(), ..update(PresenceOp::Add, "a2", 5) }
        }];
        assert_eq!(run_users(&records, 2), ["u1", "u2"]);
        // Only the users read are given, as the DynamoDB adapter gives them.
        let read: std::collections::HashMap<String, Presence> = m
            .users
            .iter()
            .filter(|(u, _)| ["u1", "u2"].contains(&u.as_str()))
            .map(|(u, p)| (u.clone(), p.clone()))
            .collect();
        let run = plan_run(&records, &read, m.room.as_ref(), 2);
        assert_eq!(run.outcomes.len(), 2, "{run:?}");
        assert!(run.users.is_empty());
    }

    #[test]
    fn a_run_cut_off_anywhere_and_redelivered_repeats_only_its_last_announcement() {
        for seed in 0..200 {
            let records = storm(seed, 30);
            // A batch applies its first run, then stops after any of its records (the frames
            // of the records after the cut were never sent) and is redelivered from there.
            let mut m = Model::default();
            let run = m.apply_run(&records, 99);
            let last = run.last().unwrap();
            let owed = (last.transition.is_some() && last.announce).then(|| records[run.len() - 1].event_id.clone());
            for cut in 0..run.len() {
                let mut again = Model { users: m.users.clone(), user: None, room: m.room.clone() };
                let redelivered = again.apply_run(&records[cut..run.len()], 99);
                assert!(redelivered.iter().all(|o| o.redelivered), "seed {seed}");
                let announced: Vec<_> = records[cut..run.len()]
                    .iter()
                    .zip(&redelivered)
                    .filter(|(_, o)| o.transition.is_some() && o.announce)
                    .map(|(r, _)| r.event_id.clone())
                    .collect();
                assert_eq!(announced, owed.iter().cloned().collect::<Vec<_>>(), "seed {seed}, cut {cut}");
                assert_eq!((again.users, again.room), (m.users.clone(), m.room.clone()), "seed {seed}");
            }
        }
    }
}
