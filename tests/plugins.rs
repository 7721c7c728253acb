//! The plugin sandbox with real components built from `plugins/` and `tests/hostile/`
//! (`scripts/test` builds them for wasm32-wasip2 first): the example rules work, and every
//! hostile behaviour ends in a specific fault while the host goes on serving.

use std::time::Duration;

use roomcast::plugins::{Fault, Limits, Message, PluginHost, Rejected, Verdict, WelcomeInfo};
use roomcast_tests::component;

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
    // A component that imports an interface Roomcast does not offer.
    match host.compile(&component("roomcast-greedy-plugin"), &limits) {
        Err(Rejected::ForbiddenImport(why)) => assert!(why.contains("forbidden"), "{why}"),
        other => panic!("expected a forbidden import, got {other:?}"),
    }
    // A valid component of another world.
    match host.compile(&component("roomcast-stranger-plugin"), &limits) {
        Err(Rejected::WrongWorld(why)) => assert!(why.contains("no export"), "{why}"),
        other => panic!("expected the wrong world, got {other:?}"),
    }
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

// ---------------------------------------------------------------------------------------------
// End to end through the stream: handlers write, the table's stream carries the records, the
// processor asks the tenant's real component, and the real SDK client delivers (or does not).

use roomcast::plugins::registry::{BREAKER_THRESHOLD, Policy};
use roomcast_tests::Stack;
use serde_json::json;

roomcast_tests::on_both_stores!(
    a_rejected_message_is_never_delivered_and_its_sender_is_told,
    a_rewritten_message_arrives_rewritten,
    routing_changes_the_recipients,
    the_welcome_carries_the_tenants_greeting,
    a_hostile_tenant_never_hurts_another_tenant_in_the_same_batch,
    uploads_activate_through_the_stream_and_roll_back,
    a_cold_processor_loads_the_active_plugin,
);

async fn a_rejected_message_is_never_delivered_and_its_sender_is_told(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    stack.recorder.clear();
    let id = stack.send("ann", json!({"action":"sendMessage","room":"general","message":"cheap viagra"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    stack.pump().await;
    let rejected = stack.recorder.received_action("ann", "rejected");
    assert_eq!(rejected.len(), 1, "{:?}", stack.recorder.calls());
    assert_eq!(rejected[0]["id"], id.as_str());
    assert!(rejected[0]["reason"].as_str().unwrap().contains("viagra"));
    assert!(stack.recorder.received_action("bob", "message").is_empty(), "never delivered");
    assert!(stack.recorder.received_action("ann", "message").is_empty());
    assert_eq!(stack.processor.counts().rejected, 1);
}

async fn a_rewritten_message_arrives_rewritten(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"   hello there   "})).await;
    stack.pump().await;
    for who in ["ann", "bob"] {
        let got = stack.recorder.received_action(who, "message");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["message"], "hello there");
    }
}

async fn routing_changes_the_recipients(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-routing", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "announcements,general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.connect("cid", "acme", "cid", "ops").await;
    stack.connect("dan", "acme", "dan", "random").await;
    stack.connect("eve", "globex", "eve", "general").await;
    stack.pump().await;
    stack.recorder.clear();

    stack
        .send(
            "ann",
            json!({"action":"sendMessage","room":"announcements","message":"deploy at 5, see #general and #ops"}),
        )
        .await;
    stack.pump().await;
    for who in ["ann", "bob", "cid"] {
        assert_eq!(stack.recorder.received_action(who, "message").len(), 1, "{who}");
    }
    assert!(stack.recorder.received("dan").is_empty(), "not in a named room");
    assert!(stack.recorder.received("eve").is_empty(), "another tenant's #general is never reached");

    stack.recorder.clear();
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"@bob lunch?"})).await;
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("bob", "message").len(), 1);
    assert_eq!(stack.recorder.received_action("ann", "message").len(), 1, "the sender keeps a copy");
    assert!(stack.recorder.received("cid").is_empty());
}

