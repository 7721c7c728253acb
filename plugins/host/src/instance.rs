//! One instantiated plugin: a `Store` with its limits and the component's instance, made for
//! one message (its `on-message`, or a 0.1.0 plugin's `validate` and `route`), one join or one
//! welcome, then dropped. Each call gets its own
//! fuel, epoch deadline, record time and bounded log; after a fault the instance is not entered
//! again.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, Trap};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::{
    CallReport, EPOCH_TICK, Fault, Hooks, JoinDecision, JoinRequest, Limits, Message, MessageOutcome, Plugin, Pre,
    Routing, Verdict, WelcomeInfo, root_cause, v01, v02,
};

/// A tenant's configuration as a call sees it (`roomcast plugin config set`): the processor's type (`rules::ConfigValues`).
pub use roomcast_processor::rules::ConfigValues;

/// The store's state.
pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: Budget,
    log: BoundedLog,
    /// The current call's record time, epoch milliseconds (also what WASI's clocks show).
    time: Arc<AtomicU64>,
    /// What the current call has slept, in nanoseconds: its clocks show the record time plus this.
    pub(super) slept: Arc<AtomicU64>,
    /// The states of wasi:random's two generators, seeded from the record at each call.
    random: Arc<AtomicU64>,
    insecure: Arc<AtomicU64>,
    /// The tenant's configuration, as `host.config` reads it.
    config: ConfigValues,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

fn level_name(level: v02::roomcast::plugin::host::Level) -> &'static str {
    use v02::roomcast::plugin::host::Level;
    match level {
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    }
}

impl v02::roomcast::plugin::host::Host for State {
    fn log(&mut self, level: v02::roomcast::plugin::host::Level, message: String) {
        self.log.push(format!("{}: {message}", level_name(level)));
    }

