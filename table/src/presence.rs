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
//! Why this holds under the order DynamoDB Streams really delivers: records are ordered per item,
//! not per room. A room's membership records may sit on two shards (after a partition split) or
//! in two batches of one shard processed at once (`ParallelizationFactor`), in any interleaving;
//! only the records of one membership (one connection in one room) keep their order. So each
//! connection carries its own mark in its user's item, the sequence number of the last record
//! applied for it ([`crate::model::Presence::marks`]), and a connection is present exactly when
//! the newest record of its membership is an INSERT. Whether a user is present is a function of
//! their connections alone, and the room's count a sum over users, so every interleaving ends in
//! the same state: the live memberships.
//!
//! Redelivery: a record at or below its connection's mark has been applied; it changes nothing,
//! and if it made the user's last transition (`last_event`, whose frames may not all have been
//! sent) it announces again, with the same frame id (the record's event id). A user who leaves
//! keeps a tombstone item (the marks of their gone connections, with a TTL of two days), so an
//! INSERT redelivered or re-driven after its REMOVE adds nothing; a REMOVE whose INSERT never came
//! (lost to the dead-letter queue) leaves its mark too.
//!
//! What it costs: one item per user and room read and written per record (as before), a
//! tombstone left behind per departed user for two days (~200 bytes and no read on the hot path:
//! `who` skips it), and the room's count written on transitions only.

use chrono::{DateTime, Utc};

use crate::model::{Presence, RoomPresence};
use crate::protocol::PresenceEvent;
pub use crate::protocol::{DEFAULT_WHO_PAGE, JOIN_ACK_MEMBERS, MAX_WHO_PAGE, WhoPage};

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
    /// The record's time (its `ApproximateCreationDateTime`; the clock's for a record without
    /// one): a transition's version, so that a replay of the same records gives the same ones.
    pub time: DateTime<Utc>,
    /// The tenant's limit: rooms with more users announce no `joined`.
    pub announce_max_users: u64,
}

/// What a membership record did to presence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PresenceOutcome {
    /// `joined` or `left`, when this record made (or, redelivered, had made) the transition.
    pub transition: Option<PresenceEvent>,
    /// The record was at or below its connection's mark: nothing changed.
    pub redelivered: bool,
    /// The room's users after the record, when known (a transition or a redelivery reads it).
    pub users: Option<u64>,
    /// The user's connections in the room after the record.
    pub connections: usize,
    /// With a transition: its version ([`crate::model::Presence::version`]), the presence frame's
    /// `version`: a client keeps the highest per user.
    pub version: u64,
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

/// How long a room's count outlives its last user, and a user's tombstone their last connection
/// (DynamoDB's TTL then deletes them): longer than a record can wait in the stream (24 hours), so
/// a redelivery still finds the marks.
pub const EMPTY_ROOM_TTL_SECONDS: i64 = 2 * 86_400;

/// The most marks of gone connections a user's item keeps (the oldest go first): a user who
/// reconnects all day does not grow their item without bound. A record older than the 32nd
/// newest departure of the same user in the same room would have waited in the stream for 32
/// reconnections; it could add back a connection the sweeper then takes out again
/// (`roomcast_handlers::admin`'s reconciliation).
pub const MAX_GONE_MARKS: usize = 32;

/// Plans `update` against the user's item and the room's item as read.
///
/// Only the update's own connection's mark decides whether it was applied already: records of
/// one membership arrive in order (DynamoDB Streams' per-item order), those of other memberships
/// in any order, so nothing else — not the room's last change, not the user's — says anything
/// about this record. A user's transitions are decided on the user's item alone, and the room's
/// count only adds them up, which any order of users gives alike.
pub fn plan(update: &PresenceUpdate, current: Option<&Presence>, room: Option<&RoomPresence>) -> Plan {
    let read = Read { update, current, room };
    if let Some(done) = read.redelivered() {
        return done;
    }
    let connections = read.connections();
    let live = read.live();
    let unchanged = Plan::Done(PresenceOutcome { connections, ..PresenceOutcome::default() });
    match update.op {
        PresenceOp::Add if live => match update.seq {
            // Hand-made records carry no sequence number: nothing to move.
            None => unchanged,
            Some(_) => read.write(read.user_after(true), None, PresenceOutcome { connections, ..Default::default() }),
        },
        PresenceOp::Add if connections > 0 => {
            let next = read.user_after(true);
            let outcome = PresenceOutcome { connections: next.connections.len(), ..PresenceOutcome::default() };
            read.write(next, None, outcome)
        }
        PresenceOp::Add => read.joined(),
        PresenceOp::Remove if live && connections == 1 => read.left(),
        PresenceOp::Remove if live => {
            let next = read.user_after(false);
            let outcome = PresenceOutcome { connections: next.connections.len(), ..PresenceOutcome::default() };
            read.write(next, None, outcome)
        }
        // Not in the set. With a sequence number, the REMOVE still leaves its mark: its INSERT,
        // re-driven from the dead-letter queue after it (or lost and never applied), is older and
        // adds nothing.
        PresenceOp::Remove => match update.seq {
            None => unchanged,
            Some(_) => {
                let mut next = read.user_after(false);
                if !next.present() && next.ttl.is_none() {
                    next.ttl = Some(crate::model::expiry(update.now, EMPTY_ROOM_TTL_SECONDS));
                }
                read.write(next, None, PresenceOutcome { connections, ..PresenceOutcome::default() })
            }
        },
    }
}

