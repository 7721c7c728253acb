//! Plugin costs, as ratios measured in one run (`cargo bench -p roomcast --bench plugins`):
//!
//! * `hook/*` — one `validate` call on a realistic message: the moderation component through
//!   the host against the same rule compiled natively. `wasm_validate_warm` is a call on an
//!   instance that is already there (fresh fuel, deadline and log per call); `wasm_route_warm` is the boundary alone (the same message in, a constant out);
//!   `wasm_validate_fresh` adds a new Store and instance from the cached `InstancePre`;
//!   `wasm_message` is what the processor does for each message: a fresh instance, `validate`
//!   and `route` on it, and the host's checks (`PluginHost::message`).
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
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("wasm32-wasip2/release/roomcast_plugin_moderation.wasm");
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
    let mut group = c.benchmark_group("hook");
    group.bench_function("native_moderate", |b| {
        b.iter(|| roomcast_plugin_moderation::moderate(black_box(&message.body)))
    });
    let mut instance = host.instantiate(&plugin, &limits).0.unwrap();
    group.bench_function("wasm_validate_warm", |b| b.iter(|| instance.validate(black_box(&message), 0).0.unwrap()));
    // The boundary alone: route crosses it with the same message and returns a constant.
    group.bench_function("wasm_route_warm", |b| b.iter(|| instance.route(black_box(&message), 0).0.unwrap()));
    group.bench_function("wasm_validate_fresh", |b| {
        b.iter(|| host.validate(&plugin, &limits, black_box(&message), 0).0.unwrap())
    });
    group.bench_function("wasm_message", |b| {
        b.iter(|| host.message(&plugin, &limits, black_box(&message), 0).validate.0.unwrap())
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