async fn the_welcome_carries_the_tenants_greeting(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-welcome", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("eve", "globex", "eve", "general").await;
    stack.pump().await;
    let welcome = &stack.recorder.received_action("ann", "welcome")[0];
    assert_eq!(welcome["greeting"], "Welcome to acme, ann! You are in #general.");
    let plain = &stack.recorder.received_action("eve", "welcome")[0];
    assert!(plain.get("greeting").is_none(), "a tenant without a plugin gets the default welcome");
}

async fn a_hostile_tenant_never_hurts_another_tenant_in_the_same_batch(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.install_plugin("evil", "roomcast-hostile-plugin", Policy::FailClosed);
    stack.install_plugin("lax", "roomcast-hostile-plugin", Policy::FailOpen);
    for (id, tenant) in
        [("ann", "acme"), ("bob", "acme"), ("mal", "evil"), ("max", "evil"), ("lou", "lax"), ("liz", "lax")]
    {
        stack.connect(id, tenant, id, "general").await;
    }
    stack.pump().await;
    stack.recorder.clear();

    // One batch: hostile behaviours from two tenants around an ordinary message from acme.
    for (who, text) in [("mal", "loop"), ("ann", "hello"), ("mal", "grow"), ("lou", "trap"), ("mal", "giant")] {
        stack.send(who, json!({"action":"sendMessage","room":"general","message":text})).await;
    }
    assert!(stack.pump().await >= 5);
    assert!(stack.failures.is_empty(), "plugin faults never fail a batch: {:?}", stack.failures);

    assert_eq!(stack.recorder.received_action("bob", "message")[0]["message"], "hello", "acme is served");
    // evil fails closed: each faulting message is rejected, never delivered.
    let rejected = stack.recorder.received_action("mal", "rejected");
    assert_eq!(rejected.len(), 3, "{rejected:?}");
    assert!(rejected.iter().all(|r| r["reason"].as_str().unwrap().contains("could not be checked")));
    assert!(stack.recorder.received_action("max", "message").is_empty());
    // lax fails open: the trap falls back to the default rules.
    assert_eq!(stack.recorder.received_action("liz", "message")[0]["message"], "trap");
    assert_eq!(stack.processor.counts().plugin_faults, 4);

    // Repeated faults open evil's breaker: the plugin is no longer called at all.
    for _ in 0..BREAKER_THRESHOLD {
        stack.send("mal", json!({"action":"sendMessage","room":"general","message":"loop"})).await;
    }
    stack.pump().await;
    stack.recorder.clear();
    stack.send("mal", json!({"action":"sendMessage","room":"general","message":"harmless"})).await;
    stack.pump().await;
    let last = stack.recorder.received_action("mal", "rejected");
    assert!(last[0]["reason"].as_str().unwrap().contains("circuit breaker"), "{last:?}");
    assert_eq!(stack.recorder.received_action("bob", "message").len(), 0);
}

// ---------------------------------------------------------------------------------------------
// Upload and activation as records, through the table's stream.

use roomcast::model::{FailurePolicy, PluginStatus};

async fn spam_is_rejected(stack: &mut Stack) -> bool {
    stack.recorder.clear();
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"spam spam"})).await;
    stack.pump().await;
    let rejected = !stack.recorder.received_action("ann", "rejected").is_empty();
    let delivered = !stack.recorder.received_action("bob", "message").is_empty();
    assert_ne!(rejected, delivered, "exactly one of rejected or delivered");
    rejected
}

