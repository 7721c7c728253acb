//! Tenant plugins: WebAssembly components of the `roomcast:plugin/tenant-plugin` world
//! (`wit/roomcast-plugin.wit`), run sandboxed in wasmtime.
//!
//! Scopes, as in Spin:
//! * process — one [`PluginHost`]: one `Engine` (fuel and epoch interruption on), one `Linker`
//!   with WASI locked down (no env, args, directories or network; stdout and stderr into the
//!   bounded log; clocks that show the record's time; a fixed random seed) and our two imports;
//! * tenant-version — a compiled [`Plugin`]: the `Component` and its `InstancePre`, checked
//!   against the world when it is compiled;
//! * call — a fresh `Store` with [`Limits`]: fuel, an epoch deadline, a memory cap, and bounded
//!   input, output and log. After any fault the store is dropped: wasmtime refuses re-entry.
//!
//! Blame: everything that goes wrong inside a call is a [`Fault`] — the tenant's, never the
//! platform's. The processor applies the tenant's failure policy; it never fails a batch for it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, Store, StoreLimits, StoreLimitsBuilder, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

wasmtime::component::bindgen!({ world: "tenant-plugin", path: "../wit", additional_derives: [PartialEq, Eq] });

pub use self::roomcast::plugin::host::Level;

pub mod registry;

/// How often the epoch ticks: the granularity of the wall-clock deadline.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Per-call limits (DESIGN.md: in the spirit of Shopify Functions' budget). Per tenant.
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
    #[error("was given an input of {size} bytes; the limit is {limit}")]
    InputTooLarge { size: usize, limit: usize },
}

/// What a call cost and said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallReport {
    pub fuel_used: u64,
    pub elapsed: Duration,
    pub log: Vec<String>,
}

/// A compiled, checked plugin: ready to instantiate per call.
#[derive(Clone)]
pub struct Plugin {
    pre: TenantPluginPre<State>,
    pub sha256: String,
    pub size: usize,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("sha256", &self.sha256).field("size", &self.size).finish()
    }
}

/// The per-call store's state.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    log: BoundedLog,
    record_time_ms: u64,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl self::roomcast::plugin::host::Host for State {
    fn log(&mut self, level: Level, message: String) {
        let level = match level {
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        };
        self.log.push(format!("{level}: {message}"));
    }

    fn record_time(&mut self) -> u64 {
        self.record_time_ms
    }
}

impl self::roomcast::plugin::types::Host for State {}

/// A log that keeps lines until a byte budget is spent, then says how many it dropped.
#[derive(Debug)]
struct BoundedLog {
    lines: Vec<String>,
    bytes: usize,
    limit: usize,
    dropped: usize,
}

impl BoundedLog {
    fn push(&mut self, line: String) {
        if self.bytes + line.len() > self.limit {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(line);
    }

    fn finish(mut self, stdio: &[MemoryOutputPipe]) -> Vec<String> {
        for pipe in stdio {
            let text = String::from_utf8_lossy(&pipe.contents()).into_owned();
            for line in text.lines().filter(|l| !l.is_empty()) {
                self.push(format!("stdio: {line}"));
            }
        }
        if self.dropped > 0 {
            self.lines
                .push(format!("({} more lines dropped: the log is limited to {} bytes)", self.dropped, self.limit));
        }
        self.lines
    }
}

/// A clock that always shows the record's time (replay is deterministic).
struct RecordClock(Duration);

impl wasmtime_wasi::HostWallClock for RecordClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }
    fn now(&self) -> Duration {
        self.0
    }
}

impl wasmtime_wasi::HostMonotonicClock for RecordClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }
    fn now(&self) -> u64 {
        self.0.as_nanos() as u64
    }
}

