//! Tenant plugins: WebAssembly components of the `roomcast:plugin/tenant-plugin` world
//! (`wit/roomcast-plugin.wit`), run sandboxed in wasmtime.
//!
//! Scopes, as in Spin:
//! * process — one [`PluginHost`]: one `Engine` (fuel and epoch interruption on), one `Linker`
//!   with WASI locked down (no env, args, directories or network; stdout and stderr into the
//!   bounded log; clocks that show the record's time; random numbers seeded from the record) and our imports;
//!   and, optionally, a directory of precompiled artifacts that only this host writes;
//! * tenant-version — a compiled [`Plugin`]: the `Component` and its `InstancePre`, checked
//!   against the world when it is compiled;
//! * message — an [`Instance`]: a `Store` with [`Limits`] (memory cap) and the instantiated
//!   component, made for one message's `validate` and `route` (or one welcome) and dropped after
//!   ([`PluginHost::message`]): nothing carries from one message to the next;
//! * call — fuel, an epoch deadline, the record's time and a fresh bounded log are set anew for
//!   every call. After any fault the instance is dropped: wasmtime refuses re-entry after a trap.
//!
//! Blame: everything that goes wrong inside a call is a [`Fault`] — the tenant's, never the
//! platform's. The processor applies the tenant's failure policy; it never fails a batch for it.

use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

wasmtime::component::bindgen!({
    world: "tenant-plugin",
    path: "../wit",
    additional_derives: [PartialEq, Eq],
    // Guest code runs as a future, so that a call parked in a host call (a sleep, a poll, a read)
    // can be abandoned at its deadline: epoch interruption only stops wasm code.
    exports: { default: async },
});

pub use self::calls::MessageCalls;
pub use self::instance::{CallReport, Instance};
pub use self::roomcast::plugin::host::Level;

mod calls;
mod instance;
pub mod registry;

use self::instance::State;

/// The monotonic clock interface as the WASI host defines it (plugins importing any 0.2.x
/// version link to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// How often the epoch ticks: the granularity of the wall-clock deadline.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Per-call limits (DESIGN.md: in the spirit of Shopify Functions' budget). The deployment sets
/// the defaults (`ROOMCAST_PLUGIN_*`); an uploaded version may carry [`LimitOverrides`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel per call (roughly, wasm instructions).
    pub fuel: u64,
    /// Wall-clock backstop per call, for time spent outside fuel (host calls).
    pub deadline: Duration,
    /// Linear memory and tables, in bytes.
    pub memory_bytes: usize,
    /// The largest component accepted for compilation.
    pub component_bytes: usize,
    /// The largest input (message) and output (rewrite, reason, greeting, routing) of a call.
    pub io_bytes: usize,
    /// The call's log, in bytes.
    pub log_bytes: usize,
    /// Rooms a `route` may add (after dropping repeats and the message's own room).
    pub max_extra_rooms: usize,
    /// Users a `route` may narrow a message to.
    pub max_only_users: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 10_000_000,
            deadline: Duration::from_millis(100),
            memory_bytes: 16 << 20,
            component_bytes: 4 << 20,
            io_bytes: 128 << 10,
            log_bytes: 1 << 10,
            max_extra_rooms: 8,
            max_only_users: 100,
        }
    }
}

/// The most any tenant's overrides may ask for, whatever they say: one plugin call must never be
/// able to hold a processor for long or take a large share of its memory.
pub const CEILING: Limits = Limits {
    fuel: 200_000_000,
    deadline: Duration::from_secs(1),
    memory_bytes: 128 << 20,
    component_bytes: 4 << 20,
    io_bytes: 128 << 10,
    log_bytes: 16 << 10,
    max_extra_rooms: 64,
    max_only_users: 1000,
};

/// Per-tenant limits, stored with an uploaded version (`roomcast plugin upload --fuel …`).
/// Unset fields take the deployment's value; set ones are capped at [`CEILING`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_bytes: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_extra_rooms: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_only_users: Option<usize>,
}