    fn record_time(&mut self) -> u64 {
        self.time.load(Ordering::Relaxed)
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

impl v02::roomcast::plugin::types::Host for State {}

impl v01::roomcast::plugin::host::Host for State {
    fn log(&mut self, level: v01::roomcast::plugin::host::Level, message: String) {
        use v01::roomcast::plugin::host::Level as Old;
        use v02::roomcast::plugin::host::Level;
        let level = match level {
            Old::Debug => Level::Debug,
            Old::Info => Level::Info,
            Old::Warn => Level::Warn,
            Old::Error => Level::Error,
        };
        self.log.push(format!("{}: {message}", level_name(level)));
    }

    fn record_time(&mut self) -> u64 {
        self.time.load(Ordering::Relaxed)
    }
}

impl v01::roomcast::plugin::types::Host for State {}

/// A 0.1.0 component's values, to and from the current world's (the same fields).
mod old {
    use super::{Message, Routing, Verdict, WelcomeInfo, v01};
    use v01::roomcast::plugin::types as t;

    pub(super) fn message(m: &Message) -> t::Message {
        t::Message {
            id: m.id.clone(),
            tenant: m.tenant.clone(),
            room: m.room.clone(),
            user_id: m.user_id.clone(),
            body: m.body.clone(),
            timestamp: m.timestamp.clone(),
        }
    }

    pub(super) fn verdict(v: t::Verdict) -> Verdict {
        match v {
            t::Verdict::Accept => Verdict::Accept,
            t::Verdict::Rewrite(text) => Verdict::Rewrite(text),
            t::Verdict::Reject(why) => Verdict::Reject(why),
        }
    }

    pub(super) fn routing(r: t::Routing) -> Routing {
        Routing { extra_rooms: r.extra_rooms, only_users: r.only_users, echo_to_sender: r.echo_to_sender }
    }

    pub(super) fn welcome(w: &WelcomeInfo) -> t::WelcomeInfo {
        t::WelcomeInfo {
            connection_id: w.connection_id.clone(),
            tenant: w.tenant.clone(),
            user_id: w.user_id.clone(),
            rooms: w.rooms.clone(),
        }
    }
}

/// The routing every recipient of the room gets: what a plugin that says nothing means.
pub fn plain_routing() -> Routing {
    Routing { extra_rooms: Vec::new(), only_users: None, echo_to_sender: true }
}

/// A log that keeps lines until a byte budget is spent, then says how many it dropped.
#[derive(Debug)]
struct BoundedLog {
    lines: Vec<String>,
    bytes: usize,
    limit: usize,
    dropped: usize,
}

impl BoundedLog {
    fn new(limit: usize) -> BoundedLog {
        BoundedLog { lines: Vec::new(), bytes: 0, limit, dropped: 0 }
    }

    fn push(&mut self, line: String) {
        if self.bytes + line.len() > self.limit {
            self.dropped += 1;
            return;
        }
        self.bytes += line.len();
        self.lines.push(line);
    }

    fn finish(mut self, stdio: &StdioSink) -> Vec<String> {
        let (text, dropped_bytes) = stdio.take();
        for line in String::from_utf8_lossy(&text).lines().filter(|l| !l.is_empty()) {
            self.push(format!("stdio: {line}"));
        }
        if dropped_bytes > 0 {
            self.dropped += 1;
        }
        if self.dropped > 0 {
            self.lines
                .push(format!("({} more lines dropped: the log is limited to {} bytes)", self.dropped, self.limit));
        }
        self.lines
    }
}

/// The guest's stdout and stderr: keeps up to a call's log budget, silently drops the rest, and
/// never fails a write (a full pipe would make Rust's `println!` panic inside the guest).
#[derive(Clone)]
struct StdioSink(Arc<Mutex<SinkBuffer>>);

struct SinkBuffer {
    kept: Vec<u8>,
    budget: usize,
    dropped: usize,
}

impl StdioSink {
    fn new(budget: usize) -> StdioSink {
        StdioSink(Arc::new(Mutex::new(SinkBuffer { kept: Vec::new(), budget, dropped: 0 })))
    }

    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let room = buffer.budget.saturating_sub(buffer.kept.len());
        let keep = bytes.len().min(room);
        buffer.kept.extend_from_slice(&bytes[..keep]);
        buffer.dropped += bytes.len() - keep;
    }

    /// What this call wrote (and how many bytes it dropped); the next call starts empty.
    fn take(&self) -> (Vec<u8>, usize) {
        let mut buffer = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut buffer.dropped);
        (std::mem::take(&mut buffer.kept), dropped)
    }
}

