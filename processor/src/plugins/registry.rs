//! Which plugin each tenant runs, with its limits, failure policy and circuit breaker, and the
//! calls the processor makes: [`Registry::decide_message`] and [`Registry::greeting`].
//!
//! * Bounded: at most [`Registry::with_capacity`] tenants' compiled plugins are kept; the least
//!   recently used one is evicted and reloaded from the table (or the host's precompiled
//!   artifacts) when that tenant next needs it. Plugins installed with `pin` (`--plugins DIR`,
//!   replay's `--plugin`) have no table record to come back from and are never evicted.
//! * Warm: within one batch ([`Warm`]), a tenant's calls reuse one instance (store + component);
//!   the batch drops it. An instance that faulted is never reused.
//! * Blame stays with the tenant: a fault applies the tenant's [`Policy`] (fail open to the
//!   default rules, or fail closed and reject), is counted, and after [`BREAKER_THRESHOLD`] faults
//!   in a row opens the breaker: the plugin is skipped (policy applied) for [`BREAKER_COOLDOWN`].
//!   Nothing here ever fails a batch or touches another tenant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{CallReport, Fault, Instance, Limits, Message, Plugin, PluginHost, Verdict, WelcomeInfo};
use crate::metrics::Metrics;
use crate::react::{Decision, Route};

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
    last_used: Mutex<Instant>,
}

/// One plugin call as it happened, for logs and replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub hook: &'static str,
    pub outcome: String,
    pub report: CallReport,
}

/// The instances of one batch, per tenant and version: made on a tenant's first call in the
/// batch, reused by its next ones, dropped with the batch. At most [`WARM_IDLE_LIMIT`] are kept
/// idle: each may hold up to its memory cap, and a batch of 100 records can touch 100 tenants.
#[derive(Clone, Default)]
pub struct Warm {
    pool: Arc<Mutex<Pool>>,
    /// Per tenant, this batch's one look-up of its `ACTIVE` pointer.
    looked_up: Arc<Mutex<HashMap<String, Arc<tokio::sync::OnceCell<()>>>>>,
}

/// Idle instances a batch keeps for reuse; past it, an instance is dropped after its call and
/// the tenant's next call instantiates afresh (tens of microseconds).
pub const WARM_IDLE_LIMIT: usize = 16;

/// Idle instances by (tenant, version).
type Pool = HashMap<(String, String), Vec<Instance>>;

impl Warm {
    /// The batch's look-up of `tenant`'s `ACTIVE` pointer: the first record of the tenant runs
    /// it, the others (of other rooms, running at the same time) wait for it.
    pub fn look_up(&self, tenant: &str) -> Arc<tokio::sync::OnceCell<()>> {
        self.looked_up.lock().unwrap_or_else(|p| p.into_inner()).entry(tenant.to_string()).or_default().clone()
    }

    fn take(&self, tenant: &str, version: &str) -> Option<Instance> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.get_mut(&(tenant.to_string(), version.to_string())).and_then(Vec::pop)
    }

    fn give_back(&self, tenant: &str, version: &str, instance: Instance) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.values().map(Vec::len).sum::<usize>() < WARM_IDLE_LIMIT {
            pool.entry((tenant.to_string(), version.to_string())).or_default().push(instance);
        }
    }
}

