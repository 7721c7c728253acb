//! The processor: one stream record through decode → react → deliver, and whole batches through
//! the batch runner. The same `Processor` serves the Lambda, the stream poller and `roomcast dev`.

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
use crate::model::{FailurePolicy, PluginActive, PluginMeta, PluginStatus};
use crate::plugins::registry::{CallRecord, Lookups, Policy, Registry};
use crate::react::{self, Decisions, Effect};
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
}

/// Time kept back from the Lambda deadline to answer and flush the logs.
pub const ANSWER_MARGIN: Duration = Duration::from_millis(1000);
/// No record starts with less than this left before the batch's work must end: enough for its
/// reads and a delivery attempt. A record not started is reported for redelivery.
pub const START_RESERVE: Duration = Duration::from_millis(1000);

/// A plugin's extra rooms read at once, per record.
pub const EXTRA_ROOMS_AT_ONCE: usize = 4;

pub struct Processor {
    store: Arc<dyn Store>,
    deliverer: Deliverer,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    partitions_at_once: usize,
    plugins: Option<Arc<Registry>>,
    /// Who is in a room; the store when not set.
    rooms: Option<Arc<dyn Rooms>>,
}

impl Processor {
    pub fn new(
        store: Arc<dyn Store>,
        deliverer: Deliverer,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        partitions_at_once: usize,
    ) -> Processor {
        Processor { store, deliverer, clock, metrics, partitions_at_once, plugins: None, rooms: None }
    }

    /// Runs tenant plugins on messages and welcomes.
    pub fn with_plugins(mut self, registry: Arc<Registry>) -> Processor {
        self.plugins = Some(registry);
        self
    }

    /// Reads rooms' members from `rooms` instead of the store (replay's `--membership-from-stream`).
    pub fn with_rooms(mut self, rooms: Arc<dyn Rooms>) -> Processor {
        self.rooms = Some(rooms);
        self
    }

    /// A dry run writes nothing: its deliverer performs no effect, and plugin records are
    /// neither activated nor given a status.
    fn dry_run(&self) -> bool {
        self.deliverer.is_dry_run()
    }

    async fn room_members(&self, tenant: &str, room: &str) -> Result<Vec<crate::model::Membership>, StoreError> {
        let now = self.clock.now();
        match &self.rooms {
            Some(rooms) => rooms.room_members(tenant, room, now).await,
            None => self.store.room_members(tenant, room, now).await,
        }
    }

    /// Plugin records: activate an uploaded version, follow the `ACTIVE` pointer, disable.
    /// A component that cannot be a plugin is the tenant's fault: its status says why. Only the
    /// table being unavailable is an error. Records are redelivered and may be late, so each is
    /// only a hint: what the table says now decides.
    async fn plugin_lifecycle(&self, change: &Change) -> Result<(), StoreError> {
        let Some(registry) = &self.plugins else { return Ok(()) };
        if self.dry_run() {
            return Ok(());
        }
        match change {
            // An upload, or a re-upload of an existing version (its settings may differ).
            Change::Inserted(Record::Plugin(meta)) | Change::Modified { new: Record::Plugin(meta), .. }
                if meta.status == PluginStatus::Uploaded =>
            {
                let now = self.store.plugins(&meta.tenant).await?.into_iter().find(|m| m.version == meta.version);
                let Some(meta) =
                    now.filter(|m| m.status == PluginStatus::Uploaded && m.uploaded_at == meta.uploaded_at)
                else {
                    tracing::info!(tenant = %meta.tenant, version = %meta.version, "upload already handled; not activating it again");
                    return Ok(());
                };
                match self.load_version(registry, &meta).await? {
                    Ok(()) => {
                        self.mark_active(&meta.tenant, &meta.version).await?;
                        self.store.set_active_plugin(&meta.tenant, Some(&meta.version)).await?;
                        // This container has loaded what the new pointer names.
                        let revision = self.store.active_plugin(&meta.tenant).await?.and_then(|a| a.revision);
                        registry.set_revision(&meta.tenant, revision);
                        tracing::info!(tenant = %meta.tenant, version = %meta.version, "plugin activated");
                    }
                    Err(reason) => {
                        tracing::warn!(tenant = %meta.tenant, version = %meta.version, %reason, "plugin rejected");
                        self.store
                            .set_plugin_status(&meta.tenant, &meta.version, PluginStatus::Rejected, Some(&reason))
                            .await?;
                    }
                }
            }
            Change::Inserted(Record::PluginActive(active))
            | Change::Modified { new: Record::PluginActive(active), .. }
            | Change::Removed { old: Record::PluginActive(active), .. } => {
                self.refresh(registry, &active.tenant).await?;
            }
            _ => {}
        }
        Ok(())
    }

