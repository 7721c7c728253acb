//! Which plugin each tenant runs, with its limits, failure policy and circuit breaker, and the
//! calls the processor makes: [`Registry::decide_message`], [`Registry::authorize_join`] and
//! [`Registry::greeting`], each with the tenant's configuration ([`Registry::set_config`]).
//!
//! * Bounded, with moka: at most [`Registry::with_capacity`] tenants' compiled plugins are kept
//!   (least recently used evicted first, any idle for [`INSTALLED_IDLE`] released) and reloaded
//!   from the table (or the host's precompiled artifacts) when that tenant next needs it; a
//!   version is loaded once however many callers ask at once ([`Registry::load`], weighed by
//!   component bytes); a version that cannot load is not retried for [`UNLOADABLE_TTL`].
//!   Plugins installed with `pin` (`--plugins DIR`, replay's `--plugin`) have no table record
//!   to come back from and are kept apart, never evicted.
//! * Fresh: every message (and every welcome) runs on a new instance of the tenant's plugin
//!   ([`PluginHost::message`]), so no state carries between messages and replays decide as the
//!   live run did. A batch keeps only its [`Lookups`](roomcast_processor::rules::Lookups) of `ACTIVE` pointers.
//! * Blame stays with the tenant: a fault applies the tenant's [`Policy`] (fail open to the
//!   default rules, or fail closed and reject), is counted, and after [`BREAKER_THRESHOLD`] faults
//!   in a row opens the breaker: the plugin is skipped (policy applied) for [`BREAKER_COOLDOWN`].
//!   Nothing here ever fails a batch or touches another tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use roomcast_processor::store::StoreError;

use super::{
    CallRecord, CallReport, ConfigValues, Fault, Hooks, JoinDecision, JoinRequest, Limits, Message, Plugin, PluginHost,
    Verdict, WelcomeInfo,
};
use roomcast_processor::metrics::{Metrics, PluginStats};
use roomcast_processor::react::{Decision, Route};
use roomcast_processor::rules::{JoinVerdict, RecordAt};

pub const BREAKER_THRESHOLD: u32 = 5;
pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
/// Tenants whose compiled plugin is kept, unless configured otherwise.
pub const DEFAULT_CAPACITY: usize = 256;

/// What to do when a tenant's plugin faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Deliver by the default rules, as if there were no plugin.
    FailOpen,
    /// Reject the message (its sender is told).
    FailClosed,
}

#[derive(Debug, Default)]
struct Breaker {
    faults_in_a_row: u32,
    open_until: Option<Instant>,
}

struct Installed {
    plugin: Plugin,
    limits: Limits,
    policy: Policy,
    pinned: bool,
    /// The `ACTIVE` pointer's revision this was loaded for.
    revision: Mutex<Option<String>>,
    breaker: Mutex<Breaker>,
}

pub struct Registry {
    host: Arc<PluginHost>,
    limits: Limits,
    capacity: usize,
    /// Tenants' installed plugins from the table: at most `capacity`, the least recently used
    /// evicted first, and any unused for [`INSTALLED_IDLE`] released (each reloads from the
    /// table on its tenant's next use).
    tenants: moka::sync::Cache<String, Arc<Installed>>,
    /// Plugins from files (`--plugins DIR`, replay's `--plugin`): no table record to reload
    /// them from, so never evicted.
    pinned: RwLock<HashMap<String, Arc<Installed>>>,
    /// Per tenant, the (version, pointer revision) that could not be loaded here: not tried
    /// again until the pointer changes, or for [`UNLOADABLE_TTL`].
    unloadable: moka::sync::Cache<String, (String, Option<String>)>,
    /// Loads of (tenant, version) — read, verified, compiled — shared by every caller at once
    /// (single flight) and kept a while: the compiled plugin, or the reason it cannot be one.
    loads: moka::future::Cache<(String, String), Arc<Result<Plugin, String>>>,
    /// The memory all plugin instances of this process may hold at once, in MiB: a call takes
    /// its instance's cap from here before it starts and gives it back when it ends, so eight
    /// partitions of a tenant with a 128 MiB cap cannot take a 512 MB function down.
    memory: Arc<tokio::sync::Semaphore>,
    /// Compilations under way, by component sha256: a caller that gave up (its record ran out of
    /// time) leaves the compile running, and the next caller waits for it instead of starting
    /// another on a fraction of a vCPU.
    compiling: Compiling,
    memory_mib: usize,
    memory_peak_mib: std::sync::atomic::AtomicUsize,
    metrics: Arc<Metrics>,
    /// Per tenant, its configuration (and whether it was pinned from a file).
    configs: RwLock<HashMap<String, (ConfigValues, bool)>>,
    /// Per tenant, its calls' costs since the last batch's metrics.
    stats: Mutex<HashMap<String, Samples>>,
}