pub struct Registry {
    host: Arc<PluginHost>,
    limits: Limits,
    capacity: usize,
    tenants: RwLock<HashMap<String, Arc<Installed>>>,
    /// Per tenant, the (version, pointer revision) that could not be loaded here.
    unloadable: Mutex<HashMap<String, (String, Option<String>)>>,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(host: Arc<PluginHost>, metrics: Arc<Metrics>) -> Registry {
        Registry {
            host,
            limits: Limits::default(),
            capacity: DEFAULT_CAPACITY,
            tenants: RwLock::new(HashMap::new()),
            unloadable: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// The registry a deployment configures: limits, cache bound and artifact directory.
    pub fn from_config(config: &crate::config::Config, metrics: Arc<Metrics>) -> anyhow::Result<Registry> {
        let mut host = PluginHost::new()?;
        if let Some(dir) = &config.plugin_artifact_dir {
            host = host.with_artifact_dir(dir)?;
        }
        Ok(Registry::new(Arc::new(host), metrics)
            .with_limits(config.plugin_limits.clone())
            .with_capacity(config.plugin_cache_tenants))
    }

    /// The deployment's limits: what plugins run with unless their upload overrides them.
    pub fn with_limits(mut self, limits: Limits) -> Registry {
        self.limits = limits;
        self
    }

    /// How many tenants' compiled plugins are kept at most.
    pub fn with_capacity(mut self, tenants: usize) -> Registry {
        self.capacity = tenants.max(1);
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
            last_used: Mutex::new(Instant::now()),
        });
        self.unloadable.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
        let mut tenants = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        tenants.insert(tenant.to_string(), installed);
        while tenants.len() > self.capacity {
            let victim = tenants
                .iter()
                .filter(|(name, i)| !i.pinned && name.as_str() != tenant)
                .min_by_key(|(_, i)| *i.last_used.lock().unwrap_or_else(|p| p.into_inner()))
                .map(|(name, _)| name.clone());
            let Some(victim) = victim else { break };
            tenants.remove(&victim);
            Metrics::add(&self.metrics.plugin_evictions, 1);
            tracing::info!(tenant = %victim, capacity = self.capacity, "plugin evicted from the cache; it reloads on next use");
        }
    }

    /// The tenant runs no plugin (until the table says otherwise).
    pub fn remove(&self, tenant: &str) {
        self.tenants.write().unwrap_or_else(|p| p.into_inner()).remove(tenant);
    }

    /// The version the tenant runs here, if any.
    pub fn installed_version(&self, tenant: &str) -> Option<String> {
        self.get(tenant).map(|i| i.plugin.version().to_string())
    }

    /// The limits the tenant's plugin runs with here, if it has one.
    pub fn installed_limits(&self, tenant: &str) -> Option<Limits> {
        self.get(tenant).map(|i| i.limits.clone())
    }