    /// Installs `version` of the tenant's plugin from the table.
    async fn ensure_version(&self, registry: &Registry, tenant: &str, version: &str) -> Result<(), StoreError> {
        let Some(meta) = self.store.plugins(tenant).await?.into_iter().find(|m| m.version == version) else {
            tracing::warn!(tenant, version, "the active plugin version has no record");
            return Ok(());
        };
        let loaded = self.load_version(registry, &meta).await?;
        if self.dry_run() {
            if let Err(reason) = loaded {
                tracing::warn!(tenant, version, %reason, "the active plugin version cannot be loaded");
            }
        } else if let Err(reason) = loaded {
            self.store.set_plugin_status(tenant, version, PluginStatus::Rejected, Some(&reason)).await?;
        } else if meta.status != PluginStatus::Active {
            self.mark_active(tenant, version).await?;
        }
        Ok(())
    }

    /// Records `version` as the tenant's active one and whichever was active before as inactive.
    async fn mark_active(&self, tenant: &str, version: &str) -> Result<(), StoreError> {
        for other in self.store.plugins(tenant).await? {
            if other.version != version && other.status == PluginStatus::Active {
                self.store.set_plugin_status(tenant, &other.version, PluginStatus::Inactive, None).await?;
            }
        }
        self.store.set_plugin_status(tenant, version, PluginStatus::Active, None).await
    }

    /// Reassembles, verifies and compiles a version, and installs it. The inner error is the
    /// reason the tenant sees.
    async fn load_version(&self, registry: &Registry, meta: &PluginMeta) -> Result<Result<(), String>, StoreError> {
        let Some(bytes) = self.store.plugin_bytes(&meta.tenant, &meta.version, meta.chunks).await? else {
            return Ok(Err("the component's chunks are missing".into()));
        };
        let sha256 = crate::plugins::sha256_hex(&bytes);
        if sha256 != meta.sha256 {
            return Ok(Err(format!("sha256 mismatch: the chunks hash to {sha256}, the record says {}", meta.sha256)));
        }
        let limits = registry.limits().with_overrides(&meta.limits.unwrap_or_default());
        let host = registry.host().clone();
        let checked = limits.clone();
        let compiled = tokio::task::spawn_blocking(move || host.compile(&bytes, &checked).map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(format!("compilation did not complete: {e}")));
        Ok(compiled.map(|plugin| {
            let policy = match meta.policy {
                FailurePolicy::Open => Policy::FailOpen,
                FailurePolicy::Closed => Policy::FailClosed,
            };
            tracing::info!(
                tenant = %meta.tenant,
                version = %meta.version,
                from_artifact = plugin.from_artifact,
                fuel = limits.fuel,
                memory_bytes = limits.memory_bytes,
                deadline_ms = limits.deadline.as_millis() as u64,
                "plugin loaded"
            );
            registry.install(&meta.tenant, plugin, limits, policy, false);
        }))
    }

    /// Loads what an `ACTIVE` pointer names, unless this container runs exactly that already
    /// (the same version, loaded for the same revision of the pointer). A version this container
    /// cannot load leaves the tenant with no plugin — never an older one the pointer no longer
    /// names — and is not tried again until the pointer changes.
    async fn follow(&self, registry: &Registry, active: &PluginActive) -> Result<(), StoreError> {
        let tenant = active.tenant.as_str();
        let wanted = (active.version.clone(), active.revision.clone());
        let current = registry.installed_version(tenant).as_deref() == Some(active.version.as_str())
            && registry.installed_revision(tenant) == active.revision;
        if current || registry.unloadable(tenant).as_ref() == Some(&wanted) {
            return Ok(());
        }
        self.ensure_version(registry, tenant, &active.version).await?;
        if registry.installed_version(tenant).as_deref() == Some(active.version.as_str()) {
            registry.set_revision(tenant, active.revision.clone());
        } else {
            registry.remove(tenant);
            registry.set_unloadable(tenant, wanted);
            tracing::error!(
                tenant,
                version = %active.version,
                "the ACTIVE plugin version cannot be loaded; the tenant runs no plugin until its pointer changes"
            );
        }
        Ok(())
    }