/// The plugin memory budget of a process, unless configured (`ROOMCAST_PLUGIN_MEMORY_BUDGET_MIB`).
pub const DEFAULT_MEMORY_BUDGET_MIB: usize = 1024;

type CompileResult = futures::future::Shared<futures::future::BoxFuture<'static, Result<Plugin, String>>>;

/// Compilations under way, shared by every caller of the same component.
#[derive(Clone, Default)]
struct Compiling(Arc<Mutex<HashMap<String, CompileResult>>>);

impl Compiling {
    /// Compiles `bytes` on a blocking thread, or joins the compilation of the same bytes already
    /// under way; it runs to the end whoever stops waiting.
    async fn compile(
        &self,
        host: &Arc<PluginHost>,
        metrics: &Arc<Metrics>,
        bytes: Vec<u8>,
        limits: Limits,
    ) -> Result<Plugin, String> {
        use futures::FutureExt;
        let sha256 = super::sha256_hex(&bytes);
        let shared = {
            let mut under_way = self.0.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(shared) = under_way.get(&sha256) {
                shared.clone()
            } else {
                Metrics::add(&metrics.plugin_compiles, 1);
                let host = host.clone();
                let task =
                    tokio::task::spawn_blocking(move || host.compile(&bytes, &limits).map_err(|e| e.to_string()));
                let shared =
                    async move { task.await.unwrap_or_else(|e| Err(format!("compilation did not complete: {e}"))) }
                        .boxed()
                        .shared();
                under_way.insert(sha256.clone(), shared.clone());
                // Forgotten once done, whoever is still waiting (the result is theirs already).
                let (done, map) = (shared.clone(), self.0.clone());
                tokio::spawn(async move {
                    let _ = done.await;
                    map.lock().unwrap_or_else(|p| p.into_inner()).remove(&sha256);
                });
                shared
            }
        };
        shared.await
    }
}

/// An installed plugin unused this long is released (its tenant's next message reloads it).
pub const INSTALLED_IDLE: Duration = Duration::from_secs(3600);

/// The cache of installed plugins: bounded by count, least recently used first (an install is
/// always admitted: it is the tenant's plugin), idle ones released; evictions counted.
fn installed_cache(capacity: usize, metrics: &Arc<Metrics>) -> moka::sync::Cache<String, Arc<Installed>> {
    let metrics = metrics.clone();
    moka::sync::Cache::builder()
        .max_capacity(capacity as u64)
        .eviction_policy(moka::policy::EvictionPolicy::lru())
        .time_to_idle(INSTALLED_IDLE)
        .eviction_listener(move |tenant: Arc<String>, _, cause: moka::notification::RemovalCause| {
            if cause.was_evicted() {
                Metrics::add(&metrics.plugin_evictions, 1);
                tracing::info!(tenant = %tenant, ?cause, "plugin evicted from the cache; it reloads on next use");
            }
        })
        .build()
}

/// How long a version that cannot be loaded is not tried again (unless its pointer changes).
pub const UNLOADABLE_TTL: Duration = Duration::from_secs(600);
/// How long a finished load is kept for the next caller (an install elsewhere, a cold tenant).
const LOAD_TTL: Duration = Duration::from_secs(60);