    /// How many tenants' plugins are loaded.
    pub fn loaded(&self) -> usize {
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).len()
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
        self.unloadable.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).cloned()
    }

    /// Remembers that the version the tenant's pointer names (at that revision) cannot be loaded.
    pub fn set_unloadable(&self, tenant: &str, wanted: (String, Option<String>)) {
        self.unloadable.lock().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), wanted);
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
        self.tenants.read().unwrap_or_else(|p| p.into_inner()).get(tenant).cloned()
    }

    /// Runs a hook on a blocking thread (a call may take up to its deadline), on the batch's warm
    /// instance of the tenant's plugin when there is one, with the breaker.
    async fn run<R: Send + 'static>(
        &self,
        warm: &Warm,
        tenant: &str,
        hook: &'static str,
        call: impl FnOnce(&mut Instance) -> (Result<R, Fault>, CallReport) + Send + 'static,
    ) -> Option<(Result<R, Fault>, CallReport, Policy)> {
        let installed = self.get(tenant)?;
        *installed.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        {
            let breaker = installed.breaker.lock().unwrap_or_else(|p| p.into_inner());
            if breaker.open_until.is_some_and(|until| Instant::now() < until) {
                tracing::warn!(tenant, hook, "plugin breaker open: applying the failure policy without calling it");
                return Some((Err(Fault::BreakerOpen), CallReport::default(), installed.policy));
            }
        }
        let version = installed.plugin.version().to_string();
        let ready = warm.take(tenant, &version);
        if ready.is_none() {
            Metrics::add(&self.metrics.plugin_instances, 1);
        }
        let host = self.host.clone();
        let running = installed.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let (instance, setup) = match ready {
                Some(instance) => (Ok(instance), CallReport::default()),
                None => host.instantiate(&running.plugin, &running.limits),
            };
            match instance {
                Ok(mut instance) => {
                    let (result, report) = call(&mut instance);
                    // A faulted instance is never reused: wasmtime refuses re-entry after a trap.
                    let keep = result.is_ok().then_some(instance);
                    (result, report.after(setup), keep)
                }
                Err(fault) => (Err(fault), setup, None),
            }
        })
        .await;
        let (result, report) = match joined {
            Ok((result, report, keep)) => {
                if let Some(instance) = keep {
                    warm.give_back(tenant, &version, instance);
                }
                (result, report)
            }
            Err(e) => (Err(Fault::Host(format!("the plugin call did not complete: {e}"))), CallReport::default()),
        };
        if let Err(fault) = &result
            && fault.is_the_plugins()
        {
            Metrics::add(&self.metrics.plugin_faults, 1);
            tracing::warn!(tenant, hook, %fault, "plugin fault");
        }
        if let Err(Fault::Host(why)) = &result {
            tracing::error!(tenant, hook, %why, "the plugin host failed around a call; the policy applies");
        }
        tracing::debug!(
            tenant,
            hook,
            fuel = report.fuel_used,
            elapsed_us = report.elapsed.as_micros() as u64,
            "plugin call"
        );
        Some((result, report, installed.policy))
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

    /// Validation then routing for one message; `None` when the tenant has no plugin.
    ///
    /// Failure policy, for every hook: fail-closed rejects the message; fail-open delivers it by
    /// the default rules — to its room, as if there were no plugin, never to anyone outside it.
    pub async fn decide_message(
        &self,
        warm: &Warm,
        message: &Message,
        record_time_ms: u64,
    ) -> Option<(Decision, Route, Vec<CallRecord>)> {
        let tenant = message.tenant.clone();
        let installed = self.get(&tenant)?;
        let (limits, policy) = (installed.limits.clone(), installed.policy);
        let on_fault = |fault: &Fault| match policy {
            Policy::FailOpen => Decision::Deliver { rewritten: None },
            Policy::FailClosed => {
                Decision::Reject { reason: format!("the room's rules could not be checked ({fault})") }
            }
        };
        // The caller's checks come first and are the caller's: a message too large for the
        // plugin (only a record written around the handlers can be) is never the plugin's fault.
        if let Err(too_large) = super::instance::check_input(message, &limits) {
            let call = CallRecord {
                hook: "validate",
                outcome: format!("not called: {too_large}"),
                report: CallReport::default(),
            };
            // Never delivered unchecked, whatever the policy: the plugin could not see it.
            let reason = format!("the message is too large for the room's rules ({too_large})");
            Metrics::add(&self.metrics.rejected, 1);
            return Some((Decision::Reject { reason }, Route::default(), vec![call]));
        }
        let mut calls = Vec::new();
        let input = message.clone();
        let (mut result, report, _) =
            self.run(warm, &tenant, "validate", move |i| i.validate(&input, record_time_ms)).await?;
        // A rewrite must still fit the frame every recipient gets.
        if let Ok(Verdict::Rewrite(text)) = &result {
            let size = outgoing_size(message, text);
            if size > crate::protocol::MAX_OUTGOING_BYTES {
                result = Err(Fault::OutputTooLarge { size, limit: crate::protocol::MAX_OUTGOING_BYTES });
                Metrics::add(&self.metrics.plugin_faults, 1);
            }
        }
        let mut faulted = result.as_ref().is_err_and(Fault::is_the_plugins);
        let validated = result.as_ref().map(|_| ()).map_err(Clone::clone);
        calls.push(CallRecord { hook: "validate", outcome: describe(&result), report });
        let decision = match result {
            Ok(Verdict::Accept) => Decision::Deliver { rewritten: None },
            Ok(Verdict::Rewrite(text)) => Decision::Deliver { rewritten: Some(text) },
            Ok(Verdict::Reject(reason)) => Decision::Reject { reason: bounded_reason(reason) },
            Err(ref fault) => on_fault(fault),
        };
        if let Decision::Reject { .. } = decision {
            self.settle_breaker(&tenant, faulted);
            Metrics::add(&self.metrics.rejected, 1);
            return Some((decision, Route::default(), calls));
        }
        let input = message.clone();
        let (mut decision, mut route) = (decision, Route::default());
        // After a validate fault (fail-open) the default rules apply: route is not asked, so a
        // faulting plugin costs one call per message, not two.
        let routed = if faulted || matches!(validated, Err(Fault::BreakerOpen)) {
            None
        } else {
            self.run(warm, &tenant, "route", move |i| i.route(&input, record_time_ms)).await
        };
        if let Some((result, report, _)) = routed {
            let result = result.and_then(|r| {
                narrow(r, &message.room, &limits).inspect_err(|fault| {
                    Metrics::add(&self.metrics.plugin_faults, 1);
                    tracing::warn!(tenant = %tenant, hook = "route", %fault, "plugin fault");
                })
            });
            faulted |= result.as_ref().is_err_and(Fault::is_the_plugins);
            calls.push(CallRecord { hook: "route", outcome: describe(&result), report });
            match result {
                Ok(narrowed) => route = narrowed,
                Err(fault) => {
                    if let Decision::Reject { .. } = on_fault(&fault) {
                        decision = on_fault(&fault);
                        Metrics::add(&self.metrics.rejected, 1);
                    }
                }
            }
        }
        self.settle_breaker(&tenant, faulted);
        Some((decision, route, calls))
    }

    /// The tenant plugin's greeting for a welcome, if any. A fault or a greeting too large for
    /// the welcome frame means no greeting; the welcome itself always goes out.
    pub async fn greeting(
        &self,
        warm: &Warm,
        info: &WelcomeInfo,
        record_time_ms: u64,
    ) -> Option<(Option<String>, CallRecord)> {
        let input = info.clone();
        let (mut result, report, _) =
            self.run(warm, &info.tenant, "welcome", move |i| i.welcome(&input, record_time_ms)).await?;
        if let Ok(Some(greeting)) = &result {
            let welcome = crate::protocol::ServerMessage::Welcome {
                connection_id: info.connection_id.clone(),
                tenant: info.tenant.clone(),
                user_id: info.user_id.clone(),
                rooms: info.rooms.clone(),
                greeting: Some(greeting.clone()),
            };
            let size = welcome.to_json().len();
            if size > crate::protocol::MAX_OUTGOING_BYTES {
                result = Err(Fault::OutputTooLarge { size, limit: crate::protocol::MAX_OUTGOING_BYTES });
                Metrics::add(&self.metrics.plugin_faults, 1);
            }
        }
        self.settle_breaker(&info.tenant, result.as_ref().is_err_and(Fault::is_the_plugins));
        let record = CallRecord { hook: "welcome", outcome: describe(&result), report };
        Some((result.unwrap_or(None), record))
    }
}