/// One update and the items [`plan`] read for it: the pieces of its plan.
struct Read<'a> {
    update: &'a PresenceUpdate,
    current: Option<&'a Presence>,
    room: Option<&'a RoomPresence>,
}

impl Read<'_> {
    /// The user's live connections in the room, as read.
    fn connections(&self) -> usize {
        self.current.map_or(0, |p| p.connections.len())
    }

    /// Whether the update's connection is among them.
    fn live(&self) -> bool {
        self.current.is_some_and(|p| p.connections.contains(&self.update.connection_id))
    }

    /// `Done`, when the record is at or below its connection's mark: applied already. A redelivery
    /// of the record that made the user's last transition says that transition again.
    fn redelivered(&self) -> Option<Plan> {
        let (update, current) = (self.update, self.current);
        // An item written before marks per connection carries one `seq` (the user's last record
        // applied): it stands for every connection's mark.
        let mark = current.and_then(|p| {
            p.marks.get(&update.connection_id).or(if p.marks.is_empty() { p.seq.as_ref() } else { None })
        });
        let (Some(seq), Some(mark)) = (&update.seq, mark) else { return None };
        if seq > mark {
            return None;
        }
        let again = current.and_then(|p| p.last_event.as_deref()) == Some(update.event_id.as_str());
        Some(Plan::Done(PresenceOutcome {
            transition: again.then_some(event_of(update.op)),
            redelivered: true,
            users: self.room.map(|r| r.users),
            connections: self.connections(),
            announce: again && current.is_some_and(|p| p.announced),
            version: if again { current.map_or(0, |p| p.version) } else { 0 },
        }))
    }

    /// The room's item after a transition that moves its count by `delta`.
    fn room_after(&self, delta: i64) -> RoomPresence {
        let update = self.update;
        let mut next = self.room.cloned().unwrap_or_else(|| RoomPresence::new(&update.tenant, &update.room));
        next.users = next.users.saturating_add_signed(delta);
        // The watermark of processors before marks per connection means nothing now.
        next.seq = None;
        next.last_event = None;
        next.last_announced = false;
        next.ttl = (next.users == 0).then(|| crate::model::expiry(update.now, EMPTY_ROOM_TTL_SECONDS));
        next.ver += 1;
        next
    }

    /// The user's item with the record applied: its connection in or out, its mark moved.
    fn user_after(&self, live_after: bool) -> Presence {
        let update = self.update;
        let mut next = self
            .current
            .cloned()
            .unwrap_or_else(|| Presence::new(&update.tenant, &update.room, &update.user_id, update.at));
        if next.marks.is_empty() && next.seq.is_some() {
            // Carried over from an item written before marks: its connections keep its `seq`.
            let seq = next.seq.clone().unwrap_or_default();
            next.marks = next.connections.iter().map(|c| (c.clone(), seq.clone())).collect();
        }
        next.seq = None;
        if live_after {
            next.connections.insert(update.connection_id.clone());
        } else {
            next.connections.remove(&update.connection_id);
        }
        match &update.seq {
            Some(seq) => {
                next.marks.insert(update.connection_id.clone(), seq.clone());
            }
            None => {
                next.marks.remove(&update.connection_id);
            }
        }
        prune_gone_marks(&mut next);
        // A record of the connection came: it is not lost.
        next.suspects.remove(&update.connection_id);
        next.ver += 1;
        next
    }

    /// Writes the user's item (and the room's, with a transition), if the user's is as read.
    fn write(&self, next: Presence, room: Option<RoomPresence>, outcome: PresenceOutcome) -> Plan {
        Plan::Write { presence: Some(next), presence_ver: self.current.map(|p| p.ver), room, outcome }
    }

    /// The user's first connection in the room: `joined`.
    fn joined(&self) -> Plan {
        let update = self.update;
        let users = self.room.map_or(0, |r| r.users) + 1;
        // Announced when the room, with the user in it, is within its tenant's limit; the
        // `left` will be announced exactly when this `joined` was.
        let announce = announces(users, update.announce_max_users);
        let mut next = self.user_after(true);
        next.since = update.at;
        next.announced = announce;
        next.last_event = Some(update.event_id.clone());
        next.ttl = None;
        next.version = next_version(next.version, update.time);
        let outcome = PresenceOutcome {
            transition: Some(PresenceEvent::Joined),
            redelivered: false,
            users: Some(users),
            connections: 1,
            announce,
            version: next.version,
        };
        self.write(next, Some(self.room_after(1)), outcome)
    }

    /// The user's last connection in the room gone: `left`. The user's item stays as a tombstone
    /// (its marks) until its TTL.
    fn left(&self) -> Plan {
        let update = self.update;
        let mut next = self.user_after(false);
        let announce = next.announced;
        next.last_event = Some(update.event_id.clone());
        next.ttl = Some(crate::model::expiry(update.now, EMPTY_ROOM_TTL_SECONDS));
        next.version = next_version(next.version, update.time);
        let version = next.version;
        let room = self.room_after(-1);
        // Nothing to remember (records made by hand carry no sequence number): no tombstone.
        let next = if next.marks.is_empty() { None } else { Some(next) };
        let outcome = PresenceOutcome {
            transition: Some(PresenceEvent::Left),
            redelivered: false,
            users: Some(room.users),
            connections: 0,
            announce,
            version,
        };
        Plan::Write { presence: next, presence_ver: self.current.map(|p| p.ver), room: Some(room), outcome }
    }
}

