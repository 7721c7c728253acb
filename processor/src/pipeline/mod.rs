//! The processor: one stream record through decode → one match on its kind → that kind's
//! module (gather what it needs, state the reaction purely) → deliver; and whole batches, within
//! the Lambda deadline (`batch`). The same `Processor` serves the Lambda, the stream poller and
//! `roomcast dev`; it is built in one place, [`crate::assembly`].
//!
//! | record | module | what it does |
//! |--------|--------|--------------|
//! | connection INSERT / REMOVE | [`connection`] | the welcome (greeting, rooms' counts, what a reconnect missed); a closed connection's memberships removed |
//! | membership INSERT / MODIFY / REMOVE | [`membership`] | who may join (the tenant's rules), the room's presence, `joined`/`left`, the join's `ack` |
//! | message INSERT | [`message`] | the tenant's verdict and route, the room's members, fan-out |
//! | signal INSERT | [`signal`] | the room's other members |
//! | user message INSERT | [`to_user`] | the connections it names (a backend's `send_to_user`) |
//! | plugin version / `ACTIVE` pointer | `plugin` | the tenant rules' bookkeeping (activate, follow) |
//! | anything else | — | nothing: processor state, chunks, kept copies; an unknown record is skipped and counted |
//!
//! Effects are performed by [`perform`](Processor) (the deliverer, or the fan-out stage for big
//! rooms); a record's report is what replay prints.

mod batch;
pub mod connection;
pub mod membership;
pub mod message;
mod perform;
mod plugin;
mod recover;
pub mod signal;
pub mod to_user;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::dynamodb::EventRecord;
use tracing::Instrument;
use tracing::field::Empty;

pub use batch::run_from_stream;
pub use perform::STAGED_ROOM_MEMORY;

use crate::deliver::{Deliverer, Outcome, Window};
use crate::metrics::{Counts, Metrics};
use crate::model::Clock;
use crate::react::{Effect, PresenceDecision};
use crate::rules::{CallRecord, Lookups, Mode, PluginAction, TenantRules};
use crate::store::{Rooms, Store, StoreError};
use crate::stream::{Change, Record};

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

/// What a kind's module decided about its record: the effects to perform, and what the report
/// shows besides.
#[derive(Debug, Default)]
struct Reaction {
    effects: Vec<Effect>,
    plugin_calls: Vec<CallRecord>,
    plugin_actions: Vec<PluginAction>,
    presence: Option<PresenceDecision>,
    /// A message's or signal's room size: it decides whether all the record's frames are staged.
    room_size: Option<usize>,
}

impl Reaction {
    fn of(effects: Vec<Effect>) -> Reaction {
        Reaction { effects, ..Reaction::default() }
    }
}

/// Time kept back from the Lambda deadline to answer and flush the logs.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(1000);
/// No record starts with less than this left before the batch's work must end: enough for its
/// reads and a delivery attempt. A record not started is reported for redelivery.
pub const START_RESERVE: Duration = Duration::from_millis(1000);

/// A membership this much older than the first record of a room without presence state was
/// written before presence was state (see `membership::presence::seed`).
pub const LEGACY_MEMBERSHIP_AGE_SECONDS: i64 = 60;

/// The most messages a reconnect's `?since=` recovers per room; beyond, the client is told to
/// reload (`recover` with `recovered: false`), as Centrifugo does.
pub const MAX_RECOVERED: usize = 100;

/// The most messages one reconnect's `?since=` recovers across all its rooms.
pub const MAX_RECOVERED_AT_CONNECT: usize = 200;

/// A plugin's extra rooms read at once, per record.
pub const EXTRA_ROOMS_AT_ONCE: usize = 4;