/// A plugin's reject reason, cut (at a character boundary) to what the sender's `rejected`
/// frame can carry: the sender must hear of the rejection, not get a 413.
fn bounded_reason(mut reason: String) -> String {
    const MAX: usize = 4096;
    if reason.len() > MAX {
        let mut end = MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// The frame a recipient gets for `message` with its body rewritten to `text`, in bytes.
fn outgoing_size(message: &Message, text: &str) -> usize {
    let chat = crate::protocol::ChatMessage {
        id: message.id.clone(),
        room: message.room.clone(),
        user_id: message.user_id.clone(),
        message: text.to_string(),
        timestamp: message.timestamp.clone(),
    };
    crate::protocol::ServerMessage::Message(chat).to_json().len()
}

/// A plugin's routing as the processor applies it: extra rooms without repeats, without the
/// message's own room and without names that are not rooms; users without repeats; each list
/// within the tenant's limits (a longer one is the plugin's fault, not silently cut).
fn narrow(routing: super::Routing, own_room: &str, limits: &Limits) -> Result<Route, Fault> {
    let mut rooms: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for room in routing.extra_rooms {
        if room != own_room && crate::model::Name::parse("room", &room).is_ok() && seen.insert(room.clone()) {
            rooms.push(room);
            if rooms.len() > limits.max_extra_rooms {
                return Err(Fault::RoutedTooWide {
                    what: "extra rooms",
                    count: rooms.len(),
                    limit: limits.max_extra_rooms,
                });
            }
        }
    }
    let only_users = match routing.only_users {
        None => None,
        Some(users) => {
            let mut unique: Vec<String> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for user in users {
                if seen.insert(user.clone()) {
                    unique.push(user);
                }
                if unique.len() > limits.max_only_users {
                    return Err(Fault::RoutedTooWide {
                        what: "users",
                        count: unique.len(),
                        limit: limits.max_only_users,
                    });
                }
            }
            Some(unique)
        }
    };
    Ok(Route { extra_rooms: rooms, only_users, echo_to_sender: routing.echo_to_sender })
}

fn describe<T: std::fmt::Debug>(result: &Result<T, Fault>) -> String {
    match result {
        Ok(value) => format!("{value:?}"),
        Err(fault) => format!("fault: {fault}"),
    }
}
