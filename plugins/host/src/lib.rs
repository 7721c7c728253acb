//! Tenant plugins: WebAssembly components of the `roomcast:plugin/tenant-plugin` world
//! (`wit/roomcast-plugin.wit`), run sandboxed in wasmtime.
//!
//! Scopes, as in Spin:
//! * process — one [`PluginHost`]: one `Engine` (fuel and epoch interruption on, instances from
//!   a pool of reserved slots with copy-on-write memory images: [`POOL`]), one `Linker`
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

use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine};

/// The current world, `roomcast:plugin@0.2.0` (`wit/roomcast-plugin.wit`): the host's own types
/// are this world's.
pub mod v02 {
    wasmtime::component::bindgen!({
        world: "tenant-plugin",
        path: "../../wit/roomcast-plugin.wit",
        additional_derives: [PartialEq, Eq],
        // Guest code runs as a future, so that a call parked in a host call (a sleep, a poll, a
        // read) can be abandoned at its deadline: epoch interruption only stops wasm code.
        exports: { default: async },
    });
}

/// The first world, `roomcast:plugin@0.1.0` (`wit/0.1.0/`): its components still load and
/// behave as they did — `validate` then `route` on one instance, and `welcome` for every
/// connection. Its values are converted to and from the current world's at the boundary.
pub mod v01 {
    wasmtime::component::bindgen!({
        world: "tenant-plugin",
        path: "../../wit/0.1.0/roomcast-plugin.wit",
        additional_derives: [PartialEq, Eq],
        exports: { default: async },
    });
}

pub use self::v02::roomcast::plugin::types::{
    Hooks, JoinDecision, JoinRequest, Message, MessageOutcome, Routing, Verdict, WelcomeInfo,
};

pub use self::calls::MessageCalls;
pub use self::instance::{ConfigValues, Instance, plain_routing};
pub use self::lifecycle::{PluginRules, WithPlugins, upload};
pub use self::v02::roomcast::plugin::host::Level;
pub use roomcast_processor::model::LimitOverrides;
pub use roomcast_processor::rules::{CEILING, CallRecord, CallReport, Limits};

mod calls;
mod instance;
pub mod lifecycle;
pub mod registry;

use self::instance::State;

/// The monotonic clock interface as the WASI host defines it (plugins importing any 0.2.x
/// version link to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// How often the epoch ticks: the granularity of the wall-clock deadline.
pub(crate) const EPOCH_TICK: Duration = roomcast_processor::rules::MIN_DEADLINE;

/// A component that could not become a plugin. Found at upload or activation, never later.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("component is {size} bytes; the limit is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("not a WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("the component imports something plugins may not use: {0}")]
    ForbiddenImport(String),
    #[error("the component does not implement roomcast:plugin/tenant-plugin@0.2.0 (nor @0.1.0): {0}")]
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
    /// The plugin's rewrite (or greeting) would make the frame its recipients get pass API
    /// Gateway's 128 KB. How far a rewrite grows depends on the sender's message, so any user
    /// could cause it at will: the policy applies, and the breaker is not told. (An output far
    /// over the limit is still stopped while it is copied: `OutputTooLargeToCopy`.)
    #[error("made a frame of {size} bytes; a frame is at most {limit}")]
    FrameTooLarge { size: usize, limit: usize },
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
    /// A short name of the kind, for metrics (`PluginFaults_<kind>`).
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::OutOfFuel(_) => "out_of_fuel",
            Fault::Deadline(_) => "deadline",
            Fault::Memory(_) => "memory",
            Fault::Trap(_) => "trap",
            Fault::OutputTooLarge { .. } | Fault::OutputTooLargeToCopy { .. } => "output_too_large",
            Fault::InputTooLarge { .. } => "input_too_large",
            Fault::FrameTooLarge { .. } => "frame_too_large",
            Fault::RoutedTooWide { .. } => "routed_too_wide",
            Fault::BreakerOpen => "breaker_open",
            Fault::Host(_) => "host",
        }
    }

    /// Whether the plugin was called and failed: not the breaker speaking for it, not the host,
    /// not the caller's size checks.
    pub fn is_the_plugins(&self) -> bool {
        !matches!(self, Fault::BreakerOpen | Fault::Host(_) | Fault::InputTooLarge { .. } | Fault::FrameTooLarge { .. })
    }

    /// Whether the plugin was called at all (its breaker may learn from the outcome).
    pub fn was_called(&self) -> bool {
        !matches!(self, Fault::BreakerOpen | Fault::Host(_) | Fault::InputTooLarge { .. })
    }
}

/// A compiled, checked plugin: ready to instantiate.
#[derive(Clone)]
pub struct Plugin {
    pre: Pre,
    /// The optional hooks it implements: asked once (`hooks`), the first time they matter.
    hooks: Arc<std::sync::OnceLock<Hooks>>,
    pub sha256: String,
    pub size: usize,
    /// Loaded from this host's precompiled-artifact directory instead of compiled.
    pub from_artifact: bool,
}