impl OutputStream for StdioSink {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.append(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StdioSink {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for StdioSink {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for StdioSink {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for StdioSink {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

/// wasi:random's generators: SplitMix64 over a state the host sets from the record at every
/// call. A plugin that draws random numbers (or hashes with a random seed, as Rust's `HashMap`
/// does) decides the same way every time the same record is replayed.
struct RecordRng(Arc<AtomicU64>);

impl RecordRng {
    fn next(&self) -> u64 {
        let mut z = self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl rand_core::TryRng for RecordRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(self.next() as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(self.next())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        for chunk in dst.chunks_mut(8) {
            chunk.copy_from_slice(&self.next().to_le_bytes()[..chunk.len()]);
        }
        Ok(())
    }
}

/// FNV-1a: a stable hash (the same in every Rust release, unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A clock that shows the current call's record time, moved on only by the call's own sleeps:
/// replay is deterministic, and a sleep costs no wall time (see [`Slept`]).
struct RecordClock {
    time: Arc<AtomicU64>,
    slept: Arc<AtomicU64>,
}

impl RecordClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.time.load(Ordering::Relaxed))
            + Duration::from_nanos(self.slept.load(Ordering::Relaxed))
    }
}

impl wasmtime_wasi::HostWallClock for RecordClock {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }
    fn now(&self) -> Duration {
        RecordClock::now(self)
    }
}

impl wasmtime_wasi::HostMonotonicClock for RecordClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        RecordClock::now(self).as_nanos() as u64
    }
}

/// A `wasi:clocks/monotonic-clock` subscription: the plugin's clock has already moved on by the
/// time asked for, so it is ready at once. A plugin that sleeps — `std::thread::sleep`, a poll
/// with a timeout — neither waits nor holds a thread, and sees its clock advance as it expected.
pub(super) struct Slept;

#[wasmtime_wasi::async_trait]
impl Pollable for Slept {
    async fn ready(&mut self) {}
}

/// `subscribe-duration` / `subscribe-instant` on the record's clock: moves the call's clock on by
/// `nanos` and hands back a pollable that is ready at once.
pub(super) fn sleep(
    mut store: wasmtime::StoreContextMut<'_, State>,
    nanos: u64,
) -> wasmtime::Result<wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>> {
    let state = store.data_mut();
    let slept = state.slept.load(Ordering::Relaxed).saturating_add(nanos);
    state.slept.store(slept, Ordering::Relaxed);
    let ready = state.table.push(Slept)?;
    wasmtime_wasi::p2::subscribe(&mut state.table, ready)
}

/// Where the call's monotonic clock stands, in nanoseconds.
pub(super) fn monotonic_now(store: &wasmtime::StoreContextMut<'_, State>) -> u64 {
    let state = store.data();
    (Duration::from_millis(state.time.load(Ordering::Relaxed)).as_nanos() as u64)
        .saturating_add(state.slept.load(Ordering::Relaxed))
}

/// An instantiated plugin with its store.
pub struct Instance {
    store: Store<State>,
    bindings: Bindings,
    stdio: StdioSink,
    limits: Limits,
    /// Calls made on this instance so far.
    pub calls: u32,
}

/// The instantiated component, of either world.
enum Bindings {
    V02(v02::TenantPlugin),
    V01(v01::TenantPlugin),
}

impl Instance {
    pub(super) fn new(
        engine: &Engine,
        plugin: &Plugin,
        limits: &Limits,
        config: ConfigValues,
    ) -> (Result<Instance, Fault>, CallReport) {
        let started = Instant::now();
        let stdio = StdioSink::new(limits.log_bytes);
        let (time, slept) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (random, insecure) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let wasi = WasiCtx::builder()
            .stdout(stdio.clone())
            .stderr(stdio.clone())
            .wall_clock(RecordClock { time: time.clone(), slept: slept.clone() })
            .monotonic_clock(RecordClock { time: time.clone(), slept: slept.clone() })
            .insecure_random_seed(0)
            // Both generators are seeded from the record at each call (see `RecordRng`), and
            // one call may ask for at most the I/O limit's worth of random bytes.
            .secure_random(RecordRng(random.clone()))
            .insecure_random(RecordRng(insecure.clone()))
            .max_random_size(limits.io_bytes as u64)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = State {
            wasi,
            table: ResourceTable::new(),
            limits: Budget::new(limits.memory_bytes),
            log: BoundedLog::new(limits.log_bytes),
            time,
            slept,
            random,
            insecure,
            config,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| &mut state.limits);
        // What the host lifts from the guest (a call's results, an import's arguments) is
        // bounded before it is allocated here, not only checked after: lists of strings that
        // alias one guest buffer would otherwise cost up to wasmtime's default of 128 MiB each.
        store.set_hostcall_fuel(2 * limits.io_bytes);
        store.set_max_component_handles(1000);
        arm(&mut store, limits);
        let bindings = match &plugin.pre {
            Pre::V02(pre) => bounded(limits, pre.instantiate_async(&mut store)).map(Bindings::V02),
            Pre::V01(pre) => bounded(limits, pre.instantiate_async(&mut store)).map(Bindings::V01),
        };
        let fuel_used = limits.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        match bindings {
            Ok(bindings) => {
                let log = std::mem::replace(&mut store.data_mut().log, BoundedLog::new(limits.log_bytes));
                let report = CallReport { fuel_used, elapsed: started.elapsed(), log: log.finish(&stdio) };
                (Ok(Instance { store, bindings, stdio, limits: limits.clone(), calls: 0 }), report)
            }
            Err(e) => {
                let fault = e.fault(limits, fuel_used);
                let log = store.into_data().log.finish(&stdio);
                (Err(fault), CallReport { fuel_used, elapsed: started.elapsed(), log })
            }
        }
    }