    /// Follows the tenant's `ACTIVE` pointer as it is in the table now (one strongly consistent
    /// `GetItem`). Plugins pinned from files have no pointer to follow.
    async fn refresh(&self, registry: &Registry, tenant: &str) -> Result<(), StoreError> {
        if registry.is_pinned(tenant) {
            return Ok(());
        }
        match self.store.active_plugin(tenant).await? {
            Some(active) => self.follow(registry, &active).await?,
            None => {
                if registry.installed_version(tenant).is_some() {
                    tracing::info!(tenant, "plugin disabled (no ACTIVE pointer)");
                }
                registry.remove(tenant);
            }
        }
        Ok(())
    }

    /// Many processor containers run at once, and a plugin change reaches only the one that
    /// processes its record. So the first time a batch meets a tenant, the tenant's `ACTIVE`
    /// pointer is read: an activation, rollback, disable or re-upload elsewhere takes effect here
    /// from the next batch on. A cold container loads the tenant's plugin the same way. Rooms of
    /// one batch run concurrently: all of them wait for that one look-up, so none runs without
    /// the plugin; a look-up that failed is tried again by the next record.
    async fn ensure_loaded(&self, registry: &Registry, tenant: &str, lookups: &Lookups) -> Result<(), StoreError> {
        lookups.look_up(tenant).get_or_try_init(|| self.refresh(registry, tenant)).await.map(|_| ())
    }

    /// Asks the tenant's plugin, if any, about this change.
    async fn decide(&self, change: &Change, lookups: &Lookups) -> Result<(Decisions, Vec<CallRecord>), StoreError> {
        let mut decisions = Decisions::default();
        let mut calls = Vec::new();
        let Some(registry) = &self.plugins else { return Ok((decisions, calls)) };
        if let Change::Inserted(Record::Message(m)) = change {
            self.ensure_loaded(registry, &m.tenant, lookups).await?;
        }
        if let Change::Inserted(Record::Connection(c)) = change {
            self.ensure_loaded(registry, &c.tenant, lookups).await?;
        }
        match change {
            Change::Inserted(Record::Message(m)) => {
                let message = crate::plugins::Message {
                    id: m.id.clone(),
                    tenant: m.tenant.clone(),
                    room: m.room.clone(),
                    user_id: m.user_id.clone(),
                    body: m.body.clone(),
                    timestamp: crate::model::format_ts(&m.timestamp),
                };
                // The record's own time, never the clock: replay decides the same.
                let at = m.timestamp.timestamp_millis().max(0) as u64;
                if let Some((decision, route, made)) = registry.decide_message(&message, at).await {
                    decisions.message = Some((decision, route));
                    calls = made;
                }
            }
            Change::Inserted(Record::Connection(c)) => {
                let info = crate::plugins::WelcomeInfo {
                    connection_id: c.connection_id.clone(),
                    tenant: c.tenant.clone(),
                    user_id: c.user_id.clone(),
                    rooms: c.rooms.iter().cloned().collect(),
                };
                let at = c.connected_at.timestamp_millis().max(0) as u64;
                if let Some((greeting, call)) = registry.greeting(&info, at).await {
                    decisions.greeting = greeting;
                    calls.push(call);
                }
            }
            _ => {}
        }
        Ok((decisions, calls))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
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
            self.plugin_lifecycle(&change).await?;
            let (decisions, plugin_calls) = self.decide(&change, lookups).await?;
            let mut members = match react::room_needed(&change) {
                Some((tenant, room)) => self.room_members(tenant, room).await?,
                None => Vec::new(),
            };
            if let (Some((_, route)), Some((tenant, _))) = (&decisions.message, react::room_needed(&change)) {
                // The plugin's extra rooms: already without repeats and within the tenant's
                // limit (`plugins::registry`); read a few at a time, not one after another.
                let reads: Vec<_> = route.extra_rooms.iter().map(|extra| self.room_members(tenant, extra)).collect();
                let extra: Vec<_> = futures::stream::iter(reads).buffered(EXTRA_ROOMS_AT_ONCE).collect().await;
                for read in extra {
                    members.extend(read?);
                }
            }
            let effects = react::react(&change, &members, &decisions);
            let outcomes = self.deliverer.apply(&effects, window).await?;
            tracing::debug!(
                effects = effects.len(),
                recipients = outcomes.len(),
                plugin_calls = plugin_calls.len(),
                "record processed"
            );
            Ok(RecordReport { change, effects, outcomes, plugin_calls })
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
        let lookups = Lookups::default();
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
        self.metrics.snapshot().since(&before).emit("roomcast.batch");
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