/// How long a live connection of a presence item may go without a live membership before the
/// sweeper takes it out (`ROOMCAST_PRESENCE_REPAIR_GRACE_SECONDS`): longer than the stream keeps
/// retrying a record (`MaximumRecordAgeInSeconds: 3600` in `template.yaml`), so a REMOVE that is
/// late, not lost, is applied (and announced) first. With the sweep every 5 minutes, presence
/// outlives a membership whose REMOVE was lost by at most 80 minutes.
pub const RECONCILE_GRACE_SECONDS: i64 = 4_500;

/// The sequence number a repair carries: one above the connection's mark (the INSERT that made
/// it present). Its lost REMOVE has a sequence number at least that high, so, re-driven later,
/// it changes nothing; the connection's next INSERT (a later record) is above it and counts.
pub fn repair_seq(mark: Option<&String>) -> String {
    let mut digits: Vec<u8> = crate::model::sequence_key(mark.map_or("0", String::as_str)).into_bytes();
    for d in digits.iter_mut().rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            return String::from_utf8(digits).unwrap_or_default();
        }
    }
    // All nines: one more digit (wider than any key, so above it).
    let mut wider = vec![b'1'];
    wider.extend(digits);
    String::from_utf8(wider).unwrap_or_default()
}

/// What the sweeper does with one user's presence, given the connections the room's live
/// memberships hold for that user: the suspects to keep (a live connection without a
/// membership, with when it was first found so) and the connections to take out (suspect for
/// `grace_seconds`).
pub fn reconcile(
    p: &Presence,
    members: &std::collections::HashSet<String>,
    now: DateTime<Utc>,
    grace_seconds: i64,
) -> (std::collections::BTreeMap<String, i64>, Vec<String>) {
    let now = now.timestamp();
    let suspects: std::collections::BTreeMap<String, i64> = p
        .connections
        .iter()
        .filter(|c| !members.contains(*c))
        .map(|c| (c.clone(), p.suspects.get(c).copied().unwrap_or(now)))
        .collect();
    let repair = suspects.iter().filter(|(_, since)| now - **since >= grace_seconds).map(|(c, _)| c.clone()).collect();
    (suspects, repair)
}