    /// One call with fresh fuel, deadline, record time and log. After a fault, drop `self`.
    fn call<R>(
        &mut self,
        record_time_ms: u64,
        record_key: &str,
        run: impl AsyncFnOnce(&Bindings, &mut Store<State>) -> wasmtime::Result<R>,
    ) -> (Result<R, Fault>, CallReport) {
        let started = Instant::now();
        self.calls += 1;
        arm(&mut self.store, &self.limits);
        let state = self.store.data();
        state.time.store(record_time_ms, Ordering::Relaxed);
        state.slept.store(0, Ordering::Relaxed);
        // Random numbers come from the record, so a replay of it draws the same ones.
        let seed = fnv1a(record_key.as_bytes()) ^ record_time_ms.rotate_left(32);
        state.random.store(seed, Ordering::Relaxed);
        state.insecure.store(!seed, Ordering::Relaxed);
        let limits = self.limits.clone();
        let result = bounded(&limits, run(&self.bindings, &mut self.store));
        let fuel_used = self.limits.fuel.saturating_sub(self.store.get_fuel().unwrap_or(0));
        let result = result.map_err(|e| e.fault(&self.limits, fuel_used));
        let log = std::mem::replace(&mut self.store.data_mut().log, BoundedLog::new(self.limits.log_bytes));
        (result, CallReport { fuel_used, elapsed: started.elapsed(), log: log.finish(&self.stdio) })
    }

    /// The world of the instantiated component.
    pub fn world(&self) -> &'static str {
        match self.bindings {
            Bindings::V02(_) => "0.2.0",
            Bindings::V01(_) => "0.1.0",
        }
    }

    /// A message's verdict and routing: one `on-message` call, or a 0.1.0 plugin's `validate`
    /// and (unless it rejected) `route`, whose costs and logs are added together. Outputs are
    /// bounded here; a rewrite's frame is the caller's check (`PluginHost::message`).
    pub fn on_message(
        &mut self,
        message: &Message,
        record_time_ms: u64,
    ) -> (Result<MessageOutcome, Fault>, CallReport) {
        if let Err(fault) = check_input(message, &self.limits) {
            return (Err(fault), CallReport::default());
        }
        let limits = self.limits.clone();
        let (result, report) = match &self.bindings {
            Bindings::V02(_) => self.call(record_time_ms, &message.id, async |b, store| match b {
                Bindings::V02(p) => p.call_on_message(store, message).await,
                Bindings::V01(_) => unreachable!("the bindings do not change"),
            }),
            Bindings::V01(_) => {
                let input = old::message(message);
                let (verdict, report) = self.call(record_time_ms, &message.id, async |b, store| match b {
                    Bindings::V01(p) => p.call_validate(store, &input).await.map(old::verdict),
                    Bindings::V02(_) => unreachable!("the bindings do not change"),
                });
                match verdict {
                    Ok(verdict @ Verdict::Reject(_)) => {
                        (Ok(MessageOutcome { verdict, routing: plain_routing() }), report)
                    }
                    Ok(verdict) => {
                        let (routing, routed) = self.call(record_time_ms, &message.id, async |b, store| match b {
                            Bindings::V01(p) => p.call_route(store, &input).await.map(old::routing),
                            Bindings::V02(_) => unreachable!("the bindings do not change"),
                        });
                        (routing.map(|routing| MessageOutcome { verdict, routing }), routed.after(report))
                    }
                    Err(fault) => (Err(fault), report),
                }
            }
        };
        let result = result.and_then(|outcome| {
            // A rewrite is bounded by the frame its recipients get, which the caller checks
            // (`PluginHost::message`): how far it grows depends on the sender's message.
            let reason = match &outcome.verdict {
                Verdict::Accept | Verdict::Rewrite(_) => 0,
                Verdict::Reject(text) => text.len(),
            };
            // Every routing entry counts, not only its bytes: thousands of empty names are not free.
            let routing = &outcome.routing;
            let entries = routing.extra_rooms.iter().chain(routing.only_users.iter().flatten());
            let size = reason + entries.map(|e| e.len() + ROUTE_ENTRY_BYTES).sum::<usize>();
            within(size, &limits).map(|()| outcome)
        });
        (result, report)
    }

