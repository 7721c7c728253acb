//! The plugin sandbox with real components built from `plugins/` and `tests/hostile/`
//! (`scripts/test` builds them for wasm32-wasip2 first): the example rules work, and every
//! hostile behaviour ends in a specific fault while the host goes on serving.

use std::path::PathBuf;
use std::time::Duration;

use roomcast::plugins::{Fault, Limits, Message, PluginHost, Rejected, Verdict, WelcomeInfo};

fn component(crate_name: &str) -> Vec<u8> {
    let file = crate_name.replace('-', "_");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/wasm32-wasip2/release/{file}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build the components first: scripts/test does, or \
             cargo build --release --target wasm32-wasip2 -p {crate_name}",
            path.display()
        )
    })
}

fn message(body: &str) -> Message {
    Message {
        id: "018f0000-0000-7000-8000-000000000001".into(),
        tenant: "acme".into(),
        room: "general".into(),
        user_id: "ann".into(),
        body: body.into(),
        timestamp: "2026-11-21T10:00:00.000Z".into(),
    }
}

const RECORD_TIME: u64 = 1_795_000_000_123;

#[test]
fn the_moderation_plugin_rejects_rewrites_and_accepts() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let plugin = host.compile(&component("roomcast-plugin-moderation"), &limits).unwrap();
    assert_eq!(plugin.sha256.len(), 64);

    let (verdict, report) = host.validate(&plugin, &limits, &message("buy spam now"), RECORD_TIME);
    assert!(matches!(verdict, Ok(Verdict::Reject(ref why)) if why.contains("spam")), "{verdict:?}");
    assert!(report.fuel_used > 0 && report.fuel_used < limits.fuel, "{report:?}");
    assert!(report.log.iter().any(|l| l.starts_with("info: rejected")), "{:?}", report.log);
    assert_eq!(
        host.validate(&plugin, &limits, &message("  hello  "), RECORD_TIME).0,
        Ok(Verdict::Rewrite("hello".into()))
    );
    assert_eq!(host.validate(&plugin, &limits, &message("hello"), RECORD_TIME).0, Ok(Verdict::Accept));
}

#[test]
fn the_routing_and_welcome_plugins_decide_recipients_and_greetings() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let routing = host.compile(&component("roomcast-plugin-routing"), &limits).unwrap();
    let announcement =
        Message { room: "announcements".into(), ..message("maintenance tonight, see #general and #ops") };
    let routed = host.route(&routing, &limits, &announcement, RECORD_TIME).0.unwrap();
    assert_eq!(routed.extra_rooms, ["general", "ops"]);
    let mention = host.route(&routing, &limits, &message("@bob lunch?"), RECORD_TIME).0.unwrap();
    assert_eq!(mention.only_users, Some(vec!["bob".to_string(), "ann".to_string()]));

    let welcome = host.compile(&component("roomcast-plugin-welcome"), &limits).unwrap();
    let info = WelcomeInfo {
        connection_id: "c1".into(),
        tenant: "acme".into(),
        user_id: "ann".into(),
        rooms: vec!["general".into()],
    };
    assert_eq!(
        host.welcome(&welcome, &limits, &info, RECORD_TIME).0,
        Ok(Some("Welcome to acme, ann! You are in #general.".into()))
    );
}

#[test]
fn every_hostile_behaviour_ends_in_a_specific_fault_and_the_host_goes_on() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    let moderation = host.compile(&component("roomcast-plugin-moderation"), &limits).unwrap();

    let fault = |body: &str| host.validate(&hostile, &limits, &message(body), RECORD_TIME).0.unwrap_err();
    assert_eq!(fault("loop"), Fault::OutOfFuel(limits.fuel));
    assert_eq!(fault("grow"), Fault::Memory(limits.memory_bytes));
    assert!(matches!(fault("recurse"), Fault::Trap(ref why) if why.contains("stack")), "{:?}", fault("recurse"));
    assert!(matches!(fault("trap"), Fault::Trap(ref why) if why.contains("unreachable")), "{:?}", fault("trap"));
    assert!(matches!(fault("giant"), Fault::OutputTooLarge { size, .. } if size == 1 << 20));

    // The log is bounded, stdout included, and says what it dropped.
    let (verdict, report) = host.validate(&hostile, &limits, &message("flood"), RECORD_TIME);
    assert_eq!(verdict, Ok(Verdict::Accept));
    let logged: usize = report.log.iter().map(String::len).sum();
    assert!(logged < limits.log_bytes + 200, "{logged} bytes of log");
    assert!(report.log.last().unwrap().contains("dropped"), "{:?}", report.log.last());

    // The plugin sees the record's time, never the wall clock.
    assert_eq!(
        host.validate(&hostile, &limits, &message("clock"), RECORD_TIME).0,
        Ok(Verdict::Rewrite(RECORD_TIME.to_string()))
    );

    // A fresh store per call: the same plugin and the other tenant's plugin still work.
    assert_eq!(host.validate(&hostile, &limits, &message("fine"), RECORD_TIME).0, Ok(Verdict::Accept));
    assert_eq!(host.validate(&moderation, &limits, &message("hello"), RECORD_TIME).0, Ok(Verdict::Accept));
}

#[test]
fn the_wall_clock_deadline_stops_a_loop_that_fuel_would_let_run() {
    let host = PluginHost::new().unwrap();
    let limits = Limits { fuel: u64::MAX / 2, deadline: Duration::from_millis(50), ..Limits::default() };
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    let (verdict, report) = host.validate(&hostile, &limits, &message("loop"), RECORD_TIME);
    assert_eq!(verdict, Err(Fault::Deadline(limits.deadline)));
    assert!(report.elapsed < Duration::from_secs(5), "stopped: {:?}", report.elapsed);
}

#[test]
fn components_that_cannot_be_plugins_are_rejected_with_the_reason() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    assert!(matches!(host.compile(b"definitely not wasm", &limits), Err(Rejected::NotAComponent(_))));
    // A core module is not a component.
    assert!(matches!(host.compile(b"\0asm\x01\0\0\0", &limits), Err(Rejected::NotAComponent(_))));
    let big = vec![0u8; limits.component_bytes + 1];
    assert!(matches!(host.compile(&big, &limits), Err(Rejected::TooLarge { .. })));
    let small = Limits { component_bytes: 1000, ..Limits::default() };
    assert!(matches!(host.compile(&component("roomcast-plugin-welcome"), &small), Err(Rejected::TooLarge { .. })));
}

#[test]
fn an_oversized_input_is_refused_before_the_plugin_runs() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let plugin = host.compile(&component("roomcast-plugin-moderation"), &limits).unwrap();
    let (verdict, report) = host.validate(&plugin, &limits, &message(&"x".repeat(limits.io_bytes + 1)), RECORD_TIME);
    assert!(matches!(verdict, Err(Fault::InputTooLarge { .. })));
    assert_eq!(report.fuel_used, 0);
}
