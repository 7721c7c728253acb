//! Plugin costs, as ratios measured in one run (`cargo bench -p roomcast --bench plugins`):
//!
//! * `hook/*` — one `validate` call on a realistic message: the moderation component through
//!   the host (a fresh Store and instance from the cached `InstancePre`, fuel and limits on, as
//!   the processor calls it) against the same rule compiled natively.
//! * `activation/*` — compiling the component (cold activation) against instantiating it from
//!   the already compiled, cached `InstancePre` (warm).
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
    group.bench_function("wasm_validate", |b| b.iter(|| host.validate(&plugin, &limits, black_box(&message), 0)));
    group.finish();
}

fn activation(c: &mut Criterion) {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let bytes = component();
    let plugin = host.compile(&bytes, &limits).unwrap();
    let message = message();
    let mut group = c.benchmark_group("activation");
    group.sample_size(10);
    group.bench_function("compile_cold", |b| b.iter(|| host.compile(black_box(&bytes), &limits).unwrap()));
    group.bench_function("instantiate_warm", |b| b.iter(|| host.validate(&plugin, &limits, black_box(&message), 0)));
    group.finish();
}

criterion_group!(benches, hook, activation);
criterion_main!(benches);