    /// The verdict of [`Instance::on_message`] (tests, `roomcast plugin test`).
    pub fn validate(&mut self, message: &Message, record_time_ms: u64) -> (Result<Verdict, Fault>, CallReport) {
        let (outcome, report) = self.on_message(message, record_time_ms);
        (outcome.map(|o| o.verdict), report)
    }

    /// The routing of [`Instance::on_message`] (tests, `roomcast plugin test`).
    pub fn route(&mut self, message: &Message, record_time_ms: u64) -> (Result<Routing, Fault>, CallReport) {
        let (outcome, report) = self.on_message(message, record_time_ms);
        (outcome.map(|o| o.routing), report)
    }

    /// Whether a connection may join a room. A 0.1.0 plugin has no such hook: allowed.
    pub fn authorize_join(
        &mut self,
        request: &JoinRequest,
        record_time_ms: u64,
    ) -> (Result<JoinDecision, Fault>, CallReport) {
        let size = request.claims.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + request.room.len()
            + request.user_id.len()
            + request.connection_id.len();
        if size > self.limits.io_bytes {
            return (Err(Fault::InputTooLarge { size, limit: self.limits.io_bytes }), CallReport::default());
        }
        if let Bindings::V01(_) = self.bindings {
            return (Ok(JoinDecision::Allow), CallReport::default());
        }
        let limits = self.limits.clone();
        let key = format!("{}#{}", request.connection_id, request.room);
        let (result, report) = self.call(record_time_ms, &key, async |b, store| match b {
            Bindings::V02(p) => p.call_authorize_join(store, request).await,
            Bindings::V01(_) => unreachable!("the bindings do not change"),
        });
        let result = result.and_then(|decision| {
            let size = match &decision {
                JoinDecision::Allow => 0,
                JoinDecision::Deny(why) => why.len(),
            };
            within(size, &limits).map(|()| decision)
        });
        (result, report)
    }

    /// The optional hooks the plugin implements (a 0.1.0 plugin: `welcome`).
    pub fn hooks(&mut self) -> (Result<Hooks, Fault>, CallReport) {
        if let Bindings::V01(_) = self.bindings {
            return (Ok(Hooks::WELCOME), CallReport::default());
        }
        self.call(0, "hooks", async |b, store| match b {
            Bindings::V02(p) => p.call_hooks(store).await,
            Bindings::V01(_) => unreachable!("the bindings do not change"),
        })
    }

    pub fn welcome(&mut self, info: &WelcomeInfo, record_time_ms: u64) -> (Result<Option<String>, Fault>, CallReport) {
        let limits = self.limits.clone();
        let old_info = old::welcome(info);
        let (result, report) = self.call(record_time_ms, &info.connection_id, async |b, store| match b {
            Bindings::V02(p) => p.call_welcome(store, info).await,
            Bindings::V01(p) => p.call_welcome(store, &old_info).await,
        });
        let result =
            result.and_then(|greeting| within(greeting.as_ref().map_or(0, String::len), &limits).map(|()| greeting));
        (result, report)
    }
}

/// The most elements a plugin's tables hold, all together (and so each one: the pool's slot).
pub(crate) const TABLE_ELEMENTS: usize = 100_000;

/// One budget for everything a plugin's store holds: all its linear memories together within
/// the memory cap, and all its tables together within [`Budget::TABLE_ELEMENTS`], however many
/// core modules and memories the component brings. (wasmtime's `StoreLimits` caps each memory
/// on its own, so a component with dozens of memories could hold dozens of caps.)
#[derive(Debug)]
pub(crate) struct Budget {
    memory_bytes: usize,
    memory_used: usize,
    table_used: usize,
}

