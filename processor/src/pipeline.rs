//! The processor: one stream record through decode → decide (tenant rules, presence) → react →
//! deliver, and whole batches through the batch runner. The same `Processor` serves the Lambda, the stream poller and `roomcast dev`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::dynamodb::EventRecord;
use aws_lambda_events::streams::DynamoDbEventResponse;
use futures::StreamExt;
use tracing::Instrument;
use tracing::field::Empty;

use crate::deliver::{Deliverer, Outcome, Window};
use crate::metrics::{Counts, Metrics};
use crate::model::Clock;
use crate::presence::{PresenceOp, PresenceRuns, PresenceUpdate, RunRecord};
use crate::protocol::ChatMessage;
use crate::react::JoinOutcome;
use crate::react::{self, Decisions, Effect, PresenceDecision};
use crate::rules::{
    CallRecord, JoinInput, JoinVerdict, Lookups, MessageInput, Mode, PluginAction, RecordAt, TenantRules, WelcomeInput,
};
use crate::store::{Rooms, Store, StoreError};
use crate::stream::Change;
use crate::stream::Record;
use crate::stream::batch::{BatchOutcome, run_batch};

/// What the processor did with one record.
#[derive(Debug)]
pub struct RecordReport {
    pub change: Change,
    pub effects: Vec<Effect>,
    /// Per recipient, sorted by connection id.
    pub outcomes: Vec<(String, Outcome)>,
    /// Tenant plugin calls made for this record.
    pub plugin_calls: Vec<CallRecord>,
    /// What a plugin record made the plugin lifecycle do (activate, reject, follow).
    pub plugin_actions: Vec<PluginAction>,
    /// What a membership record did to its room's presence.
    pub presence: Option<PresenceDecision>,
}

/// Time kept back from the Lambda deadline to answer and flush the logs.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(1000);
/// No record starts with less than this left before the batch's work must end: enough for its
/// reads and a delivery attempt. A record not started is reported for redelivery.
pub const START_RESERVE: Duration = Duration::from_millis(1000);

/// A membership this much older than the first record of a room without presence state was
/// written before presence was state (see `Processor::seed_presence`).
pub const LEGACY_MEMBERSHIP_AGE_SECONDS: i64 = 60;

/// The most messages a reconnect's `?since=` recovers per room; beyond, the client is told to
/// reload (`recover` with `recovered: false`), as Centrifugo does.
pub const MAX_RECOVERED: usize = 100;

/// The most messages one reconnect's `?since=` recovers across all its rooms.
pub const MAX_RECOVERED_AT_CONNECT: usize = 200;

/// A plugin's extra rooms read at once, per record.
pub const EXTRA_ROOMS_AT_ONCE: usize = 4;

pub struct Processor {
    store: Arc<dyn Store>,
    deliverer: Deliverer,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    partitions_at_once: usize,
    /// The tenants' rules (the plugin host), if any.
    rules: Option<Arc<dyn TenantRules>>,
    /// Who is in a room; the store when not set.
    rooms: Option<Arc<dyn Rooms>>,
    mode: Mode,
    /// Each batch's counts as CloudWatch metrics (the Lambda).
    emf: Option<crate::metrics::Emf>,
    /// Rooms with more users announce no `joined`/`left`, unless the tenant's settings say otherwise.
    announce_max_users: u64,
    /// A dry run's presence state: its own, in memory, so that it writes nothing to the table and
    /// decides the same on every run.
    scratch: Arc<dyn Store>,
    /// The rooms' members this container keeps, checked against each room's roster version.
    /// `None`: every record reads its room (`without_rosters`).
    rosters: Option<crate::roster::Rosters>,
    /// Where big frames go instead of being served in the batch (`with_hand_off`).
    hand_off: Option<crate::deliver::stage::HandOff>,
    /// Rooms whose messages this container staged, and when last: a room that shrinks below the
    /// threshold keeps staging for [`STAGED_ROOM_MEMORY`], so that its next message does not
    /// overtake one still queued.
    staged_rooms: std::sync::Mutex<HashMap<String, Instant>>,
    /// Whether a batch's membership records of one room are applied to presence in runs
    /// (`without_presence_runs`: one at a time, the figure before runs).
    presence_runs: bool,
}

/// How long a room whose messages were staged goes on staging them, whatever its size: as long
/// as a queued job can live (five receives of the fan-out queue's 360 s visibility).
pub const STAGED_ROOM_MEMORY: Duration = Duration::from_secs(30 * 60);

/// The most rooms a container remembers as staged; past it, the oldest are forgotten.
const STAGED_ROOMS_MAX: usize = 100_000;

impl Processor {
    pub fn new(
        store: Arc<dyn Store>,
        deliverer: Deliverer,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        partitions_at_once: usize,
    ) -> Processor {
        Processor {
            store,
            deliverer,
            metrics,
            partitions_at_once,
            rules: None,
            rooms: None,
            mode: Mode::Execute,
            emf: None,
            announce_max_users: crate::presence::DEFAULT_ANNOUNCE_MAX_USERS,
            scratch: crate::store::memory::MemoryStore::scratch(clock.clone()),
            rosters: Some(crate::roster::Rosters::default()),
            hand_off: None,
            staged_rooms: Default::default(),
            presence_runs: true,
            clock,
        }
    }