impl LimitOverrides {
    pub fn is_empty(&self) -> bool {
        *self == LimitOverrides::default()
    }
}

impl Limits {
    /// These limits with a tenant's overrides applied, each capped at [`CEILING`].
    pub fn with_overrides(&self, o: &LimitOverrides) -> Limits {
        Limits {
            fuel: o.fuel.unwrap_or(self.fuel).clamp(1, CEILING.fuel),
            deadline: o.deadline_ms.map_or(self.deadline, Duration::from_millis).clamp(EPOCH_TICK, CEILING.deadline),
            memory_bytes: o.memory_mib.map_or(self.memory_bytes, |m| m << 20).clamp(1 << 20, CEILING.memory_bytes),
            log_bytes: o.log_bytes.unwrap_or(self.log_bytes).min(CEILING.log_bytes),
            max_extra_rooms: o.max_extra_rooms.unwrap_or(self.max_extra_rooms).min(CEILING.max_extra_rooms),
            max_only_users: o.max_only_users.unwrap_or(self.max_only_users).min(CEILING.max_only_users),
            ..self.clone()
        }
    }
}

/// A component that could not become a plugin. Found at upload or activation, never later.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("component is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("the component imports something plugins may not use: {0}")]
    ForbiddenImport(String),
    #[error("the component does not implement roomcast:plugin/tenant-plugin@0.1.0: {0}")]
    WrongWorld(String),
}

/// What went wrong inside one call: the tenant's fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    #[error("ran out of fuel ({0} units)")]
    OutOfFuel(u64),
    #[error("exceeded its {0:?} deadline")]
    Deadline(Duration),
    #[error("exceeded its memory limit of {0} bytes")]
    Memory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an output of {size} bytes; the limit is {limit}")]
    OutputTooLarge { size: usize, limit: usize },
    /// Stopped while its output was being copied to the host, long before it was all there.
    #[error("returned an output far over the {limit} byte limit")]
    OutputTooLargeToCopy { limit: usize },
    #[error("was given an input of {size} bytes; the limit is {limit}")]
    InputTooLarge { size: usize, limit: usize },
    #[error("routed to {count} {what}; the limit is {limit}")]
    RoutedTooWide { what: &'static str, count: usize, limit: usize },
    /// Not a call: the breaker is open after repeated faults, and the policy applies.
    #[error("circuit breaker open after repeated faults")]
    BreakerOpen,
    /// The host failed around the call (its thread panicked, the runtime is shutting down):
    /// the policy applies, and the plugin is not blamed.
    #[error("the host could not run it: {0}")]
    Host(String),
}

impl Fault {
    /// Whether the plugin was called and failed: not the breaker speaking for it, not the host,
    /// not the caller's input check.
    pub fn is_the_plugins(&self) -> bool {
        !matches!(self, Fault::BreakerOpen | Fault::Host(_) | Fault::InputTooLarge { .. })
    }
}

/// A compiled, checked plugin: ready to instantiate.
#[derive(Clone)]
pub struct Plugin {
    pre: TenantPluginPre<State>,
    pub sha256: String,
    pub size: usize,
    /// Loaded from this host's precompiled-artifact directory instead of compiled.
    pub from_artifact: bool,
}

impl Plugin {
    /// Content-addressed: the first 16 hex digits of the component's sha256.
    pub fn version(&self) -> &str {
        &self.sha256[..16.min(self.sha256.len())]
    }
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("sha256", &self.sha256).field("size", &self.size).finish()
    }
}

/// The process-wide plugin runtime.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<State>,
    stop_ticker: Arc<AtomicBool>,
    /// Where compiled components are kept between activations (and processes), if anywhere.
    artifacts: Option<PathBuf>,
    /// The engine's compatibility hash: an artifact is only loaded by an engine that made it.
    engine_key: String,
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