impl Budget {
    /// Table elements, over all the store's tables.
    pub(crate) const TABLE_ELEMENTS: usize = TABLE_ELEMENTS;
    /// Instances, memories and tables a store may hold at all.
    const COUNT: usize = 32;

    pub(crate) fn new(memory_bytes: usize) -> Budget {
        Budget { memory_bytes, memory_used: 0, table_used: 0 }
    }
}

impl ResourceLimiter for Budget {
    fn memory_growing(&mut self, current: usize, desired: usize, _: Option<usize>) -> wasmtime::Result<bool> {
        let total = (self.memory_used - current.min(self.memory_used)).saturating_add(desired);
        if total > self.memory_bytes {
            wasmtime::bail!(
                "forcing trap when growing memory to {desired} bytes: the plugin's memories would hold {total} bytes \
                 together, over its {} byte cap",
                self.memory_bytes
            );
        }
        self.memory_used = total;
        Ok(true)
    }

    fn table_growing(&mut self, current: usize, desired: usize, _: Option<usize>) -> wasmtime::Result<bool> {
        let total = (self.table_used - current.min(self.table_used)).saturating_add(desired);
        if total > Self::TABLE_ELEMENTS {
            wasmtime::bail!(
                "forcing trap when growing a table to {desired} elements: {total} together, over {}",
                Self::TABLE_ELEMENTS
            );
        }
        self.table_used = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        Self::COUNT
    }

    fn tables(&self) -> usize {
        Self::COUNT
    }

    fn memories(&self) -> usize {
        Self::COUNT
    }
}

/// Why guest code did not return.
enum Stopped {
    Error(wasmtime::Error),
    /// Still running (parked in a host call: a sleep, a poll, a read) at the deadline.
    Deadline,
}

impl Stopped {
    fn fault(&self, limits: &Limits, fuel_used: u64) -> Fault {
        match self {
            Stopped::Error(e) => classify(e, limits, fuel_used),
            Stopped::Deadline => Fault::Deadline(limits.deadline),
        }
    }
}

/// Runs guest code on the plugin runtime, on this thread, for at most the call's deadline.
/// Epoch interruption stops wasm code at the deadline; this also abandons a call parked in an
/// async host call, which the epoch cannot reach. The store is not used again after that.
///
/// Never call this on an async runtime's worker: from a thread of its own (`spawn_blocking`).
fn bounded<R>(limits: &Limits, call: impl std::future::Future<Output = wasmtime::Result<R>>) -> Result<R, Stopped> {
    let started = Instant::now();
    let mut call = std::pin::pin!(call);
    // Host calls may use the plugin runtime's reactor and timers.
    let _context = super::runtime().enter();
    // Nearly every call finishes in its first poll: guest code runs on its fiber until it
    // returns, and the epoch deadline stops it if it does not. Only a host call that really
    // waits leaves it pending; then the runtime drives it, under the deadline's timeout. (The
    // first poll's waker is a no-op: a pending future registers the runtime's on the next.)
    let mut first = std::task::Context::from_waker(std::task::Waker::noop());
    let outcome = match call.as_mut().poll(&mut first) {
        Poll::Ready(outcome) => Ok(outcome),
        Poll::Pending => {
            let grace = (limits.deadline + EPOCH_TICK * 2).saturating_sub(started.elapsed());
            super::runtime().block_on(async { tokio::time::timeout(grace, call).await })
        }
    };
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Stopped::Error(e)),
        Err(_) => Err(Stopped::Deadline),
    }
}