/// A batch's one read of a tenant's settings ([`Lookups::settings`]).
type TenantSettingsCell = Arc<tokio::sync::OnceCell<Option<crate::model::TenantSettings>>>;

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
    /// Where the tenants' webhook events go (`with_webhooks`); none: no event is made.
    webhooks: Option<Arc<dyn crate::webhook::WebhookSink>>,
}

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
            webhooks: None,
            clock,
        }
    }

    /// Tells each tenant's webhook (its settings' `webhook`) what its records did, through `sink`.
    pub fn with_webhooks(mut self, sink: Arc<dyn crate::webhook::WebhookSink>) -> Processor {
        self.webhooks = Some(sink);
        self
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

    /// In a tenant whose rules decide joins, a message or signal whose sender is not an allowed
    /// member when the processor handles it is delivered only if the sender did not just have
    /// its join denied (or pending): one sent right after a join that is then denied (from a
    /// connection that did not wait) reaches no one, while one sent just before its sender left
    /// is delivered as ever. Backends' publishes have no sender connection.
    async fn refused_sender(
        &self,
        tenant: &str,
        room: &str,
        sender: &str,
        members: &[crate::model::Membership],
    ) -> Result<bool, StoreError> {
        let Some(rules) = self.rules.as_deref() else { return Ok(false) };
        if sender.is_empty() || members.iter().any(|m| m.connection_id == sender && m.room == room) {
            return Ok(false);
        }
        if !rules.authorizes_joins(tenant).await {
            return Ok(false);
        }
        let Some(conn) = self.store.get_connection(sender, self.clock.now()).await? else { return Ok(false) };
        if !(conn.denied_rooms.contains(room) || conn.pending_rooms.contains(room)) {
            return Ok(false);
        }
        tracing::info!(sender = %sender, "dropped: the sender's join of the room was denied or is pending");
        Metrics::add(&self.metrics.rejected, 1);
        Ok(true)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn counts(&self) -> Counts {
        self.metrics.snapshot()
    }

    /// Where presence state lives: the table, or a dry run's scratch copy.
    fn presence_state(&self) -> &Arc<dyn Store> {
        match self.mode {
            Mode::Execute => &self.store,
            Mode::DryRun => &self.scratch,
        }
    }

    /// The tenant's settings, read once per batch (the announce limit, rooms that keep their
    /// latest message and the webhook all come from this one read).
    async fn tenant_settings(&self, tenant: &str, lookups: &Lookups) -> Result<TenantSettingsCell, StoreError> {
        let cell = lookups.settings(tenant);
        cell.get_or_try_init(|| self.store.tenant_settings(tenant)).await?;
        Ok(cell)
    }

    /// The tenant's announce limit: rooms with more users announce no `joined`/`left`.
    async fn announce_max_users(&self, tenant: &str, lookups: &Lookups) -> Result<u64, StoreError> {
        Ok(match self.tenant_settings(tenant, lookups).await?.get().and_then(Option::as_ref) {
            Some(settings) => settings.presence_announce_max_users.unwrap_or(self.announce_max_users),
            None => self.announce_max_users,
        })
    }

    /// One record on its own: decode, read the room if the change needs it, react, deliver.
    /// Only a platform fault (the table unavailable) is an error.
    pub async fn process_record(&self, record: &EventRecord) -> Result<RecordReport, StoreError> {
        let window = Window::unbounded();
        let lookups = Lookups::default();
        let report = self.process_in_batch(record, &lookups, &window).await;
        Metrics::add(&self.metrics.young_dropped, window.settle().await as u64);
        let (queued, _) = lookups.webhooks().take(|_| None);
        self.queue_webhooks(queued).await?;
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
            let (tenant, room) = change.tenant_room();
            let span = tracing::Span::current();
            if let Some(tenant) = tenant {
                span.record("tenant", tenant);
            }
            if let Some(room) = room {
                span.record("room", room);
            }
            let reaction = self.react_to(&change, record, lookups).await?;
            if let Change::Unknown { .. } = change {
                // Skipped (and counted) in `react_to`: nothing to perform.
                let Reaction { effects, plugin_calls, plugin_actions, presence, .. } = reaction;
                return Ok(RecordReport {
                    change,
                    effects,
                    outcomes: Vec::new(),
                    plugin_calls,
                    plugin_actions,
                    presence,
                });
            }
            let (effects, pair) = (&reaction.effects, change.tenant_room_pair());
            let outcomes = self.perform(effects, window, &record.event_id, pair, reaction.room_size).await?;
            if let Some(tenant) = tenant {
                let at = batch::record_time(record);
                self.tell_webhook(tenant, &change, &reaction, &record.event_id, at, lookups).await?;
            }
            tracing::debug!(
                effects = reaction.effects.len(),
                recipients = outcomes.len(),
                plugin_calls = reaction.plugin_calls.len(),
                "record processed"
            );
            let Reaction { effects, plugin_calls, plugin_actions, presence, .. } = reaction;
            Ok(RecordReport { change, effects, outcomes, plugin_calls, plugin_actions, presence })
        }
        .instrument(span)
        .await
    }

    /// Queues a batch's webhook events (nothing without a sink).
    async fn queue_webhooks(&self, queued: Vec<crate::webhook::Queued>) -> Result<(), StoreError> {
        match self.webhooks.as_ref() {
            Some(sink) if !queued.is_empty() => sink.enqueue(queued).await,
            _ => Ok(()),
        }
    }

    /// The record's events for its tenant's webhook, if the tenant has one and wants them (its
    /// settings read once per batch); held with the batch's and queued once it is done
    /// ([`Processor::queue_webhooks`]), never delivered in the record's way. A dry run makes none.
    async fn tell_webhook(
        &self,
        tenant: &str,
        change: &Change,
        reaction: &Reaction,
        event_id: &str,
        at: Option<chrono::DateTime<chrono::Utc>>,
        lookups: &Lookups,
    ) -> Result<(), StoreError> {
        if self.webhooks.is_none() || self.mode != Mode::Execute {
            return Ok(());
        }
        let settings = self.tenant_settings(tenant, lookups).await?;
        let Some(webhook) = settings.get().and_then(Option::as_ref).and_then(|s| s.webhook.as_ref()) else {
            return Ok(());
        };
        let at = at.unwrap_or_else(|| self.clock.now());
        let events: Vec<_> =
            crate::webhook::events(change, reaction.presence.as_ref(), &reaction.effects, event_id, at)
                .into_iter()
                .filter(|e| crate::webhook::wants(webhook, &e.kind))
                .map(crate::webhook::bounded)
                .collect();
        if events.is_empty() {
            return Ok(());
        }
        Metrics::add(&self.metrics.webhook_events, events.len() as u64);
        lookups.webhooks().hold(event_id, tenant, events);
        Ok(())
    }

    /// The one match on a record's kind: its module gathers what the record needs and states the
    /// reaction.
    async fn react_to(&self, change: &Change, record: &EventRecord, lookups: &Lookups) -> Result<Reaction, StoreError> {
        let sequence = record.change.sequence_number.as_deref().unwrap_or("");
        match change {
            Change::Unknown { reason } => {
                tracing::warn!(%reason, "skipping stream record");
                Metrics::add(&self.metrics.skipped, 1);
                Ok(Reaction::default())
            }
            Change::Inserted(Record::Connection(c)) => connection::opened(self, c, sequence, lookups).await,
            Change::Removed { old: Record::Connection(c), cause } => Ok(Reaction::of(connection::closed(c, *cause))),
            Change::Inserted(Record::Membership(_))
            | Change::Modified { new: Record::Membership(_), .. }
            | Change::Removed { old: Record::Membership(_), .. } => {
                membership::changed(self, change, record, lookups).await
            }
            Change::Inserted(Record::Message(m)) => message::sent(self, m, sequence, lookups).await,
            Change::Inserted(Record::Signal(s)) => signal::sent(self, s).await,
            Change::Inserted(Record::UserMessage(m)) => Ok(Reaction::of(to_user::react(m))),
            _ if change.is_plugin_record() => plugin::changed(self, change).await,
            // Processor state, plugin chunks, kept copies; other changes no client hears of.
            _ => Ok(Reaction::default()),
        }
    }
}