/// A component ready to instantiate, of either world.
#[derive(Clone)]
pub(crate) enum Pre {
    V02(v02::TenantPluginPre<State>),
    V01(v01::TenantPluginPre<State>),
}

impl Plugin {
    /// The world the component implements: `0.2.0` or `0.1.0`.
    pub fn world(&self) -> &'static str {
        match self.pre {
            Pre::V02(_) => "0.2.0",
            Pre::V01(_) => "0.1.0",
        }
    }

    /// The optional hooks, if they have been asked already ([`PluginHost::hooks`] asks).
    pub fn known_hooks(&self) -> Option<Hooks> {
        self.hooks.get().copied()
    }

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

/// How many plugin instances a process can hold at once, and their parts. Every message gets a
/// fresh instance, so instantiation is on the hot path: wasmtime's pooling allocator reserves
/// these slots once (address space, not memory) and reuses them, resetting a memory to its
/// copy-on-write image instead of mapping a new one, which takes an instance from tens of
/// microseconds to a few (docs/PERFORMANCE.md, "A plugin hook").
///
/// Instances are made and dropped within one call on a blocking thread, and the registry holds
/// each one's memory cap (at least 1 MiB) of the plugin memory budget while it lives, so fewer
/// than [`POOL`]`.instances` exist at once in a processor (its budget is 1,024 MiB, and tokio
/// runs at most 512 blocking threads); a store that asked for a slot past the pool would fail
/// its instantiation like any other resource limit.
pub struct Pool {
    /// Component instances alive at once.
    pub instances: u32,
    /// Core module instances, linear memories and tables over all of them (a Rust component
    /// brings a handful of each).
    pub core_instances: u32,
    pub memories: u32,
    pub tables: u32,
    /// The most any one component may bring (the store's own limit, `Budget::COUNT`, is the same).
    pub per_component: u32,
}