/// Fresh fuel and a fresh epoch deadline for the next piece of guest code.
fn arm(store: &mut Store<State>, limits: &Limits) {
    // Fuel cannot fail to set: the engine was made with fuel consumption on.
    let _ = store.set_fuel(limits.fuel);
    let ticks = (limits.deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64;
    store.set_epoch_deadline(ticks);
}

/// What one `route` entry costs in the output limit on top of its bytes.
const ROUTE_ENTRY_BYTES: usize = 16;

/// A message too large for a plugin is refused before any guest code runs.
pub(crate) fn check_input(message: &Message, limits: &Limits) -> Result<(), Fault> {
    let size = message.body.len() + message.room.len() + message.user_id.len() + message.id.len();
    if size > limits.io_bytes { Err(Fault::InputTooLarge { size, limit: limits.io_bytes }) } else { Ok(()) }
}

fn within(size: usize, limits: &Limits) -> Result<(), Fault> {
    if size > limits.io_bytes { Err(Fault::OutputTooLarge { size, limit: limits.io_bytes }) } else { Ok(()) }
}

fn classify(error: &wasmtime::Error, limits: &Limits, fuel_used: u64) -> Fault {
    // The process's pool of instance slots is full: this host's limit, not the tenant's fault
    // (its breaker and failure policy must not count it).
    if error.chain().any(|cause| cause.downcast_ref::<wasmtime::PoolConcurrencyLimitError>().is_some()) {
        return Fault::Host(format!("no plugin instance slot is free: {}", root_cause(error)));
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => return Fault::OutOfFuel(fuel_used.max(limits.fuel)),
        Some(Trap::Interrupt) => return Fault::Deadline(limits.deadline),
        _ => {}
    }
    // The chain's messages, not `{error:?}`: a hostile component's backtrace can be megabytes.
    let text =
        error.chain().map(|e| super::cut(&e.to_string(), super::ERROR_TEXT_BYTES)).collect::<Vec<_>>().join(": ");
    if text.contains("fuel allocated for hostcalls has been exhausted") {
        return Fault::OutputTooLargeToCopy { limit: limits.io_bytes };
    }
    if text.contains("growing memory") || text.contains("memory size") || text.contains("forcing trap when growing") {
        return Fault::Memory(limits.memory_bytes);
    }
    Fault::Trap(root_cause(error))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_memory_of_a_store_counts_against_one_cap() {
        let mut budget = Budget::new(16 << 20);
        // Two memories of 10 MiB each: the second would put the store over its 16 MiB.
        assert!(budget.memory_growing(0, 10 << 20, None).unwrap());
        let refused = budget.memory_growing(0, 10 << 20, None).unwrap_err().to_string();
        assert!(refused.contains("forcing trap when growing memory"), "{refused}");
        // Growing the first within the cap is fine; its earlier size is not counted twice.
        assert!(budget.memory_growing(10 << 20, 12 << 20, None).unwrap());
        assert!(budget.memory_growing(0, 4 << 20, None).unwrap());
        assert!(budget.memory_growing(0, 1, None).is_err());
        // Tables likewise, over all of them.
        assert!(budget.table_growing(0, Budget::TABLE_ELEMENTS - 10, None).unwrap());
        assert!(budget.table_growing(0, 11, None).is_err());

        // A growth the budget allowed that then failed is not given back: wasmtime also reports
        // failures it never asked about (a size that overflows), and a budget that gave back on
        // those could be reset while the table really grew. Counting too much only costs the
        // one message's instance.
        let mut budget = Budget::new(16 << 20);
        assert!(budget.memory_growing(0, 10 << 20, None).unwrap());
        budget.memory_grow_failed(wasmtime::format_err!("mmap failed")).unwrap();
        assert!(budget.memory_growing(0, 7 << 20, None).is_err());
        assert!(budget.table_growing(0, Budget::TABLE_ELEMENTS, None).unwrap());
        budget.table_grow_failed(wasmtime::format_err!("overflow")).unwrap();
        assert!(budget.table_growing(0, 1, None).is_err(), "a failure reset the table budget");
        assert!(budget.memory_growing(0, usize::MAX, None).is_err(), "an enormous size is refused, not overflowed");
    }
}