impl PluginHost {
    pub fn new() -> anyhow::Result<PluginHost> {
        let mut config = Config::new();
        config.consume_fuel(true);
        config.epoch_interruption(true);
        // Deep recursion is the guest's problem: it traps within this stack, not ours.
        config.max_wasm_stack(512 << 10);
        // One linear memory per component instance's core modules is all the world needs; more
        // would each get the whole memory cap. (The store limiter caps each memory.)
        config.wasm_multi_memory(false);
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut linker: Linker<State> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e}"))?;
        // The plugin's clocks stand at the record's time, so its sleeps are virtual: a
        // subscription moves the call's clock on and is ready at once (`instance::sleep`).
        linker.allow_shadowing(true);
        let mut clock = linker.instance(MONOTONIC_CLOCK).map_err(|e| anyhow::anyhow!("{e}"))?;
        clock
            .func_wrap("subscribe-duration", |store, (nanos,): (u64,)| Ok((instance::sleep(store, nanos)?,)))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        clock
            .func_wrap("subscribe-instant", |store, (when,): (u64,)| {
                let now = instance::monotonic_now(&store);
                Ok((instance::sleep(store, when.saturating_sub(now))?,))
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        linker.allow_shadowing(false);
        TenantPlugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |state| state)
            .map_err(|e| anyhow::anyhow!("{e}"))?;

        // The epoch deadline's clock: one tick per EPOCH_TICK, on a thread of its own.
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let (ticker_engine, stop) = (engine.weak(), stop_ticker.clone());
        std::thread::Builder::new().name("roomcast-plugin-epoch".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                match ticker_engine.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        Ok(PluginHost { engine, linker, stop_ticker, artifacts: None, engine_key })
    }

    /// Keeps compiled components in `dir` (created `0700`), keyed by the component's sha256 and
    /// the engine's compatibility hash, so a later activation of the same bytes — after an
    /// eviction, or in a new process — deserializes instead of compiling. Only files this host
    /// wrote are ever loaded: tenants supply component bytes, never artifacts.
    pub fn with_artifact_dir(mut self, dir: impl Into<PathBuf>) -> anyhow::Result<PluginHost> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create the plugin artifact directory {}: {e}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| anyhow::anyhow!("cannot restrict {} to its owner: {e}", dir.display()))?;
        }
        self.artifacts = Some(dir);
        Ok(self)
    }

    /// Compiles a component (or loads this host's precompiled artifact of the same bytes) and
    /// checks it against the world. Never on a batch's hot path: at upload and activation.
    pub fn compile(&self, bytes: &[u8], limits: &Limits) -> Result<Plugin, Rejected> {
        if bytes.len() > limits.component_bytes {
            return Err(Rejected::TooLarge { size: bytes.len(), limit: limits.component_bytes });
        }
        let sha256 = sha256_hex(bytes);
        let (component, from_artifact) = match self.load_artifact(&sha256) {
            Some(component) => (component, true),
            None => {
                let component =
                    Component::new(&self.engine, bytes).map_err(|e| Rejected::NotAComponent(root_cause(&e)))?;
                (component, false)
            }
        };
        let pre = self.linker.instantiate_pre(&component).map_err(|e| Rejected::ForbiddenImport(root_cause(&e)))?;
        let pre = TenantPluginPre::new(pre).map_err(|e| Rejected::WrongWorld(root_cause(&e)))?;
        if !from_artifact {
            // Only a component that passed every check is worth keeping.
            self.save_artifact(&sha256, &component);
        }
        Ok(Plugin { pre, sha256, size: bytes.len(), from_artifact })
    }

    fn artifact_path(&self, sha256: &str) -> Option<PathBuf> {
        self.artifacts.as_ref().map(|dir| dir.join(format!("{sha256}-{}.cwasm", self.engine_key)))
    }

    fn load_artifact(&self, sha256: &str) -> Option<Component> {
        let path = self.artifact_path(sha256)?;
        // Read into memory rather than mapped (`deserialize_file`): a file truncated under a
        // mapping would kill the process with SIGBUS, not fail this load.
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: `path` is in the directory this host owns (0700), named by the sha256 of
        // component bytes it compiled itself and by this engine's compatibility hash; it was
        // written by `save_artifact` from `Component::serialize`, atomically (rename). Tenants
        // never supply precompiled code: their uploads only ever reach `Component::new`.
        match unsafe { Component::deserialize(&self.engine, &bytes) } {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %root_cause(&e), "discarding an unreadable plugin artifact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn save_artifact(&self, sha256: &str, component: &Component) {
        let Some(path) = self.artifact_path(sha256) else { return };
        let written = component.serialize().map_err(|e| root_cause(&e)).and_then(|bytes| {
            let partial = path.with_extension(format!("{}.partial", std::process::id()));
            std::fs::write(&partial, bytes)
                .and_then(|()| std::fs::rename(&partial, &path))
                .map_err(|e| format!("{}: {e}", path.display()))
        });
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot keep the compiled plugin; the next activation compiles again");
        }
    }

    /// A ready instance of `plugin`: a store with the memory cap, and the component instantiated
    /// in it. Instantiation runs guest code, so it can fault like a call.
    pub fn instantiate(&self, plugin: &Plugin, limits: &Limits) -> (Result<Instance, Fault>, CallReport) {
        Instance::new(&self.engine, plugin, limits)
    }

    /// One call on a fresh instance (`roomcast plugin test`, tests, benchmarks): instantiation's
    /// cost is in the report.
    fn once<R>(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        call: impl FnOnce(&mut Instance) -> (Result<R, Fault>, CallReport),
    ) -> (Result<R, Fault>, CallReport) {
        let (instance, setup) = self.instantiate(plugin, limits);
        match instance {
            Ok(mut instance) => {
                let (result, report) = call(&mut instance);
                (result, report.after(setup))
            }
            Err(fault) => (Err(fault), setup),
        }
    }

    pub fn validate(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        message: &Message,
        record_time_ms: u64,
    ) -> (Result<Verdict, Fault>, CallReport) {
        if let Err(fault) = instance::check_input(message, limits) {
            return (Err(fault), CallReport::default());
        }
        self.once(plugin, limits, |i| i.validate(message, record_time_ms))
    }

    pub fn route(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        message: &Message,
        record_time_ms: u64,
    ) -> (Result<Routing, Fault>, CallReport) {
        self.once(plugin, limits, |i| i.route(message, record_time_ms))
    }

    pub fn welcome(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        info: &WelcomeInfo,
        record_time_ms: u64,
    ) -> (Result<Option<String>, Fault>, CallReport) {
        self.once(plugin, limits, |i| i.welcome(info, record_time_ms))
    }
}