/// The process-wide plugin runtime.
pub struct PluginHost {
    engine: Engine,
    linker: Linker<State>,
    stop_ticker: Arc<AtomicBool>,
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
        let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut linker: Linker<State> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| anyhow::anyhow!("{e}"))?;
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
        Ok(PluginHost { engine, linker, stop_ticker })
    }

    /// Compiles a component and checks it against the world. Never on a batch's hot path: at
    /// upload and activation.
    pub fn compile(&self, bytes: &[u8], limits: &Limits) -> Result<Plugin, Rejected> {
        if bytes.len() > limits.component_bytes {
            return Err(Rejected::TooLarge { size: bytes.len(), limit: limits.component_bytes });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| Rejected::NotAComponent(root_cause(&e)))?;
        let pre = self.linker.instantiate_pre(&component).map_err(|e| Rejected::ForbiddenImport(root_cause(&e)))?;
        let pre = TenantPluginPre::new(pre).map_err(|e| Rejected::WrongWorld(root_cause(&e)))?;
        Ok(Plugin { pre, sha256: sha256_hex(bytes), size: bytes.len() })
    }

    fn store(&self, limits: &Limits, record_time_ms: u64) -> (Store<State>, Vec<MemoryOutputPipe>) {
        let stdout = MemoryOutputPipe::new(limits.log_bytes);
        let stderr = MemoryOutputPipe::new(limits.log_bytes);
        let time = RecordClock(Duration::from_millis(record_time_ms));
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(time)
            .monotonic_clock(RecordClock(Duration::from_millis(record_time_ms)))
            .insecure_random_seed(u128::from(record_time_ms))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limits: StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .table_elements(100_000)
                .instances(20)
                .trap_on_grow_failure(true)
                .build(),
            log: BoundedLog { lines: Vec::new(), bytes: 0, limit: limits.log_bytes, dropped: 0 },
            record_time_ms,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limits);
        // Fuel cannot run out while set: this store was made with fuel consumption on.
        let _ = store.set_fuel(limits.fuel);
        let ticks = (limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
        store.set_epoch_deadline(ticks);
        (store, vec![stdout, stderr])
    }

    /// One call into a fresh instance, with the limits enforced and the fault classified.
    fn call<R>(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        record_time_ms: u64,
        run: impl FnOnce(&TenantPlugin, &mut Store<State>) -> wasmtime::Result<R>,
    ) -> (Result<R, Fault>, CallReport) {
        let started = Instant::now();
        let (mut store, stdio) = self.store(limits, record_time_ms);
        let result = plugin.pre.instantiate(&mut store).and_then(|instance| run(&instance, &mut store));
        let fuel_used = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let result = result.map_err(|e| classify(&e, limits, fuel_used));
        let log = store.into_data().log.finish(&stdio);
        (result, CallReport { fuel_used, elapsed: started.elapsed(), log })
    }

    pub fn validate(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        message: &Message,
        record_time_ms: u64,
    ) -> (Result<Verdict, Fault>, CallReport) {
        let size = message.body.len() + message.room.len() + message.user_id.len() + message.id.len();
        if size > limits.io_bytes {
            return (Err(Fault::InputTooLarge { size, limit: limits.io_bytes }), CallReport::default());
        }
        let (result, report) = self.call(plugin, limits, record_time_ms, |p, store| p.call_validate(store, message));
        let result = result.and_then(|verdict| {
            let size = match &verdict {
                Verdict::Accept => 0,
                Verdict::Rewrite(text) | Verdict::Reject(text) => text.len(),
            };
            within(size, limits).map(|()| verdict)
        });
        (result, report)
    }

    pub fn route(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        message: &Message,
        record_time_ms: u64,
    ) -> (Result<Routing, Fault>, CallReport) {
        let (result, report) = self.call(plugin, limits, record_time_ms, |p, store| p.call_route(store, message));
        let result = result.and_then(|routing| {
            let size = routing.extra_rooms.iter().map(String::len).sum::<usize>()
                + routing.only_users.iter().flatten().map(String::len).sum::<usize>();
            within(size, limits).map(|()| routing)
        });
        (result, report)
    }

    pub fn welcome(
        &self,
        plugin: &Plugin,
        limits: &Limits,
        info: &WelcomeInfo,
        record_time_ms: u64,
    ) -> (Result<Option<String>, Fault>, CallReport) {
        let (result, report) = self.call(plugin, limits, record_time_ms, |p, store| p.call_welcome(store, info));
        let result =
            result.and_then(|greeting| within(greeting.as_ref().map_or(0, String::len), limits).map(|()| greeting));
        (result, report)
    }
}

fn within(size: usize, limits: &Limits) -> Result<(), Fault> {
    if size > limits.io_bytes { Err(Fault::OutputTooLarge { size, limit: limits.io_bytes }) } else { Ok(()) }
}

fn classify(error: &wasmtime::Error, limits: &Limits, fuel_used: u64) -> Fault {
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => return Fault::OutOfFuel(fuel_used.max(limits.fuel)),
        Some(Trap::Interrupt) => return Fault::Deadline(limits.deadline),
        _ => {}
    }
    let text = format!("{error:?}");
    if text.contains("growing memory") || text.contains("memory size") || text.contains("forcing trap when growing") {
        return Fault::Memory(limits.memory_bytes);
    }
    Fault::Trap(root_cause(error))
}

fn root_cause(error: &wasmtime::Error) -> String {
    let chain: Vec<String> = error.chain().map(|e| e.to_string()).collect();
    chain.join(": ")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
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
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<crate::model::PluginMeta> {
    crate::model::Name::parse("tenant", tenant).map_err(|e| anyhow::anyhow!(e))?;
    let plugin = host.compile(bytes, &Limits::default())?;
    let meta = crate::model::PluginMeta::new(tenant, &plugin.sha256, bytes.len(), policy, now);
    let chunks = crate::model::plugin_chunks(tenant, &meta.version, bytes);
    store.put_plugin(&meta, &chunks).await?;
    Ok(meta)
}