    /// Applies each membership record to presence on its own: two reads and a write each, as
    /// before runs (`roomcast bench joins --one-by-one`).
    pub fn without_presence_runs(mut self) -> Processor {
        self.presence_runs = false;
        self
    }

    /// Rooms with more users than `max` announce no `joined`/`left` (a tenant's settings override it).
    pub fn with_announce_max_users(mut self, max: u64) -> Processor {
        self.announce_max_users = max;
        self
    }

    /// Asks `rules` (the plugin host: `roomcast_plugin_host::PluginRules`) about messages and
    /// welcomes, and hands it the plugin records.
    pub fn with_rules(mut self, rules: Arc<dyn TenantRules>) -> Processor {
        self.rules = Some(rules);
        self
    }

    /// Decides and reports only (`roomcast replay`): nothing is written, and plugin records are
    /// shown, not activated. Set it through [`crate::assembly::Assembly::with_mode`], which makes
    /// the deliverer a dry run too.
    pub fn with_mode(mut self, mode: Mode) -> Processor {
        self.mode = mode;
        self
    }

    /// Prints each batch's counts as CloudWatch embedded metrics (see [`crate::metrics`]).
    pub fn with_emf(mut self, emf: crate::metrics::Emf) -> Processor {
        self.emf = Some(emf);
        self
    }

    /// The table this processor reads and writes.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Keeps rooms' members in `rosters` (the default keeps up to `roster::MAX_MEMBERS`).
    pub fn with_rosters(mut self, rosters: crate::roster::Rosters) -> Processor {
        self.rosters = Some(rosters);
        self
    }

    /// Hands frames for at least `hand_off.recipients` recipients to a fan-out stage
    /// ([`crate::deliver::stage`]): the record is done once they are queued.
    pub fn with_hand_off(mut self, hand_off: crate::deliver::stage::HandOff) -> Processor {
        self.hand_off = Some(hand_off);
        self
    }

    /// Performs a record's effects in order: big frames handed to the fan-out stage, if there
    /// is one, the rest here. The decision is the room's where it can be: every frame of a
    /// message or signal to a room of `hand_off.recipients` members or more is staged, however
    /// few it goes to (a plugin's narrowed route, a follow-up frame), so that a member of a big
    /// room gets all its frames through the same lane, in order. Other records' frames are
    /// staged when they are that big themselves.
    async fn perform(
        &self,
        effects: &[Effect],
        window: &Window,
        event_id: &str,
        room: Option<(&str, &str)>,
        room_size: Option<usize>,
    ) -> Result<Vec<(String, crate::deliver::Outcome)>, StoreError> {
        let stage = self.hand_off.as_ref().filter(|_| self.mode == Mode::Execute).zip(room);
        let Some((hand_off, (tenant, room))) = stage else {
            return self.deliverer.apply(effects, window, Some(event_id)).await;
        };
        // A big room now, or one this container staged lately (it may have shrunk since).
        let big_room = room_size.is_some() && self.staged_lately(tenant, room, hand_off.recipients, room_size);
        let mut outcomes = Vec::new();
        let mut start = 0;
        // Staged frames are numbered among themselves: effects before them (a plugin's mark)
        // may differ between attempts, and the jobs' ids must not.
        let mut staged = 0;
        // Each stretch of effects between two hand-offs keeps its big frames' progress under a
        // key of its own (the first stretch under the record's, as without a stage).
        let key = |start: usize| if start == 0 { event_id.to_string() } else { format!("{event_id}@{start}") };
        for (i, effect) in effects.iter().enumerate() {
            let Effect::Send { payload, recipients } = effect else { continue };
            if recipients.is_empty() || (!big_room && recipients.len() < hand_off.recipients) {
                continue;
            }
            outcomes.extend(self.deliverer.apply(&effects[start..i], window, Some(&key(start))).await?);
            let jobs = crate::deliver::stage::jobs(tenant, room, &format!("{event_id}#{staged}"), payload, recipients);
            staged += 1;
            let count = jobs.len();
            hand_off.stage.hand_off(jobs).await?;
            Metrics::add(&self.metrics.handed_off, recipients.len() as u64);
            tracing::info!(recipients = recipients.len(), jobs = count, "fan-out handed to the stage");
            outcomes.extend(recipients.iter().map(|r| (r.connection_id.clone(), crate::deliver::Outcome::Queued)));
            start = i + 1;
        }
        outcomes.extend(self.deliverer.apply(&effects[start..], window, Some(&key(start))).await?);
        outcomes.sort();
        Ok(outcomes)
    }