/// A transition's version: the record's time (to the second) in milliseconds, unless that is not past the last one.
fn next_version(last: u64, now: DateTime<Utc>) -> u64 {
    // Whole seconds: DynamoDB Streams gives `ApproximateCreationDateTime` to the second (a record
    // captured with more, and the same record fetched from the stream again, agree).
    u64::try_from(now.timestamp().saturating_mul(1000)).unwrap_or_default().max(last + 1)
}

/// Drops the oldest marks of gone connections beyond [`MAX_GONE_MARKS`].
fn prune_gone_marks(p: &mut Presence) {
    let mut gone: Vec<(String, String)> =
        p.marks.iter().filter(|(c, _)| !p.connections.contains(*c)).map(|(c, seq)| (seq.clone(), c.clone())).collect();
    if gone.len() <= MAX_GONE_MARKS {
        return;
    }
    gone.sort();
    for (_, c) in gone.into_iter().take(p.marks.len() - p.connections.len() - MAX_GONE_MARKS) {
        p.marks.remove(&c);
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
/// redelivered): a user's item names one record, their last transition, so a batch cut off after
/// that record's writes and before its frames repeats that record's frames when it is redelivered
/// — as when each record is applied on its own. It also stops before the first
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
/// record's write can apply the room's next ones too ([`crate::store::PresenceStore::apply_presence_run`]).
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
    /// The record's time ([`PresenceUpdate::time`]).
    pub time: DateTime<Utc>,
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
            time: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
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
            assert!(!m.user.as_ref().unwrap().present(), "a tombstone, not a user");
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
    fn a_remove_before_its_insert_leaves_a_mark_the_insert_cannot_pass() {
        // The INSERT went to the dead-letter queue; its REMOVE came. Re-driven later, the INSERT
        // (an older sequence number of the same membership) adds nothing.
        let mut m = Model::default();
        assert_eq!(m.apply(&update(PresenceOp::Remove, "c9", 2)), PresenceOutcome::default());
        assert!(m.user.as_ref().is_some_and(|p| !p.present() && p.ttl.is_some()) && m.room.is_none());
        let redriven = m.apply(&update(PresenceOp::Add, "c9", 1));
        assert_eq!((redriven.transition, redriven.redelivered), (None, true));
        assert!(!m.user.as_ref().unwrap().present());
        // A later INSERT of the same membership (the connection joined again) is in.
        assert_eq!(m.apply(&update(PresenceOp::Add, "c9", 3)).transition, Some(PresenceEvent::Joined));
    }

    #[test]
    fn a_leave_handled_after_a_later_join_is_not_lost() {
        // The case: Y's leave (480) comes from another shard after X's join (500). Each
        // connection's own mark decides, so the leave applies.
        let mut m = Model::default();
        let of = |user: &str, op, conn: &str, seq| PresenceUpdate { user_id: user.into(), ..update(op, conn, seq) };
        m.apply(&of("y", PresenceOp::Add, "y1", 400));
        m.apply(&of("x", PresenceOp::Add, "x1", 500));
        let left = m.apply(&of("y", PresenceOp::Remove, "y1", 480));
        assert_eq!((left.transition, left.redelivered), (Some(PresenceEvent::Left), false));
        assert_eq!(m.room.as_ref().unwrap().users, 1);
        assert!(!m.users["y"].present() && m.users["x"].present());
    }

    #[test]
    fn a_repair_is_one_above_the_mark_so_the_lost_remove_is_old_and_a_rejoin_counts() {
        let mark = crate::model::sequence_key("1299");
        assert_eq!(repair_seq(Some(&mark)), crate::model::sequence_key("1300"));
        assert_eq!(repair_seq(None), crate::model::sequence_key("1"));
        let mut m = Model::default();
        m.apply(&update(PresenceOp::Add, "c1", 1299));
        let repair = PresenceUpdate {
            seq: Some(repair_seq(m.user.as_ref().unwrap().marks.get("c1"))),
            ..update(PresenceOp::Remove, "c1", 0)
        };
        assert_eq!(m.apply(&repair).transition, Some(PresenceEvent::Left));
        // The lost REMOVE (1300) turns up: nothing; the connection joins again (1400): present.
        let late = m.apply(&update(PresenceOp::Remove, "c1", 1300));
        assert_eq!((late.transition, late.redelivered), (None, true));
        assert_eq!(m.apply(&update(PresenceOp::Add, "c1", 1400)).transition, Some(PresenceEvent::Joined));
    }

    #[test]
    fn gone_marks_are_bounded_and_live_ones_kept() {
        let mut m = Model::default();
        m.apply(&update(PresenceOp::Add, "keep", 1));
        for i in 0..100u64 {
            m.apply(&update(PresenceOp::Add, &format!("t{i}"), 10 + 2 * i));
            m.apply(&update(PresenceOp::Remove, &format!("t{i}"), 11 + 2 * i));
        }
        let p = m.user.as_ref().unwrap();
        assert_eq!(p.marks.len(), 1 + MAX_GONE_MARKS);
        assert!(p.marks.contains_key("keep") && p.marks.contains_key("t99") && !p.marks.contains_key("t0"));
    }

    /// The records of `records` as DynamoDB Streams may deliver them: per membership (connection)
    /// in order, memberships interleaved as `seed` picks, and any record already applied delivered
    /// again at any later point (a retried batch, a re-drive from the dead-letter queue).
    fn per_item_order(records: &[PresenceUpdate], seed: u64) -> Vec<PresenceUpdate> {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut queues: Vec<std::collections::VecDeque<PresenceUpdate>> = Vec::new();
        let mut index: std::collections::HashMap<String, usize> = Default::default();
        for r in records {
            let at = *index.entry(r.connection_id.clone()).or_insert_with(|| {
                queues.push(Default::default());
                queues.len() - 1
            });
            queues[at].push_back(r.clone());
        }
        let mut delivered: Vec<PresenceUpdate> = Vec::new();
        let mut out = Vec::new();
        loop {
            let waiting: Vec<usize> = (0..queues.len()).filter(|&q| !queues[q].is_empty()).collect();
            if waiting.is_empty() {
                return out;
            }
            if !delivered.is_empty() && rng.u8(0..5) == 0 {
                out.push(delivered[rng.usize(0..delivered.len())].clone());
                continue;
            }
            let r = queues[waiting[rng.usize(0..waiting.len())]].pop_front().unwrap();
            delivered.push(r.clone());
            out.push(r);
        }
    }

    #[test]
    fn any_per_item_interleaving_with_redeliveries_ends_in_the_live_memberships() {
        for seed in 0..1_000 {
            let records = storm(seed, 40);
            // What the memberships say at the end: a connection is in when its last record is
            // an INSERT.
            let mut live: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
            for r in &records {
                let conns = live.entry(r.user_id.clone()).or_default();
                match r.op {
                    PresenceOp::Add => conns.insert(r.connection_id.clone()),
                    PresenceOp::Remove => conns.remove(&r.connection_id),
                };
            }
            live.retain(|_, c| !c.is_empty());
            let mut m = Model::default();
            // Each user's transitions as made, and as an observer deduplicating by frame id sees
            // the announced ones.
            let mut made: std::collections::HashMap<String, Vec<PresenceEvent>> = Default::default();
            let mut told: std::collections::HashMap<String, Vec<PresenceEvent>> = Default::default();
            let mut seen = std::collections::HashSet::new();
            for r in per_item_order(&records, seed) {
                let o = m.apply(&r);
                let Some(event) = o.transition else { continue };
                if !o.redelivered {
                    made.entry(r.user_id.clone()).or_default().push(event);
                }
                if o.announce && seen.insert(r.event_id.clone()) {
                    told.entry(r.user_id.clone()).or_default().push(event);
                }
            }
            let present: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = m
                .users
                .iter()
                .filter(|(_, p)| !p.connections.is_empty())
                .map(|(u, p)| (u.clone(), p.connections.clone()))
                .collect();
            assert_eq!(present, live, "seed {seed}");
            assert_eq!(m.room.as_ref().map_or(0, |r| r.users), live.len() as u64, "seed {seed}");
            for events in made.values().chain(told.values()) {
                let alternate = events
                    .iter()
                    .enumerate()
                    .all(|(i, e)| *e == if i % 2 == 0 { PresenceEvent::Joined } else { PresenceEvent::Left });
                assert!(alternate, "seed {seed}: {events:?}");
            }
        }
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
        // Ann is present; records that announce nothing (removes of connections never added)
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
        // The two removes leave their marks on u1's and u2's items; Ann's is not touched.
        assert_eq!(run.users.iter().map(|(u, _)| u.as_str()).collect::<Vec<_>>(), ["u1", "u2"]);
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