async fn uploads_activate_through_the_stream_and_roll_back(kind: &str) {
    use roomcast::model::Clock;
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    let store = stack.table.store.clone();
    assert!(!spam_is_rejected(&mut stack).await, "no plugin yet");

    // Upload: chunks and metadata are written; the processor activates on the metadata's INSERT.
    let moderation = component("roomcast-plugin-moderation");
    let v1 = roomcast::plugins::upload(
        &*store,
        stack.plugins.host(),
        "acme",
        &moderation,
        FailurePolicy::Open,
        stack.clock.now(),
    )
    .await
    .unwrap();
    assert_eq!(v1.chunks, moderation.len().div_ceil(roomcast::model::PLUGIN_CHUNK_BYTES));
    stack.pump().await;
    let listed = store.plugins("acme").await.unwrap();
    assert_eq!((listed.len(), listed[0].status), (1, PluginStatus::Active));
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v1.version);
    assert!(spam_is_rejected(&mut stack).await, "moderation is active");

    // A record whose chunks do not hash to its sha256 is refused, with the reason.
    let mut tampered = roomcast::model::PluginMeta::new(
        "acme",
        &"0".repeat(64),
        moderation.len(),
        FailurePolicy::Open,
        stack.clock.now(),
    );
    tampered.version = "tampered".into();
    tampered.sk = roomcast::model::plugin_meta_sk("tampered");
    store.put_plugin(&tampered, &roomcast::model::plugin_chunks("acme", "tampered", &moderation)).await.unwrap();
    stack.pump().await;
    let refused = store.plugins("acme").await.unwrap().into_iter().find(|m| m.version == "tampered").unwrap();
    assert_eq!(refused.status, PluginStatus::Rejected);
    assert!(refused.reason.as_deref().unwrap_or("").contains("sha256 mismatch"), "{refused:?}");
    assert!(spam_is_rejected(&mut stack).await, "v1 still active after a refused upload");

    // A second version takes over; v1 becomes inactive.
    stack.clock.advance(chrono::Duration::seconds(1));
    let v2 = roomcast::plugins::upload(
        &*store,
        stack.plugins.host(),
        "acme",
        &component("roomcast-plugin-welcome"),
        FailurePolicy::Open,
        stack.clock.now(),
    )
    .await
    .unwrap();
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v2.version);
    let statuses: Vec<_> = store.plugins("acme").await.unwrap().into_iter().map(|m| (m.version, m.status)).collect();
    assert!(statuses.contains(&(v1.version.clone(), PluginStatus::Inactive)), "{statuses:?}");
    assert!(!spam_is_rejected(&mut stack).await, "the welcome plugin accepts everything");

    // Rollback: activate v1 again.
    store.set_active_plugin("acme", Some(&v1.version)).await.unwrap();
    stack.pump().await;
    assert!(spam_is_rejected(&mut stack).await, "rolled back to moderation");

    // Disable: no plugin.
    store.set_active_plugin("acme", None).await.unwrap();
    stack.pump().await;
    assert!(!spam_is_rejected(&mut stack).await, "disabled");
}

async fn a_cold_processor_loads_the_active_plugin(kind: &str) {
    use roomcast::model::Clock;
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    let store = stack.table.store.clone();
    roomcast::plugins::upload(
        &*store,
        stack.plugins.host(),
        "acme",
        &component("roomcast-plugin-moderation"),
        FailurePolicy::Closed,
        stack.clock.now(),
    )
    .await
    .unwrap();
    stack.pump().await;

    // A new container: an empty registry, the same table.
    let metrics = std::sync::Arc::new(roomcast::metrics::Metrics::default());
    let delivery = roomcast::deliver::DeliverySettings {
        endpoint_override: Some(stack.recorder.endpoint.clone()),
        ..Default::default()
    };
    let deliverer = roomcast::deliver::Deliverer::new(
        roomcast_tests::sdk_config().await,
        delivery,
        store.clone(),
        stack.clock.clone(),
        metrics.clone(),
    );
    let registry = std::sync::Arc::new(roomcast::plugins::registry::Registry::new(
        std::sync::Arc::new(PluginHost::new().unwrap()),
        metrics.clone(),
    ));
    assert_eq!(registry.installed_version("acme"), None);
    stack.processor = roomcast::pipeline::Processor::new(store, deliverer, stack.clock.clone(), metrics, 8)
        .with_plugins(registry.clone());
    assert!(spam_is_rejected(&mut stack).await, "the cold processor found and loaded acme's plugin");
    assert!(registry.installed_version("acme").is_some());
}