    /// Whether this container staged the room's messages within [`STAGED_ROOM_MEMORY`], and, if
    /// the room is big now (`room_size` at the threshold or more), remembers that it is staging.
    fn staged_lately(&self, tenant: &str, room: &str, threshold: usize, room_size: Option<usize>) -> bool {
        let key = crate::model::room_pk(tenant, room);
        let mut staged = self.staged_rooms.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if room_size.is_some_and(|n| n >= threshold) {
            if staged.len() >= STAGED_ROOMS_MAX && !staged.contains_key(&key) {
                staged.retain(|_, at| now.duration_since(*at) < STAGED_ROOM_MEMORY);
                if staged.len() >= STAGED_ROOMS_MAX
                    && let Some(oldest) = staged.iter().min_by_key(|(_, at)| **at).map(|(k, _)| k.clone())
                {
                    staged.remove(&oldest);
                }
            }
            staged.insert(key, now);
            return true;
        }
        match staged.get(&key) {
            Some(at) if now.duration_since(*at) < STAGED_ROOM_MEMORY => true,
            Some(_) => {
                staged.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Reads the room for every record that needs its members, as before containers kept rosters
    /// (the benchmark's `--no-roster`).
    pub fn without_rosters(mut self) -> Processor {
        self.rosters = None;
        self
    }

    /// Reads rooms' members from `rooms` instead of the store (replay's `--membership-from-stream`).
    pub fn with_rooms(mut self, rooms: Arc<dyn Rooms>) -> Processor {
        self.rooms = Some(rooms);
        self
    }

    /// The room's live members, not waiting for the tenant's rules: from this container's roster
    /// when `kept` and its version stands ([`crate::roster`]), else read.
    async fn room_members(
        &self,
        tenant: &str,
        room: &str,
        kept: bool,
    ) -> Result<Vec<crate::model::Membership>, StoreError> {
        let now = self.clock.now();
        let members = match &self.rooms {
            Some(rooms) => rooms.room_members(tenant, room, now).await?,
            None => match self.rosters.as_ref().filter(|_| kept) {
                None => {
                    Metrics::add(&self.metrics.roster_reads, 1);
                    self.store.room_members(tenant, room, now).await?
                }
                // Kept without joins waiting for the tenant's rules.
                Some(rosters) => {
                    let (members, _) = rosters.members(self.store.as_ref(), tenant, room, now, &self.metrics).await?;
                    return Ok(members.as_ref().clone());
                }
            },
        };
        // A join waiting for the tenant's rules gets nothing of the room.
        Ok(members.into_iter().filter(|m| m.pending != Some(true)).collect())
    }

    /// Many processor containers run at once, and a plugin change reaches only the one that
    /// processes its record. So the first time a batch meets a tenant, the tenant's `ACTIVE`
    /// pointer is read: an activation, rollback, disable or re-upload elsewhere takes effect here
    /// from the next batch on. A cold container loads the tenant's plugin the same way. Rooms of
    /// one batch run concurrently: all of them wait for that one look-up, so none runs without
    /// the plugin; a look-up that failed is tried again by the next record.
    async fn ensure_loaded(&self, rules: &dyn TenantRules, tenant: &str, lookups: &Lookups) -> Result<(), StoreError> {
        lookups.look_up(tenant).get_or_try_init(|| rules.refresh(tenant, self.mode)).await.map(|_| ())
    }

    /// Asks the tenant's plugin, if any, about this change.
    async fn decide(
        &self,
        change: &Change,
        sequence: &str,
        lookups: &Lookups,
    ) -> Result<(Decisions, Vec<CallRecord>), StoreError> {
        let mut decisions = Decisions::default();
        let mut calls = Vec::new();
        let Some(rules) = self.rules.as_deref() else { return Ok((decisions, calls)) };
        if let Change::Inserted(Record::Message(m)) = change {
            self.ensure_loaded(rules, &m.tenant, lookups).await?;
        }
        if let Change::Inserted(Record::Connection(c)) = change {
            self.ensure_loaded(rules, &c.tenant, lookups).await?;
        }
        match change {
            Change::Inserted(Record::Message(m)) => {
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
                if let Some((decision, route, made)) = rules.decide_message(&message, &at).await {
                    decisions.message = Some((decision, route));
                    calls = made;
                }
            }
            Change::Inserted(Record::Connection(c)) => {
                let info = WelcomeInput {
                    connection_id: c.connection_id.clone(),
                    tenant: c.tenant.clone(),
                    user_id: c.user_id.clone(),
                    rooms: c.rooms.iter().cloned().collect(),
                };
                let at =
                    RecordAt { time_ms: c.connected_at.timestamp_millis().max(0) as u64, sequence: sequence.into() };
                if let Some((greeting, call)) = rules.greeting(&info, &at).await {
                    decisions.greeting = greeting;
                    calls.push(call);
                }
            }
            _ => {}
        }
        Ok((decisions, calls))
    }

    /// A join that waits for the tenant's rules (or, from a connection opened before its plugin
    /// decided joins, one that did not wait): asks `authorize-join` and settles the membership —
    /// allowed, it loses `pending` (its MODIFY makes the user present and acknowledges the join);
    /// denied, it is deleted and the joiner gets `join_denied`. A dry run writes nothing.
    async fn authorize(
        &self,
        change: &Change,
        sequence: &str,
        lookups: &Lookups,
    ) -> Result<(Option<JoinOutcome>, Vec<CallRecord>), StoreError> {
        let (m, waited) = match (change.pending_join(), change) {
            (Some(m), _) => (m, true),
            (None, Change::Inserted(Record::Membership(m))) => (m, false),
            _ => return Ok((None, Vec::new())),
        };
        let Some(rules) = self.rules.as_deref() else {
            // No rules here at all (a processor without plugins): nothing decides; allow.
            if waited && self.mode == Mode::Execute {
                self.store.settle_join(m, true).await?;
            }
            return Ok((None, Vec::new()));
        };
        self.ensure_loaded(rules, &m.tenant, lookups).await?;
        if !waited && !rules.authorizes_joins(&m.tenant).await {
            return Ok((None, Vec::new()));
        }
        // A pending membership carries its connection's claims; one that did not wait (its
        // connection opened before the plugin decided joins) reads them from the connection.
        let claims = if waited {
            m.claims.clone()
        } else {
            match self.store.get_connection(&m.connection_id, self.clock.now()).await? {
                Some(conn) => conn.claims,
                // Gone already: its memberships are being removed; nothing to decide.
                None => return Ok((None, Vec::new())),
            }
        };
        let join = JoinInput {
            connection_id: m.connection_id.clone(),
            tenant: m.tenant.clone(),
            user_id: m.user_id.clone(),
            room: m.room.clone(),
            claims: claims.into_iter().collect(),
        };
        let at = RecordAt { time_ms: m.joined_at.timestamp_millis().max(0) as u64, sequence: sequence.into() };
        let (verdict, calls) = match rules.authorize_join(&join, &at).await {
            Some((verdict, call)) => (verdict, vec![call]),
            None => (JoinVerdict::Allow, Vec::new()),
        };
        let allowed = verdict == JoinVerdict::Allow;
        // Applied only to the membership it was made for: a redelivered or stale record's
        // decision changes nothing and tells the client nothing.
        if self.mode == Mode::Execute && !self.store.settle_join(m, allowed).await? {
            tracing::info!(user = %m.user_id, "join already decided (a redelivered or stale record)");
            return Ok((None, calls));
        }
        Metrics::add(if allowed { &self.metrics.joins_allowed } else { &self.metrics.joins_denied }, 1);
        tracing::info!(user = %m.user_id, allowed, waited, "join decided");
        Ok((
            match verdict {
                JoinVerdict::Allow => None,
                JoinVerdict::Deny(reason) => Some(JoinOutcome::Denied(reason)),
            },
            calls,
        ))
    }

    /// In a tenant whose rules decide joins, a message or signal whose sender is not an allowed
    /// member when the processor handles it is delivered only if the sender did not just have
    /// its join denied (or pending): one sent right after a join that is then denied (from a
    /// connection that did not wait) reaches no one, while one sent just before its sender left
    /// is delivered as ever. Backends' publishes have no sender connection.
    async fn drop_from_non_members(
        &self,
        change: &Change,
        members: &[crate::model::Membership],
        decisions: &mut Decisions,
    ) -> Result<(), StoreError> {
        let (tenant, room, sender) = match change {
            Change::Inserted(Record::Message(m)) => (&m.tenant, &m.room, &m.sender_connection_id),
            Change::Inserted(Record::Signal(s)) => (&s.tenant, &s.room, &s.sender_connection_id),
            _ => return Ok(()),
        };
        let Some(rules) = self.rules.as_deref() else { return Ok(()) };
        if sender.is_empty() || members.iter().any(|m| &m.connection_id == sender && m.room == *room) {
            return Ok(());
        }
        if !rules.authorizes_joins(tenant).await {
            return Ok(());
        }
        let Some(conn) = self.store.get_connection(sender, self.clock.now()).await? else { return Ok(()) };
        if !(conn.denied_rooms.contains(room) || conn.pending_rooms.contains(room)) {
            return Ok(());
        }
        tracing::info!(sender = %sender, "dropped: the sender's join of the room was denied or is pending");
        Metrics::add(&self.metrics.rejected, 1);
        decisions.message = Some((
            crate::react::Decision::Reject { reason: format!("you are not a member of room {room:?}") },
            crate::react::Route::default(),
        ));
        decisions.dropped = true;
        Ok(())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A room with memberships but no presence state yet (written before presence was state, or
    /// by a processor of an older version during a rolling deploy) starts from its live
    /// memberships, announcing nothing. Only memberships a minute older than the record being
    /// handled are taken: in a room that is simply new, the memberships written just after this
    /// one are later records of the same batch, and must be announced when their turn comes.
    /// The connection of a REMOVE is put in the seed (its INSERT was never applied).
    async fn seed_presence(
        &self,
        m: &crate::model::Membership,
        op: PresenceOp,
        max: u64,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<(), StoreError> {
        let reference = if op == PresenceOp::Add { m.joined_at } else { now };
        let mut members: Vec<(String, String, chrono::DateTime<chrono::Utc>)> = self
            .room_members(&m.tenant, &m.room, true)
            .await?
            .into_iter()
            .filter(|member| member.connection_id != m.connection_id)
            .filter(|member| member.joined_at < reference - chrono::Duration::seconds(LEGACY_MEMBERSHIP_AGE_SECONDS))
            .map(|member| (member.user_id, member.connection_id, member.joined_at))
            .collect();
        if op == PresenceOp::Remove {
            members.push((m.user_id.clone(), m.connection_id.clone(), m.joined_at));
        }
        if !members.is_empty() {
            tracing::info!(tenant = %m.tenant, room = %m.room, connections = members.len(), "seeding presence from the room's memberships");
        }
        for (user_id, connection_id, at) in members {
            let seed = PresenceUpdate {
                tenant: m.tenant.clone(),
                room: m.room.clone(),
                event_id: format!("seed-{connection_id}"),
                user_id,
                connection_id,
                op: PresenceOp::Add,
                seq: None,
                at,
                now,
                time: now,
                announce_max_users: max,
            };
            self.presence_state().apply_presence(&seed).await?;
        }
        Ok(())
    }

    /// The messages after `since` in a room (from a margin before it: a client keeps one copy
    /// per id), for a connection that reconnected with `?since=`: at most `budget` of them, or
    /// why they cannot all be given.
    async fn recover(
        &self,
        tenant: &str,
        room: &str,
        since: &str,
        budget: usize,
        viewer: &str,
    ) -> Result<Result<Vec<ChatMessage>, String>, StoreError> {
        let now = self.clock.now();
        let Some(sk) = crate::model::message_sk_of_id(since) else {
            return Ok(Err("that is not a message id".into()));
        };
        let Some(seen) = self.store.message(tenant, room, &sk, now).await? else {
            return Ok(Err("that message is no longer in history: reload the room".into()));
        };
        if budget == 0 {
            return Ok(Err(format!(
                "more than {MAX_RECOVERED_AT_CONNECT} messages to recover at connect: ask `recover` for this room"
            )));
        }
        let from = crate::store::recovery_start(&seen);
        let missed: Vec<_> = self
            .store
            .history(tenant, room, &from, budget.min(MAX_RECOVERED) + 2, now, Some(viewer))
            .await?
            .into_iter()
            .filter(|m| m.id != seen.id)
            .collect();
        if missed.len() > budget.min(MAX_RECOVERED) {
            return Ok(Err(format!(
                "more than {} messages were missed: reload the room, or ask `recover`",
                budget.min(MAX_RECOVERED)
            )));
        }
        Ok(Ok(missed.iter().map(ChatMessage::from).collect()))
    }

    /// Where presence state lives: the table, or a dry run's scratch copy.
    fn presence_state(&self) -> &Arc<dyn Store> {
        match self.mode {
            Mode::Execute => &self.store,
            Mode::DryRun => &self.scratch,
        }
    }

    /// A `joined` not told after all (the room past its limit): nor will its `left` be.
    async fn unannounce(&self, p: &mut PresenceDecision, m: &crate::model::Membership) -> Result<(), StoreError> {
        self.presence_state().unannounce(&m.tenant, &m.room, &m.user_id).await?;
        p.announce = false;
        Metrics::add(&self.metrics.presence_unannounced, 1);
        Ok(())
    }

    /// The tenant's announce limit: rooms with more users announce no `joined`/`left`.
    async fn announce_max_users(&self, tenant: &str, lookups: &Lookups) -> Result<u64, StoreError> {
        Ok(match lookups.settings(tenant).get_or_try_init(|| self.store.tenant_settings(tenant)).await? {
            Some(settings) => settings.presence_announce_max_users.unwrap_or(self.announce_max_users),
            None => self.announce_max_users,
        })
    }

    /// Applies a membership record to its room's presence ([`crate::presence`]) and decides
    /// whether the room announces the transition.
    async fn presence(
        &self,
        change: &Change,
        record: &EventRecord,
        lookups: &Lookups,
    ) -> Result<Option<PresenceDecision>, StoreError> {
        let (m, op) = match (change.joined(), change.left()) {
            (Some(m), _) => (m, PresenceOp::Add),
            (_, Some(m)) => (m, PresenceOp::Remove),
            _ => return Ok(None),
        };
        let max = self.announce_max_users(&m.tenant, lookups).await?;
        let state = self.presence_state();
        let now = self.clock.now();
        if lookups.first_time_in_batch(&m.tenant, &m.room)
            && state.room_presence(&m.tenant, &m.room).await?.is_none()
            && !state.migrate_presence(&m.tenant, &m.room).await?
        {
            self.seed_presence(m, op, max, now).await?;
        }
        let update_of = |m: &crate::model::Membership, op, event_id: &str, seq: Option<String>, time| PresenceUpdate {
            tenant: m.tenant.clone(),
            room: m.room.clone(),
            user_id: m.user_id.clone(),
            connection_id: m.connection_id.clone(),
            op,
            event_id: event_id.to_string(),
            seq,
            at: m.joined_at,
            now,
            time,
            announce_max_users: max,
        };
        let runs = lookups.presence_runs();
        let outcome = match runs.take(&record.event_id) {
            // Applied with an earlier record of the room, in its run.
            Some(outcome) => outcome,
            None => {
                let seq = record.change.sequence_number.as_deref().map(crate::model::sequence_key);
                let time = record_time(record).unwrap_or(now);
                let mut updates = vec![update_of(m, op, &record.event_id, seq, time)];
                let later = runs.after(&m.tenant, &m.room, &record.event_id);
                if !later.is_empty() {
                    // A later join that is an INSERT waits on the tenant's rules when they decide
                    // joins: the run ends before it.
                    let inserts_decided = match self.rules.as_deref() {
                        None => false,
                        Some(rules) => {
                            self.ensure_loaded(rules, &m.tenant, lookups).await?;
                            rules.authorizes_joins(&m.tenant).await
                        }
                    };
                    for r in later.iter().take_while(|r| !(r.inserted && inserts_decided)) {
                        updates.push(update_of(&r.membership, r.op, &r.event_id, r.seq.clone(), r.time));
                    }
                }
                let mut outcomes = state.apply_presence_run(&updates).await?.into_iter();
                let first = outcomes
                    .next()
                    .ok_or_else(|| StoreError::Unavailable(format!("presence of {} applied no record", m.room)))?;
                for (update, outcome) in updates[1..].iter().zip(outcomes) {
                    Metrics::add(&self.metrics.presence_ahead, 1);
                    runs.keep(&update.event_id, outcome);
                }
                first
            }
        };
        let announce = outcome.transition.is_some() && outcome.announce;
        if let Some(event) = outcome.transition {
            if !outcome.redelivered {
                let counter = match event {
                    crate::protocol::PresenceEvent::Joined => &self.metrics.presence_joined,
                    crate::protocol::PresenceEvent::Left => &self.metrics.presence_left,
                };
                Metrics::add(counter, 1);
            }
            if !announce {
                Metrics::add(&self.metrics.presence_unannounced, 1);
            }
        }
        if outcome.redelivered {
            Metrics::add(&self.metrics.presence_redelivered, 1);
        }
        let decision = PresenceDecision {
            event: outcome.transition,
            id: record.event_id.clone(),
            users: outcome.users,
            connections: outcome.connections,
            redelivered: outcome.redelivered,
            announce,
            version: outcome.version,
        };
        tracing::debug!(user = %m.user_id, presence = %decision, "presence");
        Ok(Some(decision))
    }

    /// One record on its own: decode, read the room if the change needs it, react, deliver.
    /// Only a platform fault (the table unavailable) is an error.
    pub async fn process_record(&self, record: &EventRecord) -> Result<RecordReport, StoreError> {
        let window = Window::unbounded();
        let report = self.process_in_batch(record, &Lookups::default(), &window).await;
        Metrics::add(&self.metrics.young_dropped, window.settle().await as u64);
        report
    }

    /// One record of a batch: the batch's `lookups` of `ACTIVE` pointers are shared; deliveries end
    /// within the batch's `window`.
    pub async fn process_in_batch(
        &self,
        record: &EventRecord,
        lookups: &Lookups,
        window: &Window,
    ) -> Result<RecordReport, StoreError> {
        let span = tracing::info_span!(
            "record",
            seq = record.change.sequence_number.as_deref().unwrap_or(""),
            event_id = %record.event_id,
            event = %record.event_name,
            tenant = Empty,
            room = Empty,
        );
        async {
            Metrics::add(&self.metrics.records, 1);
            let change = Change::from_record(record);
            if let Change::Unknown { reason } = &change {
                tracing::warn!(%reason, "skipping stream record");
                Metrics::add(&self.metrics.skipped, 1);
                return Ok(RecordReport {
                    change,
                    effects: Vec::new(),
                    outcomes: Vec::new(),
                    plugin_calls: Vec::new(),
                    plugin_actions: Vec::new(),
                    presence: None,
                });
            }
            let (tenant, room) = change.tenant_room();
            let span = tracing::Span::current();
            if let Some(tenant) = tenant {
                span.record("tenant", tenant);
            }
            if let Some(room) = room {
                span.record("room", room);
            }
            let mut plugin_actions = Vec::new();
            if let Some(rules) = &self.rules
                && change.is_plugin_record()
            {
                plugin_actions = rules.on_plugin_record(&change, self.mode).await?;
            }
            let sequence = record.change.sequence_number.as_deref().unwrap_or("");
            let (mut decisions, mut plugin_calls) = self.decide(&change, sequence, lookups).await?;
            let (join, join_calls) = self.authorize(&change, sequence, lookups).await?;
            plugin_calls.extend(join_calls);
            decisions.join = join;
            if decisions.join.is_none() {
                decisions.presence = self.presence(&change, record, lookups).await?;
            }
            if let (Change::Modified { .. }, Some(m)) = (&change, change.joined()) {
                // A join the tenant's rules allowed: its `ack`, with the room's users, now that
                // the joiner is among them.
                let page =
                    self.presence_state().who(&m.tenant, &m.room, crate::presence::JOIN_ACK_MEMBERS, None).await?;
                if m.join_reason == crate::model::JoinReason::Connect
                    && let Some(conn) = self.store.get_connection(&m.connection_id, self.clock.now()).await?
                    && let Some(since) = conn.recover.get(&m.room)
                {
                    // The connect's budget, shared by the rooms it recovers.
                    let share = (MAX_RECOVERED_AT_CONNECT / conn.recover.len().max(1)).max(1);
                    let recovered = self.recover(&m.tenant, &m.room, since, share, &m.user_id).await?;
                    decisions.recovery.push((m.room.clone(), recovered));
                }
                decisions.join = Some(JoinOutcome::Allowed(crate::protocol::ServerMessage::Ack {
                    request: "join".into(),
                    room: m.room.clone(),
                    id: None,
                    users: Some(page.total),
                    members: Some(crate::protocol::present_users(&page)),
                    pending: None,
                }));
            }
            if let Change::Inserted(Record::Connection(c)) = &change {
                // Counts only for rooms the connection is in: a pending room's size is not its yet.
                let rooms: Vec<String> = c.rooms.iter().filter(|r| c.in_room(r)).cloned().collect();
                let state = self.presence_state();
                let counts = crate::store::room_counts(state.as_ref(), &c.tenant, &c.user_id, &rooms).await?;
                decisions.counts = counts.into_iter().collect();
                // One budget for the whole connect: a reconnect into many busy rooms must not post
                // thousands of frames from one record (the rest is one `recover` away).
                let mut budget = MAX_RECOVERED_AT_CONNECT;
                // A room waiting for the tenant's rules recovers once they allow it (below).
                for (room, since) in c.recover.iter().filter(|(room, _)| !c.pending_rooms.contains(*room)) {
                    let recovered = self.recover(&c.tenant, room, since, budget, &c.user_id).await?;
                    if let Ok(messages) = &recovered {
                        budget = budget.saturating_sub(messages.len());
                    }
                    decisions.recovery.push((room.clone(), recovered));
                }
            }
            // A membership record reads its room afresh: its writer's bump of the roster version
            // may not have landed yet, and its announcement goes to the room as it is now.
            let membership = matches!(
                change,
                Change::Inserted(Record::Membership(_))
                    | Change::Modified { new: Record::Membership(_), .. }
                    | Change::Removed { old: Record::Membership(_), .. }
            );
            if let (Some(p), Some(m)) = (decisions.presence.as_mut(), change.joined())
                && p.announce
                && p.event == Some(crate::protocol::PresenceEvent::Joined)
                && lookups.past_limit(&m.tenant, &m.room)
            {
                // Found past its limit earlier in the batch (below): not read again.
                self.unannounce(p, m).await?;
            }
            let mut members = match react::room_needed(&change, &decisions) {
                Some((tenant, room)) => self.room_members(tenant, room, !membership).await?,
                None => Vec::new(),
            };
            if let (Some((_, route)), Some((tenant, _))) = (&decisions.message, react::room_needed(&change, &decisions))
            {
                // The plugin's extra rooms: already without repeats and within the tenant's
                // limit (the plugin host's `calls::narrow`); read a few at a time, not one after another.
                // Read, not kept: another room's records are ordered on their own key, so its
                // version may not yet have moved for a join or leave acknowledged before this
                // message was written.
                let reads: Vec<_> =
                    route.extra_rooms.iter().map(|extra| self.room_members(tenant, extra, false)).collect();
                let extra: Vec<_> = futures::stream::iter(reads).buffered(EXTRA_ROOMS_AT_ONCE).collect().await;
                for read in extra {
                    members.extend(read?);
                }
            }
            if let (Some(p), Some(m)) = (decisions.presence.as_mut(), change.joined())
                && p.announce
                && p.event == Some(crate::protocol::PresenceEvent::Joined)
            {
                // A `joined` goes to the room as it is now. In a join storm the room's memberships
                // run ahead of presence: a room already past its limit announces no `joined` (its
                // members would get one per join, the limit times the room), and the user's
                // `left` will not be told either.
                let users: std::collections::HashSet<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
                if users.len() as u64 > self.announce_max_users(&m.tenant, lookups).await? {
                    lookups.mark_past_limit(&m.tenant, &m.room);
                    self.unannounce(p, m).await?;
                }
            }
            self.drop_from_non_members(&change, &members, &mut decisions).await?;
            let effects = react::react(&change, &members, &decisions);
            // A message's or signal's room decides for all its frames (see `perform`).
            let room_size =
                matches!(change, Change::Inserted(Record::Message(_) | Record::Signal(_))).then_some(members.len());
            let outcomes =
                self.perform(&effects, window, &record.event_id, change.tenant_room_pair(), room_size).await?;
            tracing::debug!(
                effects = effects.len(),
                recipients = outcomes.len(),
                plugin_calls = plugin_calls.len(),
                "record processed"
            );
            let presence = decisions.presence;
            Ok(RecordReport { change, effects, outcomes, plugin_calls, plugin_actions, presence })
        }
        .instrument(span)
        .await
    }

    /// One batch, as the Lambda receives it (`Records` of the event, raw), with no deadline.
    pub async fn process_batch(&self, raw: &[serde_json::Value]) -> BatchOutcome {
        self.process_batch_until(raw, None).await
    }

    /// One batch that must be done by `finish_by`: no record starts with less than
    /// [`START_RESERVE`] left, no delivery runs past it, and the earliest record not done is
    /// reported for redelivery.
    pub async fn process_batch_until(&self, raw: &[serde_json::Value], finish_by: Option<Instant>) -> BatchOutcome {
        let before = self.metrics.snapshot();
        // One look-up of each tenant's ACTIVE pointer for the whole batch.
        let lookups = match self.presence_runs {
            true => Lookups::with_presence_runs(presence_runs_of(raw)),
            false => Lookups::default(),
        };
        let window = finish_by.map_or_else(Window::unbounded, Window::until);
        let start_by = finish_by.map(|at| at.checked_sub(START_RESERVE).unwrap_or(at));
        let outcome = run_batch(raw, self.partitions_at_once, start_by, |_, record| {
            let (lookups, window) = (&lookups, &window);
            async move {
                let record = self.process_in_batch(&record, lookups, window);
                match finish_by {
                    // Reads, compiles and writes are bounded too: a record still running at
                    // the end of the window is left for redelivery (every step is idempotent).
                    Some(at) => match tokio::time::timeout_at(at.into(), record).await {
                        Ok(done) => done.map(|_| ()),
                        Err(_) => Err(StoreError::OutOfTime("the record was still running at the deadline".into())),
                    },
                    None => record.await.map(|_| ()),
                }
            }
        })
        .await;
        Metrics::add(&self.metrics.young_dropped, window.settle().await as u64);
        let malformed = outcome.malformed.len() as u64;
        Metrics::add(&self.metrics.records, malformed);
        Metrics::add(&self.metrics.skipped, malformed);
        if outcome.failure.is_some() {
            let counter = if outcome.out_of_time { &self.metrics.out_of_time } else { &self.metrics.platform_failures };
            Metrics::add(counter, 1);
        }
        let counts = self.metrics.snapshot().since(&before);
        counts.emit("roomcast.batch");
        let plugins = self.rules.as_deref().map(|rules| rules.take_stats()).unwrap_or_default();
        for stats in &plugins {
            tracing::info!(
                tenant = %stats.tenant,
                version = %stats.version,
                calls = stats.calls,
                faults = stats.fault_count(),
                fault_kinds = %serde_json::to_string(&stats.faults).unwrap_or_default(),
                fuel_p50 = stats.fuel_p50,
                fuel_p99 = stats.fuel_p99,
                micros_p50 = stats.micros_p50,
                micros_p99 = stats.micros_p99,
                "roomcast.plugin"
            );
        }
        if let Some(emf) = &self.emf {
            // Its own line on stdout, outside the JSON log's envelope: CloudWatch reads it as is.
            let now = chrono::Utc::now().timestamp_millis();
            println!("{}", counts.emf(emf, now));
            for stats in &plugins {
                println!("{}", stats.emf(emf, now));
            }
        }
        outcome
    }

    /// The Lambda entry without a deadline: `{"Records": [...]}` in, `batchItemFailures` out.
    pub async fn handle_event(&self, event: &serde_json::Value) -> Result<DynamoDbEventResponse, String> {
        self.handle_event_until(event, None).await
    }

    /// The Lambda entry: the batch must be answered by `deadline` (the invocation's); the work
    /// ends [`ANSWER_MARGIN`] before it.
    pub async fn handle_event_until(
        &self,
        event: &serde_json::Value,
        deadline: Option<Instant>,
    ) -> Result<DynamoDbEventResponse, String> {
        let Some(records) = event.get("Records").and_then(|r| r.as_array()) else {
            return Err("not a DynamoDB stream event: it has no \"Records\" array".into());
        };
        let finish_by = deadline.map(|at| at.checked_sub(ANSWER_MARGIN).unwrap_or(at));
        Ok(self.process_batch_until(records, finish_by).await.response())
    }

    pub fn counts(&self) -> Counts {
        self.metrics.snapshot()
    }
}

/// A stream record's `ApproximateCreationDateTime`; `None` for one made by hand without it.
fn record_time(record: &EventRecord) -> Option<chrono::DateTime<chrono::Utc>> {
    let t = record.change.approximate_creation_date_time;
    (t.timestamp() > 0).then_some(t)
}

/// The batch's membership records that change presence, per room ([`PresenceRuns`]): decoded
/// ahead only when the batch holds two or more memberships (a join storm), so that a batch of
/// messages pays nothing for it.
fn presence_runs_of(raw: &[serde_json::Value]) -> PresenceRuns {
    let membership = |value: &serde_json::Value| {
        let key = |name: &str| value.pointer(&format!("/dynamodb/Keys/{name}/S")).and_then(serde_json::Value::as_str);
        key("pk").is_some_and(|pk| pk.starts_with("ROOM#")) && key("sk").is_some_and(|sk| sk.starts_with("CONN#"))
    };
    if raw.iter().filter(|value| membership(value)).nth(1).is_none() {
        return PresenceRuns::default();
    }
    PresenceRuns::of(raw.iter().enumerate().filter(|(_, value)| membership(value)).filter_map(|(position, value)| {
        let record = crate::stream::decode_record(position, value).ok()?;
        let change = Change::from_record(&record);
        let (m, op, inserted) = match (change.joined(), change.left()) {
            (Some(m), _) => (m.clone(), PresenceOp::Add, matches!(change, Change::Inserted(_))),
            (_, Some(m)) => (m.clone(), PresenceOp::Remove, false),
            _ => return None,
        };
        let seq = record.change.sequence_number.as_deref().map(crate::model::sequence_key);
        let time = record_time(&record).unwrap_or_else(chrono::Utc::now);
        Some(RunRecord { event_id: record.event_id.clone(), time, seq, membership: m, op, inserted })
    }))
}

/// Feeds the processor from a table's stream through the DynamoDB Streams API until `shutdown`
/// fires, as Lambda's event source mapping would: a batch whose record failed for a platform
/// reason is re-read from that record after a pause; with `redeliver`, every batch is
/// processed twice, as the event source may.
pub async fn run_from_stream(
    processor: &Processor,
    poller: &mut crate::stream::poller::StreamPoller,
    idle: std::time::Duration,
    log: Option<&crate::stream::log::StreamLog>,
    redeliver: bool,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut failures_in_a_row = 0u32;
    while !*shutdown.borrow() {
        let batch = poller.poll().await?;
        if batch.records.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        if let Some(log) = log {
            log.append(&batch.records);
        }
        let raw: Vec<serde_json::Value> = batch.records.iter().filter_map(|r| serde_json::to_value(r).ok()).collect();
        let mut outcome = processor.process_batch(&raw).await;
        if redeliver {
            outcome = processor.process_batch(&raw).await;
        }
        if let Some((_, sequence)) = outcome.failure {
            failures_in_a_row += 1;
            let pause = std::time::Duration::from_millis(200 * u64::from(failures_in_a_row.min(25)));
            tracing::warn!(shard = %batch.shard_id, %sequence, ?pause, "batch failed; re-reading from the failed record");
            poller.rewind(&batch.shard_id, &sequence);
            tokio::time::sleep(pause).await;
        } else {
            failures_in_a_row = 0;
        }
    }
    Ok(())
}