impl Registry {
    pub fn new(host: Arc<PluginHost>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            host,
            limits: Limits::default(),
            capacity: DEFAULT_CAPACITY,
            tenants: installed_cache(DEFAULT_CAPACITY, &metrics),
            pinned: RwLock::new(HashMap::new()),
            unloadable: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(UNLOADABLE_TTL).build(),
            loads: moka::future::Cache::builder()
                // Weighed by component bytes: at most 256 MiB of components held here at once.
                .weigher(|_, load: &Arc<Result<Plugin, String>>| {
                    load.as_ref().as_ref().map_or(1, |p| u32::try_from(p.size).unwrap_or(u32::MAX))
                })
                .max_capacity(256 << 20)
                .time_to_live(LOAD_TTL)
                .build(),
            memory: Arc::new(tokio::sync::Semaphore::new(DEFAULT_MEMORY_BUDGET_MIB)),
            compiling: Compiling::default(),
            memory_mib: DEFAULT_MEMORY_BUDGET_MIB,
            memory_peak_mib: std::sync::atomic::AtomicUsize::new(0),
            metrics,
            configs: RwLock::new(HashMap::new()),
            stats: Mutex::new(HashMap::new()),
        }
    }

    /// The registry a deployment configures: limits, cache bound and artifact directory.
    pub fn from_config(config: &roomcast_processor::config::Config, metrics: Arc<Metrics>) -> anyhow::Result<Registry> {
        let mut host = PluginHost::new()?;
        if let Some(dir) = &config.plugin_artifact_dir {
            host = host.with_artifact_dir(dir)?;
        }
        Ok(Registry::new(Arc::new(host), metrics)
            .with_limits(config.plugin_limits.clone())
            .with_capacity(config.plugin_cache_tenants)
            .with_memory_budget(config.plugin_memory_budget_mib))
    }

    /// How much memory, in MiB, all plugin instances of this process may hold at once.
    pub fn with_memory_budget(mut self, mib: usize) -> Registry {
        let mib = mib.max(1);
        self.memory = Arc::new(tokio::sync::Semaphore::new(mib));
        self.memory_mib = mib;
        self
    }

    /// The most plugin memory, in MiB, reserved at once so far.
    pub fn memory_peak_mib(&self) -> usize {
        self.memory_peak_mib.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The deployment's limits: what plugins run with unless their upload overrides them.
    pub fn with_limits(mut self, limits: Limits) -> Registry {
        self.limits = limits;
        self
    }

    /// How many tenants' compiled plugins are kept at most.
    pub fn with_capacity(mut self, tenants: usize) -> Registry {
        self.capacity = tenants.max(1);
        self.tenants = installed_cache(self.capacity, &self.metrics);
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn host(&self) -> &Arc<PluginHost> {
        &self.host
    }

    /// Makes `plugin` the tenant's active plugin (replacing any other). A `pinned` plugin is
    /// never evicted. Installing past the capacity evicts the least recently used other tenant.
    pub fn install(&self, tenant: &str, plugin: Plugin, limits: Limits, policy: Policy, pinned: bool) {
        let installed = Arc::new(Installed {
            plugin,
            limits,
            policy,
            pinned,
            revision: Mutex::new(None),
            breaker: Mutex::new(Breaker::default()),
        });
        self.unloadable.invalidate(tenant);
        if pinned {
            self.tenants.invalidate(tenant);
            self.pinned.write().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), installed);
        } else {
            self.pinned.write().unwrap_or_else(|p| p.into_inner()).remove(tenant);
            self.tenants.insert(tenant.to_string(), installed);
        }
    }

    /// The tenant runs no plugin (until the table says otherwise).
    pub fn remove(&self, tenant: &str) {
        self.pinned.write().unwrap_or_else(|p| p.into_inner()).remove(tenant);
        self.tenants.invalidate(tenant);
    }

    /// The version the tenant runs here, if any.
    pub fn installed_version(&self, tenant: &str) -> Option<String> {
        self.get(tenant).map(|i| i.plugin.version().to_string())
    }

    /// The tenant's breaker here, if it has a plugin: its faults in a row, and whether it is
    /// open (the failure policy applies without calling the plugin) — for the operator's page.
    pub fn breaker(&self, tenant: &str) -> Option<(u32, bool)> {
        self.get(tenant).map(|i| {
            let breaker = i.breaker.lock().unwrap_or_else(|p| p.into_inner());
            (breaker.faults_in_a_row, breaker.open_until.is_some_and(|until| Instant::now() < until))
        })
    }

    /// The limits the tenant's plugin runs with here, if it has one.
    pub fn installed_limits(&self, tenant: &str) -> Option<Limits> {
        self.get(tenant).map(|i| i.limits.clone())
    }

    /// How many tenants' plugins are loaded.
    pub fn loaded(&self) -> usize {
        self.tenants.run_pending_tasks();
        self.tenants.entry_count() as usize + self.pinned.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The failure policy the tenant's plugin runs with here, if it has one.
    pub fn installed_policy(&self, tenant: &str) -> Option<Policy> {
        self.get(tenant).map(|i| i.policy)
    }

    /// Whether the tenant's plugin came from `--plugins DIR` or replay's `--plugin`: it has no
    /// `ACTIVE` pointer in the table to follow.
    pub fn is_pinned(&self, tenant: &str) -> bool {
        self.get(tenant).is_some_and(|i| i.pinned)
    }

    /// The (version, pointer revision) of the tenant's that this container could not load.
    pub fn unloadable(&self, tenant: &str) -> Option<(String, Option<String>)> {
        self.unloadable.get(tenant)
    }

    /// Remembers that the version the tenant's pointer names (at that revision) cannot be loaded.
    pub fn set_unloadable(&self, tenant: &str, wanted: (String, Option<String>)) {
        self.unloadable.insert(tenant.to_string(), wanted);
    }

    /// The tenant's `version`, loaded once however many callers ask at the same time: `read`
    /// fetches and verifies its bytes (a table error is returned, not kept), then it is compiled
    /// on a blocking thread. The result — a plugin, or the reason the tenant sees — is shared by
    /// every caller waiting for it and kept for a minute.
    pub async fn load<F>(
        &self,
        tenant: &str,
        version: &str,
        limits: &Limits,
        read: F,
    ) -> Result<Result<Plugin, String>, StoreError>
    where
        F: std::future::Future<Output = Result<Result<Vec<u8>, String>, StoreError>>,
    {
        let key = (tenant.to_string(), version.to_string());
        let (host, metrics, limits) = (self.host.clone(), self.metrics.clone(), limits.clone());
        let compiling = self.compiling.clone();
        let loaded = self
            .loads
            .try_get_with(key, async move {
                let bytes = match read.await? {
                    Ok(bytes) => bytes,
                    Err(reason) => return Ok(Arc::new(Err(reason))),
                };
                Ok::<_, StoreError>(Arc::new(compiling.compile(&host, &metrics, bytes, limits).await))
            })
            .await;
        match loaded {
            Ok(load) => Ok(load.as_ref().clone()),
            Err(e) => Err(e.as_ref().clone()),
        }
    }

    /// The `ACTIVE` pointer revision the tenant's plugin here was loaded for.
    pub fn installed_revision(&self, tenant: &str) -> Option<String> {
        self.get(tenant).and_then(|i| i.revision.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    /// Records which `ACTIVE` pointer revision the tenant's installed plugin follows.
    pub fn set_revision(&self, tenant: &str, revision: Option<String>) {
        if let Some(installed) = self.get(tenant) {
            *installed.revision.lock().unwrap_or_else(|p| p.into_inner()) = revision;
        }
    }

    fn get(&self, tenant: &str) -> Option<Arc<Installed>> {
        let pinned = self.pinned.read().unwrap_or_else(|p| p.into_inner()).get(tenant).cloned();
        pinned.or_else(|| self.tenants.get(tenant))
    }

    /// Runs a tenant's hooks on a blocking thread (a call may take up to its deadline), behind
    /// its breaker: `None` when the tenant has no plugin, `Err(BreakerOpen)` while the breaker
    /// is open, `Err(Host)` when the thread itself failed.
    async fn run<R: Send + 'static>(
        &self,
        tenant: &str,
        hook: &'static str,
        call: impl FnOnce(&PluginHost, &Plugin, &Limits) -> R + Send + 'static,
    ) -> Option<(Result<R, Fault>, Policy)> {
        let installed = self.get(tenant)?;
        {
            let breaker = installed.breaker.lock().unwrap_or_else(|p| p.into_inner());
            if breaker.open_until.is_some_and(|until| Instant::now() < until) {
                // Logged once when it opens; each skip is counted, not logged, so a tenant's
                // traffic cannot flood the log while its plugin is off.
                tracing::debug!(tenant, hook, "plugin breaker open: applying the failure policy without calling it");
                Metrics::add(&self.metrics.plugin_breaker_skips, 1);
                return Some((Err(Fault::BreakerOpen), installed.policy));
            }
        }
        // The instance's memory cap, reserved before it exists; the wait is bounded by the
        // record's own deadline. A cap larger than the whole budget takes the whole budget.
        let mib = installed.limits.memory_bytes.div_ceil(1 << 20).clamp(1, self.memory_mib) as u32;
        let Ok(reserved) = self.memory.clone().acquire_many_owned(mib).await else {
            return Some((Err(Fault::Host("the plugin memory budget is closed".into())), installed.policy));
        };
        let in_use = self.memory_mib - self.memory.available_permits();
        self.memory_peak_mib.fetch_max(in_use, std::sync::atomic::Ordering::Relaxed);
        Metrics::add(&self.metrics.plugin_instances, 1);
        let host = self.host.clone();
        let running = installed.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let answer = call(&host, &running.plugin, &running.limits);
            drop(reserved);
            answer
        })
        .await;
        let result = joined.map_err(|e| {
            let why = format!("the plugin call did not complete: {e}");
            tracing::error!(tenant, hook, %why, "the plugin host failed around a call; the policy applies");
            Fault::Host(why)
        });
        Some((result, installed.policy))
    }

    /// Counts a call's outcome for the batch's per-tenant metrics, and emits its log: one JSON
    /// log line per plugin log line (in the Lambda; `roomcast dev` prints them), tagged with the
    /// tenant, the plugin version, the hook and the record's sequence number.
    fn observe<T>(
        &self,
        tenant: &str,
        hook: &'static str,
        at: &RecordAt,
        result: &Result<T, Fault>,
        report: &CallReport,
    ) {
        let version = self.installed_version(tenant).unwrap_or_default();
        if let Err(fault) = result
            && fault.is_the_plugins()
        {
            Metrics::add(&self.metrics.plugin_faults, 1);
            tracing::warn!(tenant, version, hook, seq = %at.sequence, %fault, "plugin fault");
        }
        for line in &report.log {
            tracing::info!(target: "roomcast::plugin_log", tenant, version, hook, seq = %at.sequence, "{line}");
        }
        tracing::debug!(
            tenant,
            hook,
            fuel = report.fuel_used,
            elapsed_us = report.elapsed.as_micros() as u64,
            "plugin call"
        );
        // The breaker's skips and the caller's size checks are not calls.
        if let Err(fault) = result
            && !fault.was_called()
        {
            return;
        }
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let samples = stats.entry(tenant.to_string()).or_default();
        samples.version = version;
        if samples.fuel.len() < MAX_SAMPLES {
            samples.fuel.push(report.fuel_used);
            samples.micros.push(report.elapsed.as_micros() as u64);
        }
        if let Err(fault) = result {
            *samples.faults.entry(fault.kind().to_string()).or_default() += 1;
        }
    }

    /// Per tenant, what its plugin's calls cost since the last time this was asked.
    pub fn take_stats(&self) -> Vec<PluginStats> {
        let taken = std::mem::take(&mut *self.stats.lock().unwrap_or_else(|p| p.into_inner()));
        let mut stats: Vec<PluginStats> = taken
            .into_iter()
            .map(|(tenant, s)| PluginStats::from_samples(&tenant, &s.version, s.fuel, s.micros, s.faults))
            .collect();
        stats.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        stats
    }

    /// The breaker counts messages (and welcomes), not calls: one whose hooks faulted counts
    /// once; one that went through every hook cleanly closes it. Only the plugin's own faults
    /// count — never the caller's size checks, never the breaker itself.
    fn settle_breaker(&self, tenant: &str, faulted: bool) {
        let Some(installed) = self.get(tenant) else { return };
        if installed.breaker.lock().unwrap_or_else(|p| p.into_inner()).open_until.is_some_and(|t| Instant::now() < t) {
            return; // the breaker spoke for the plugin: nothing was called
        }
        let mut breaker = installed.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if !faulted {
            *breaker = Breaker::default();
            return;
        }
        breaker.faults_in_a_row += 1;
        if breaker.faults_in_a_row >= BREAKER_THRESHOLD {
            breaker.open_until = Some(Instant::now() + BREAKER_COOLDOWN);
            tracing::warn!(
                tenant,
                faults_in_a_row = breaker.faults_in_a_row,
                "plugin breaker opens for {BREAKER_COOLDOWN:?}"
            );
        }
    }

    /// Settles the breaker after a call the plugin may have been blamed for.
    fn settle<T>(&self, tenant: &str, result: &Result<T, Fault>) {
        if !result.as_ref().is_err_and(|fault| !fault.was_called()) {
            self.settle_breaker(tenant, result.as_ref().is_err_and(Fault::is_the_plugins));
        }
    }

    /// The tenant's configuration as its plugin reads it.
    pub fn config(&self, tenant: &str) -> ConfigValues {
        self.configs.read().unwrap_or_else(|p| p.into_inner()).get(tenant).map(|(c, _)| c.clone()).unwrap_or_default()
    }

    /// The tenant's configuration, as the table has it now. Ignored for a tenant whose
    /// configuration was pinned ([`Registry::pin_config`]).
    pub fn set_config(&self, tenant: &str, values: std::collections::BTreeMap<String, String>) {
        let mut configs = self.configs.write().unwrap_or_else(|p| p.into_inner());
        if configs.get(tenant).is_some_and(|(_, pinned)| *pinned) {
            return;
        }
        if values.is_empty() {
            configs.remove(tenant);
        } else if configs.get(tenant).is_none_or(|(c, _)| **c != values) {
            configs.insert(tenant.to_string(), (Arc::new(values), false));
        }
    }

    /// The tenant's configuration from a file (replay's and `plugin test`'s `--config`): the
    /// table's is never read over it.
    pub fn pin_config(&self, tenant: &str, values: std::collections::BTreeMap<String, String>) {
        self.configs.write().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), (Arc::new(values), true));
    }

    /// The optional hooks of the tenant's plugin (asked of it once, on a blocking thread);
    /// `None` when the tenant has no plugin.
    pub async fn hooks(&self, tenant: &str) -> Option<Hooks> {
        let installed = self.get(tenant)?;
        if let Some(hooks) = installed.plugin.known_hooks() {
            return Some(hooks);
        }
        let host = self.host.clone();
        let asked = tokio::task::spawn_blocking(move || host.hooks(&installed.plugin, &installed.limits)).await;
        // A host failure around the call: every hook is called, so joins meet the policy.
        Some(asked.unwrap_or(Hooks::all()))
    }

    /// The verdict and route for one message from one `on-message` call on a fresh instance
    /// ([`PluginHost::message_with`]); `None` when the tenant has no plugin.
    ///
    /// Failure policy: fail-closed rejects the message; fail-open delivers it by the default
    /// rules — to its room, as if there were no plugin, never to anyone outside it.
    pub async fn decide_message(&self, message: &Message, at: &RecordAt) -> Option<(Decision, Route, Vec<CallRecord>)> {
        let tenant = message.tenant.clone();
        let input = message.clone();
        let (config, time) = (self.config(&tenant), at.time_ms);
        let world = self.get(&tenant).map(|i| i.plugin.world())?;
        let hook = if world == "0.1.0" { "validate+route" } else { "on-message" };
        let (ran, policy) = self
            .run(&tenant, hook, move |host, plugin, limits| host.message_with(plugin, limits, &input, time, config))
            .await?;
        let (outcome, report) = match ran {
            Ok(calls) => calls.outcome,
            Err(fault) => (Err(fault), CallReport::default()),
        };
        self.observe(&tenant, hook, at, &outcome, &report);
        let record = CallRecord {
            hook,
            outcome: match &outcome {
                Err(fault @ Fault::InputTooLarge { .. }) => format!("not called: {fault}"),
                // The verdict, and the routing when it is not the room's default.
                Ok((verdict, route)) if *route == Route::default() => format!("{verdict:?}"),
                Ok((verdict, route)) => format!("{verdict:?} {route:?}"),
                Err(fault) => format!("fault: {fault}"),
            },
            report,
        };
        self.settle(&tenant, &outcome);
        let (decision, route) = match outcome {
            Ok((Verdict::Accept, route)) => (Decision::Deliver { rewritten: None }, route),
            Ok((Verdict::Rewrite(text), route)) => (Decision::Deliver { rewritten: Some(text) }, route),
            Ok((Verdict::Reject(reason), _)) => (Decision::Reject { reason }, Route::default()),
            Err(ref fault) => {
                (on_fault(policy, fault, "the message is too large for the room's rules"), Route::default())
            }
        };
        if let Decision::Reject { .. } = decision {
            Metrics::add(&self.metrics.rejected, 1);
        }
        Some((decision, route, vec![record]))
    }

    /// The tenant's decision on a join from one `authorize-join` call; `None` when the tenant
    /// has no plugin or its plugin does not authorize joins. A fault applies the failure policy:
    /// fail-open allows, fail-closed denies.
    pub async fn authorize_join(&self, request: &JoinRequest, at: &RecordAt) -> Option<(JoinVerdict, CallRecord)> {
        let tenant = request.tenant.clone();
        if !self.hooks(&tenant).await?.contains(Hooks::AUTHORIZE_JOIN) {
            return None;
        }
        let input = request.clone();
        let (config, time) = (self.config(&tenant), at.time_ms);
        let (ran, policy) = self
            .run(&tenant, "authorize-join", move |host, plugin, limits| host.join(plugin, limits, &input, time, config))
            .await?;
        let (result, report) = ran.unwrap_or_else(|fault| (Err(fault), CallReport::default()));
        self.observe(&tenant, "authorize-join", at, &result, &report);
        let verdict = match &result {
            Ok(JoinDecision::Allow) => JoinVerdict::Allow,
            Ok(JoinDecision::Deny(reason)) => JoinVerdict::Deny(reason.clone()),
            Err(fault) => match on_fault(policy, fault, "the join request is too large for the room's rules") {
                Decision::Deliver { .. } => JoinVerdict::Allow,
                Decision::Reject { reason } => JoinVerdict::Deny(reason),
            },
        };
        self.settle(&tenant, &result);
        Some((verdict, CallRecord { hook: "authorize-join", outcome: describe(&result), report }))
    }

    /// The tenant plugin's greeting for a welcome, if it greets. A fault or a greeting too
    /// large for the welcome frame means no greeting; the welcome itself always goes out.
    pub async fn greeting(&self, info: &WelcomeInfo, at: &RecordAt) -> Option<(Option<String>, CallRecord)> {
        if !self.hooks(&info.tenant).await?.contains(Hooks::WELCOME) {
            return None;
        }
        let input = info.clone();
        let (config, time) = (self.config(&info.tenant), at.time_ms);
        let (ran, _) = self
            .run(&info.tenant, "welcome", move |host, plugin, limits| host.greet(plugin, limits, &input, time, config))
            .await?;
        let (result, report) = ran.unwrap_or_else(|fault| (Err(fault), CallReport::default()));
        self.observe(&info.tenant, "welcome", at, &result, &report);
        self.settle(&info.tenant, &result);
        let record = CallRecord { hook: "welcome", outcome: describe(&result), report };
        Some((result.unwrap_or(None), record))
    }
}

/// What a fault means for the tenant's policy. A message (or join) too large for the plugin is
/// never let through unchecked, whatever the policy, since the plugin could not see it.
fn on_fault(policy: Policy, fault: &Fault, too_large: &str) -> Decision {
    match (policy, fault) {
        (_, Fault::InputTooLarge { .. }) => {
            Decision::Reject { reason: super::calls::bounded_reason(format!("{too_large} ({fault})")) }
        }
        (Policy::FailOpen, _) => Decision::Deliver { rewritten: None },
        (Policy::FailClosed, _) => Decision::Reject {
            reason: super::calls::bounded_reason(format!("the room's rules could not be checked ({fault})")),
        },
    }
}

/// Per call samples kept per tenant between two batches' metrics.
const MAX_SAMPLES: usize = 10_000;

#[derive(Default)]
struct Samples {
    version: String,
    fuel: Vec<u64>,
    micros: Vec<u64>,
    faults: std::collections::BTreeMap<String, u64>,
}

fn describe<T: std::fmt::Debug>(result: &Result<T, Fault>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(fault) => format!("fault: {fault}"),
    }
}