/// The pool every [`PluginHost`] reserves (see [`Pool`]).
pub const POOL: Pool = Pool { instances: 1000, core_instances: 8000, memories: 2000, tables: 2000, per_component: 32 };

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
    /// A host whose instances come from the pool ([`POOL`]).
    pub fn new() -> anyhow::Result<PluginHost> {
        PluginHost::with_allocation(true)
    }

    /// A host that maps every instance's memory anew and unmaps it after (wasmtime's on-demand
    /// allocator), as before the pool: for the benchmark's before-and-after in one run.
    pub fn on_demand() -> anyhow::Result<PluginHost> {
        PluginHost::with_allocation(false)
    }

    fn with_allocation(pooling: bool) -> anyhow::Result<PluginHost> {
        let mut config = Config::new();
        if pooling {
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_component_instances(POOL.instances)
                .total_core_instances(POOL.core_instances)
                .total_memories(POOL.memories)
                .total_tables(POOL.tables)
                .max_core_instances_per_component(POOL.per_component)
                .max_memories_per_component(POOL.per_component)
                .max_tables_per_component(POOL.per_component)
                // The most any tenant's limits allow; each store's own cap is its limiter's.
                .max_memory_size(roomcast_processor::model::PLUGIN_CEILING.memory_bytes)
                .table_elements(instance::TABLE_ELEMENTS)
                // A slot's first pages stay mapped between instances (reset in place, not
                // unmapped), so a small plugin's stack top is reused without page faults; the
                // rest is given back. Small, because every slot a container has used keeps them:
                // a hundred tenants' slots keep a few MiB, not hundreds.
                .linear_memory_keep_resident(64 << 10)
                .table_keep_resident(16 << 10);
            config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
            // A slot as large as the largest memory any tenant may have, not wasmtime's default
            // 4 GiB: the pool reserves every slot up front, and 2,000 slots of 4 GiB (8 TiB) per
            // host would leave room for only a dozen hosts in a process's address space (tests
            // and `roomcast dev` run several). Accesses are bounds-checked instead of relying on
            // a 4 GiB guard region.
            config.memory_reservation(roomcast_processor::model::PLUGIN_CEILING.memory_bytes as u64);
        }
        config.consume_fuel(true);
        config.epoch_interruption(true);
        // Deep recursion is the guest's problem: it traps within this stack, not ours.
        config.max_wasm_stack(512 << 10);
        // One linear memory per component instance's core modules is all the world needs; more
        // would each get the whole memory cap. (The store limiter caps each memory.)
        config.wasm_multi_memory(false);
        // 64-bit memories and tables neither: the world needs none, and their sizes overflow
        // what a budget counts.
        config.wasm_memory64(false);
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
        // Both worlds' imports: a 0.1.0 component links to the first, a 0.2.0 one to the second.
        v02::TenantPlugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |state| state)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        v01::TenantPlugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |state| state)
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
        // The engine's compatibility hash, digested with sha256: the same key in every process
        // of this build, whatever Rust release built it (std's `DefaultHasher` promises neither).
        let mut hasher = Sha256Hasher(sha2::Sha256::default());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hex::encode(&sha2::Digest::finalize(hasher.0)[..8]);
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
        let hooks = Arc::new(std::sync::OnceLock::new());
        let pre = match v02::TenantPluginPre::new(pre.clone()) {
            Ok(pre) => Pre::V02(pre),
            Err(current) => match v01::TenantPluginPre::new(pre) {
                Ok(pre) => {
                    // 0.1.0 has no optional hooks: `welcome` is called for every connection.
                    let _ = hooks.set(Hooks::WELCOME);
                    Pre::V01(pre)
                }
                Err(_) => return Err(Rejected::WrongWorld(root_cause(&current))),
            },
        };
        if !from_artifact {
            // Only a component that passed every check is worth keeping.
            self.save_artifact(&sha256, &component);
        }
        Ok(Plugin { pre, hooks, sha256, size: bytes.len(), from_artifact })
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
    /// in it, with no configuration. Instantiation runs guest code, so it can fault like a call.
    pub fn instantiate(&self, plugin: &Plugin, limits: &Limits) -> (Result<Instance, Fault>, CallReport) {
        Instance::new(&self.engine, plugin, limits, ConfigValues::default())
    }

    /// A ready instance that reads `config` through `host.config`.
    pub fn instantiate_with(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        config: ConfigValues,
    ) -> (Result<Instance, Fault>, CallReport) {
        Instance::new(&self.engine, plugin, limits, config)
    }

    /// One call on a fresh instance (`roomcast plugin test`, tests, benchmarks): instantiation's
    /// cost is in the report.
    fn once<R>(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        config: ConfigValues,
        call: impl FnOnce(&mut Instance) -> (Result<R, Fault>, CallReport),
    ) -> (Result<R, Fault>, CallReport) {
        let (instance, setup) = self.instantiate_with(plugin, limits, config);
        match instance {
            Ok(mut instance) => {
                let (result, report) = call(&mut instance);
                (result, report.after(setup))
            }
            Err(fault) => (Err(fault), setup),
        }
    }

    /// The verdict for a message on a fresh instance, unconfigured (tests).
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
        self.once(plugin, limits, ConfigValues::default(), |i| i.validate(message, record_time_ms))
    }

    /// The routing for a message on a fresh instance, unconfigured (tests).
    pub fn route(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        message: &Message,
        record_time_ms: u64,
    ) -> (Result<Routing, Fault>, CallReport) {
        self.once(plugin, limits, ConfigValues::default(), |i| i.route(message, record_time_ms))
    }

    pub fn welcome(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        info: &WelcomeInfo,
        record_time_ms: u64,
        config: ConfigValues,
    ) -> (Result<Option<String>, Fault>, CallReport) {
        self.once(plugin, limits, config, |i| i.welcome(info, record_time_ms))
    }

    /// The optional hooks `plugin` implements, asked on a fresh instance the first time and
    /// kept. A plugin whose `hooks` faults is taken to implement every hook: its joins then
    /// meet its failure policy, never a free pass. Call it from a blocking thread.
    pub fn hooks(&self, plugin: &Plugin, limits: &Limits) -> Hooks {
        if let Some(hooks) = plugin.known_hooks() {
            return hooks;
        }
        let (hooks, _) = self.once(plugin, limits, ConfigValues::default(), |i| i.hooks());
        let hooks = hooks.unwrap_or_else(|fault| {
            tracing::warn!(version = plugin.version(), %fault, "the plugin's hooks export faulted; every hook will be called");
            Hooks::all()
        });
        *plugin.hooks.get_or_init(|| hooks)
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

/// An error's chain, root cause first, in at most [`ERROR_TEXT_BYTES`]: the guest writes part of
/// it (its function names in a backtrace, its panic message), and it ends up in logs and in the
/// `rejected` frame a sender gets.
pub(crate) fn root_cause(error: &wasmtime::Error) -> String {
    let mut chain: Vec<String> = error.chain().map(|e| cut(&e.to_string(), ERROR_TEXT_BYTES / 2)).collect();
    chain.rotate_right(1);
    cut(&chain.join(": "), ERROR_TEXT_BYTES)
}

/// The most of a fault's text kept.
pub(crate) const ERROR_TEXT_BYTES: usize = 1024;

/// `text` cut at a character boundary to at most `max` bytes (with an ellipsis when cut).
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A `Hasher` that feeds what it is given into sha256 (for `Hash` values such as wasmtime's
/// compatibility hash); `finish` is not used.
struct Sha256Hasher(sha2::Sha256);

impl Hasher for Sha256Hasher {
    fn write(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }
    fn finish(&self) -> u64 {
        0
    }
}

/// Reads a component file for upload, test or replay, naming the file in any error.
pub fn read_component(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_faults_text_is_bounded_and_leads_with_its_root_cause() {
        // A hostile component controls much of a trap's text (its backtrace's function names).
        let error = wasmtime::format_err!("wasm trap: unreachable").context("f".repeat(100_000)).context("call");
        let text = root_cause(&error);
        assert!(text.len() <= ERROR_TEXT_BYTES, "{} bytes", text.len());
        assert!(text.starts_with("wasm trap: unreachable"), "{text:.80}");
        // Cut at a character boundary, with room for the ellipsis.
        assert_eq!(cut("héllo", 4), "h…");
        assert_eq!(cut("hello", 5), "hello");
    }
}