/// The runtime plugin calls run on. Callers block on it from threads of their own (a
/// processor's `spawn_blocking`, the CLI's, a test's), so guest code runs on the caller's thread;
/// its one worker drives the timers that end a call parked in a host call at its deadline.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("roomcast-plugin-timers")
            .enable_all()
            .build()
            .expect("the plugin runtime starts")
    })
}

pub(crate) fn root_cause(error: &wasmtime::Error) -> String {
    let chain: Vec<String> = error.chain().map(|e| e.to_string()).collect();
    chain.join(": ")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a component file for upload, test or replay, naming the file in any error.
pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

/// `roomcast plugin upload`: checks a component as the processor will (size, a component, the
/// world, compiled here), then writes its chunks and metadata. The processor activates it on the
/// metadata's INSERT and records the outcome in its `status`.
pub async fn upload(
    store: &dyn crate::store::Store,
    host: &PluginHost,
    tenant: &str,
    bytes: &[u8],
    policy: crate::model::FailurePolicy,
    limits: LimitOverrides,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<crate::model::PluginMeta> {
    crate::model::Name::parse("tenant", tenant).map_err(|e| anyhow::anyhow!(e))?;
    let plugin = host.compile(bytes, &Limits::default())?;
    let mut meta = crate::model::PluginMeta::new(tenant, &plugin.sha256, bytes.len(), policy, now);
    meta.limits = (!limits.is_empty()).then_some(limits);
    let chunks = crate::model::plugin_chunks(tenant, &meta.version, bytes);
    store.put_plugin(&meta, &chunks).await?;
    Ok(meta)
}
