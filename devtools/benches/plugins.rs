//! Plugin costs, as ratios measured in one run (`cargo bench -p roomcast --bench plugins`):
//!
//! * `hook/*` — one message's decision on a realistic message: the moderation component
//!   (`roomcast:plugin@0.2.0`, one `on-message` call returning verdict and routing) through the
//!   host against the same plugin compiled natively (`native_on_message`: the SDK's trait, with
//!   its configuration read, as the component does). `wasm_on_message_warm` is a call on an
//!   instance that is already there (fresh fuel, deadline and log per call);
//!   `wasm_legacy_warm` is the same decision by a 0.1.0 component: `validate` then `route`, two
//!   crossings; `wasm_on_message_fresh` adds a new Store and instance from the cached
//!   `InstancePre`; `wasm_message` is what the processor does for each message: a fresh
//!   instance, the call, and the host's checks (`PluginHost::message`), from the host's pool of
//!   instance slots; `wasm_message_on_demand` is the same on a host that maps each instance's
//!   memory anew (`PluginHost::on_demand`, the allocator before the pool). Where a warm call's
//!   time goes: `wasm_call_fixed` (a call with no input and a constant result: fuel, epoch
//!   deadline, record time, log, the async call) and `wasm_boundary_warm` (that plus the
//!   message in and an outcome out, with no rule: the welcome example's default `on-message`).
//! * `activation/*` — compiling the component (cold activation) against loading it from the
//!   host's precompiled-artifact directory (warm cache), and instantiating from `InstancePre`.
//!
//! The component comes from `cargo build --release --target wasm32-wasip2 -p
//! roomcast-plugin-moderation` (scripts/test builds it).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use roomcast::plugins::{Limits, Message, PluginHost};

fn component() -> Vec<u8> {
    built("roomcast_plugin_moderation")
}

fn built(file: &str) -> Vec<u8> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join(format!("wasm32-wasip2/release/{file}.wasm"));
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; build the component first (scripts/test does)", path.display()))
}

fn message() -> Message {
    Message {
        id: "018f0000-0000-7000-8000-000000000001".into(),
        tenant: "acme".into(),
        room: "general".into(),
        user_id: "ann".into(),
        body: "Morning all! The deploy went out at 9:40, dashboards look green; ping me if anything looks off.".into(),
        timestamp: "2026-11-21T10:00:00.000Z".into(),
    }
}

fn hook(c: &mut Criterion) {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let plugin = host.compile(&component(), &limits).unwrap();
    let message = message();
    let legacy = host.compile(&built("roomcast_legacy_plugin"), &limits).unwrap();
    let native = roomcast_plugin_sdk::Message {
        id: message.id.clone(),
        tenant: message.tenant.clone(),
        room: message.room.clone(),
        user_id: message.user_id.clone(),
        body: message.body.clone(),
        timestamp: message.timestamp.clone(),
    };
    let mut group = c.benchmark_group("hook");
    group.bench_function("native_on_message", |b| {
        b.iter(|| {
            <roomcast_plugin_moderation::Moderation as roomcast_plugin_sdk::Plugin>::on_message(black_box(&native))
        })
    });
    let mut instance = host.instantiate(&plugin, &limits).0.unwrap();
    group.bench_function("wasm_on_message_warm", |b| b.iter(|| instance.on_message(black_box(&message), 0).0.unwrap()));
    // Where the time goes: a call with no input and a constant result (`hooks`): the fixed cost
    // of any call; the welcome example's `on-message` (the SDK's default: accept, no rule):
    // that plus the message's strings in and an outcome out.
    group.bench_function("wasm_call_fixed", |b| b.iter(|| instance.hooks().0.unwrap()));
    let welcome = host.compile(&built("roomcast_plugin_welcome"), &limits).unwrap();
    let mut empty = host.instantiate(&welcome, &limits).0.unwrap();
    group.bench_function("wasm_boundary_warm", |b| b.iter(|| empty.on_message(black_box(&message), 0).0.unwrap()));
    let mut old = host.instantiate(&legacy, &limits).0.unwrap();
    group.bench_function("wasm_legacy_warm", |b| b.iter(|| old.on_message(black_box(&message), 0).0.unwrap()));
    group.bench_function("wasm_on_message_fresh", |b| {
        b.iter(|| host.validate(&plugin, &limits, black_box(&message), 0).0.unwrap())
    });
    group.bench_function("wasm_message", |b| {
        b.iter(|| host.message(&plugin, &limits, black_box(&message), 0).outcome.0.unwrap())
    });
    let unpooled = PluginHost::on_demand().unwrap();
    let unpooled_plugin = unpooled.compile(&component(), &limits).unwrap();
    group.bench_function("wasm_message_on_demand", |b| {
        b.iter(|| unpooled.message(&unpooled_plugin, &limits, black_box(&message), 0).outcome.0.unwrap())
    });
    group.finish();
}

fn activation(c: &mut Criterion) {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let bytes = component();
    let plugin = host.compile(&bytes, &limits).unwrap();
    let dir = std::env::temp_dir().join(format!("roomcast-bench-artifacts-{}", std::process::id()));
    let cached = PluginHost::new().unwrap().with_artifact_dir(&dir).unwrap();
    assert!(!cached.compile(&bytes, &limits).unwrap().from_artifact, "the first activation compiles");
    let mut group = c.benchmark_group("activation");
    group.sample_size(10);
    group.bench_function("compile_cold", |b| b.iter(|| host.compile(black_box(&bytes), &limits).unwrap()));
    group.bench_function("load_from_artifact", |b| {
        b.iter(|| {
            let loaded = cached.compile(black_box(&bytes), &limits).unwrap();
            assert!(loaded.from_artifact);
            loaded
        })
    });
    group.bench_function("instantiate", |b| b.iter(|| host.instantiate(&plugin, &limits).0.unwrap()));
    group.finish();
    let _ = std::fs::remove_dir_all(dir);
}

criterion_group!(benches, hook, activation);
criterion_main!(benches);
