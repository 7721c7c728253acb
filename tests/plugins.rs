//! The plugin sandbox with real components built from `plugins/` and `tests/guests/hostile/`
//! (`scripts/test` builds them for wasm32-wasip2 first): the example rules work, and every
//! hostile behaviour ends in a specific fault while the host goes on serving.

use std::time::Duration;

use roomcast::plugins::{
    Fault, Hooks, JoinDecision, JoinRequest, Limits, Message, PluginHost, Rejected, Verdict, WelcomeInfo, WithPlugins,
};
use roomcast_tests::{component, memories_component};

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
        host.welcome(&welcome, &limits, &info, RECORD_TIME, Default::default()).0,
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
    // 1 MiB is stopped while it is copied out, before the host holds it all.
    assert_eq!(fault("giant"), Fault::OutputTooLargeToCopy { limit: limits.io_bytes });

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

/// Instances come from the host's pool (`POOL`): three times as many messages as the pool has
/// slots, one fresh instance each, all decide — every slot goes back when its message is done —
/// and a hostile message's fault in between returns its slot too.
#[test]
fn instances_come_from_a_pool_whose_slots_return_after_every_message() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let moderation = host.compile(&component("roomcast-plugin-moderation"), &limits).unwrap();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    for i in 0..3 * roomcast::plugins::POOL.instances {
        if i % 500 == 0 {
            let fault = host.validate(&hostile, &limits, &message("trap"), RECORD_TIME).0;
            assert!(matches!(fault, Err(Fault::Trap(_))), "{fault:?}");
        }
        let calls = host.message(&moderation, &limits, &message("buy spam now"), RECORD_TIME);
        assert!(matches!(calls.outcome.0, Ok((Verdict::Reject(_), _))), "message {i}: {:?}", calls.outcome.0);
    }
}

/// The hooks of plugins 0.2 under attack (issue 27): `authorize-join` that decides and then traps,
/// that reads its configuration without end or hoards it; `config` values at their largest;
/// `on-message` routing that narrows to 100,000 users, repeats rooms, or names other tenants'
/// rooms as the table keys them. Each is classified and bounded — never the allow it decided
/// before trapping, never a room outside the tenant — and the next tenant's plugin is untouched;
/// `roomcast plugin test` says the same.
#[test]
fn the_0_2_hooks_under_attack_end_in_their_faults_and_the_next_tenant_goes_on() {
    use std::collections::BTreeMap;
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    let moderation = host.compile(&component("roomcast-plugin-moderation"), &limits).unwrap();
    // The tenant's configuration at its largest, in one value.
    let big = "x".repeat(roomcast::model::PluginConfig::MAX_BYTES - "big".len());
    let config: roomcast::plugins::ConfigValues = std::sync::Arc::new(BTreeMap::from([("big".into(), big.clone())]));
    let join = |room: &str| {
        let request = JoinRequest {
            connection_id: "c1".into(),
            tenant: "acme".into(),
            user_id: "ann".into(),
            room: room.into(),
            claims: Vec::new(),
        };
        host.join(&hostile, &limits, &request, RECORD_TIME, config.clone()).0
    };
    assert!(matches!(join("allow-then-trap"), Err(Fault::Trap(_))), "{:?}", join("allow-then-trap"));
    assert!(matches!(join("config-loop"), Err(Fault::OutOfFuel(_) | Fault::Deadline(_))), "{:?}", join("config-loop"));
    assert_eq!(join("config-hoard"), Err(Fault::Memory(limits.memory_bytes)));
    assert_eq!(join("general"), Ok(JoinDecision::Allow), "the same plugin's next join");

    let outcome =
        |body: &str| host.message_with(&hostile, &limits, &message(body), RECORD_TIME, config.clone()).outcome.0;
    // The largest value a configuration holds fits a message: the tenant's own cap bounds it.
    assert_eq!(outcome("config-echo").map(|(v, _)| v), Ok(Verdict::Rewrite(big)));
    assert_eq!(outcome("config-hoard").map(|(v, _)| v), Err(Fault::Memory(limits.memory_bytes)));
    assert!(matches!(outcome("config-loop"), Err(Fault::OutOfFuel(_) | Fault::Deadline(_))));
    // 5,000 users, all distinct: within the output limit, so counted — and over the tenant's
    // limit, a fault, not a list cut short (cut, it would reach users the plugin did not mean).
    assert_eq!(
        outcome("route-everyone").map(|(v, _)| v),
        Err(Fault::RoutedTooWide { what: "users", count: limits.max_only_users + 1, limit: limits.max_only_users })
    );
    // Repeats of one room and of the message's own room: one extra room.
    let (_, route) = outcome("route-repeats").unwrap();
    assert_eq!(route.extra_rooms, ["side"]);
    // Other tenants' rooms as the table keys them, and names that are not rooms: none is taken
    // (a route names rooms of the message's own tenant; these are not even room names).
    let (verdict, route) = outcome("route-foreign").unwrap();
    assert_eq!((verdict, route.extra_rooms), (Verdict::Accept, Vec::<String>::new()));
    assert_eq!(host.validate(&moderation, &limits, &message("hello"), RECORD_TIME).0, Ok(Verdict::Accept));

    // `roomcast plugin test` classifies them the same way, and says so in its exit status.
    let dir = std::env::temp_dir().join(format!("roomcast-hostile-02-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hostile.wasm");
    std::fs::write(&file, component("roomcast-hostile-plugin")).unwrap();
    let config_file = dir.join("config.json");
    std::fs::write(&config_file, serde_json::json!({"big": "y".repeat(8000)}).to_string()).unwrap();
    let run = |name: &str, event: serde_json::Value| {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, event.to_string()).unwrap();
        let out = std::process::Command::new(roomcast_tests::aws::binary("roomcast"))
            .args(["plugin", "test"])
            .arg(&file)
            .arg("--event")
            .arg(&path)
            .arg("--config")
            .arg(&config_file)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let join_event = |room: &str| serde_json::json!({"time": RECORD_TIME, "join": {"connection_id": "c1", "tenant": "acme", "user_id": "ann", "room": room}});
    let message_event = |body: &str| {
        serde_json::json!({"time": RECORD_TIME, "message": {"id": "018f0000-0000-7000-8000-000000000001",
            "tenant": "acme", "room": "general", "user_id": "ann", "body": body, "timestamp": "2026-11-21T10:00:00.000Z"}})
    };
    let (ok, stdout) = run("trap", join_event("allow-then-trap"));
    assert!(!ok && stdout.contains("authorize-join") && stdout.contains("FAULT"), "{stdout}");
    assert!(!stdout.contains("Allow"), "the allow it decided before trapping is not taken: {stdout}");
    let (ok, stdout) = run("hoard", message_event("config-hoard"));
    assert!(!ok && stdout.contains("FAULT exceeded its memory limit"), "{stdout}");
    let (ok, stdout) = run("foreign", message_event("route-foreign"));
    assert!(ok && stdout.contains("on-message") && stdout.contains("Accept"), "{stdout}");
    assert!(!stdout.contains("globex"), "no foreign room is routed to: {stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every export misbehaves, and so does instantiation: each ends in its specific fault, within
/// the call's budget, and capability probes find nothing (no environment, no files).
#[test]
fn every_export_and_instantiation_end_in_a_specific_fault() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();

    // The routing half of `on-message` (one instance per message, as the processor runs it).
    let route = |body: &str| host.message(&hostile, &limits, &message(body), RECORD_TIME).outcome.0.unwrap_err();
    assert_eq!(route("route-loop"), Fault::OutOfFuel(limits.fuel));
    assert_eq!(route("route-grow"), Fault::Memory(limits.memory_bytes));
    assert!(matches!(route("route-trap"), Fault::Trap(_)));
    assert_eq!(route("route-wide"), Fault::RoutedTooWide { what: "extra rooms", count: 9, limit: 8 });
    assert!(
        matches!(route("route-aliased"), Fault::OutputTooLarge { .. } | Fault::OutputTooLargeToCopy { .. }),
        "{:?}",
        route("route-aliased")
    );

    // welcome, by the user id.
    let welcome = |user: &str| {
        let info = WelcomeInfo {
            connection_id: "c1".into(),
            tenant: "acme".into(),
            user_id: user.into(),
            rooms: vec!["general".into()],
        };
        host.greet(&hostile, &limits, &info, RECORD_TIME, Default::default()).0
    };
    assert_eq!(welcome("loop"), Err(Fault::OutOfFuel(limits.fuel)));
    assert_eq!(welcome("grow"), Err(Fault::Memory(limits.memory_bytes)));
    assert!(matches!(welcome("trap"), Err(Fault::Trap(_))));
    assert!(matches!(welcome("giant"), Err(Fault::OutputTooLargeToCopy { .. } | Fault::OutputTooLarge { .. })));
    assert_eq!(welcome("ann"), Ok(None));

    // authorize-join, by the room: every fault a message hook meets, and a deny reason bounded
    // like a reject's. A plugin that never answers is stopped, and the caller applies the policy.
    let join = |room: &str| {
        let request = JoinRequest {
            connection_id: "c1".into(),
            tenant: "acme".into(),
            user_id: "ann".into(),
            room: room.into(),
            claims: vec![("plan".into(), "pro".into())],
        };
        host.join(&hostile, &limits, &request, RECORD_TIME, Default::default()).0
    };
    assert_eq!(host.hooks(&hostile, &limits), Hooks::all());
    assert_eq!(join("loop"), Err(Fault::OutOfFuel(limits.fuel)));
    assert_eq!(join("grow"), Err(Fault::Memory(limits.memory_bytes)));
    assert!(matches!(join("trap"), Err(Fault::Trap(_))));
    assert!(matches!(join("recurse"), Err(Fault::Trap(_))), "{:?}", join("recurse"));
    let request = |room: &str| JoinRequest {
        connection_id: "c1".into(),
        tenant: "acme".into(),
        user_id: "ann".into(),
        room: room.into(),
        claims: Vec::new(),
    };
    let (flooded, report) = host.join(&hostile, &limits, &request("flood"), RECORD_TIME, Default::default());
    assert_eq!(flooded, Ok(JoinDecision::Allow));
    assert!(report.log.iter().map(String::len).sum::<usize>() <= limits.log_bytes + 100, "the log stays bounded");
    assert!(report.log.last().is_some_and(|l| l.contains("dropped")), "{:?}", report.log.last());
    assert!(matches!(join("giant"), Err(Fault::OutputTooLargeToCopy { .. } | Fault::OutputTooLarge { .. })));
    assert!(
        matches!(join("sleep-forever"), Err(Fault::Deadline(_) | Fault::OutOfFuel(_))),
        "{:?}",
        join("sleep-forever")
    );
    assert_eq!(join("deny-vip"), Ok(JoinDecision::Deny("ann may not join deny-vip".into())));
    assert_eq!(join("general"), Ok(JoinDecision::Allow));

    // Instantiation runs guest code too (a start function): it is bounded like a call.
    let spinner = host.compile(&roomcast_tests::looping_at_start_component(), &limits).unwrap();
    let calls = host.message(&spinner, &limits, &message("hello"), RECORD_TIME);
    assert_eq!(calls.outcome.0, Err(Fault::OutOfFuel(limits.fuel)));

    // Capability probes: no environment, no arguments, no files.
    let probe = |body: &str| host.validate(&hostile, &limits, &message(body), RECORD_TIME).0;
    assert_eq!(probe("env"), Ok(Verdict::Rewrite("env: [] args: []".into())));
    assert_eq!(probe("files"), Ok(Verdict::Rewrite("passwd: false root: false".into())));

    // Structural garbage: a component cut short is refused at upload, with the reason.
    let bytes = component("roomcast-hostile-plugin");
    assert!(matches!(host.compile(&bytes[..bytes.len() / 2], &limits), Err(Rejected::NotAComponent(_))));
}

/// Runs `f` on a thread of its own and fails the test, rather than hanging it, if it has not
/// returned within a minute: a call parked in a host call used to hold its thread for good.
fn finishes<R: Send + 'static>(what: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{what} did not return within a minute"))
}

#[test]
fn blocking_host_calls_obey_the_deadline_and_capabilities_are_refused() {
    let host = std::sync::Arc::new(PluginHost::new().unwrap());
    let limits = Limits::default();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    let call = |body: &'static str| {
        let (host, hostile, limits) = (host.clone(), hostile.clone(), limits.clone());
        finishes(body, move || host.validate(&hostile, &limits, &message(body), RECORD_TIME))
    };
    // The plugin's clocks stand at the record's time, so its sleeps are virtual: a ten-second
    // sleep returns at once, and the clock it reads has moved on by what it slept.
    let (slept, report) = call("sleep");
    assert_eq!(slept, Ok(Verdict::Accept));
    assert!(report.elapsed < Duration::from_secs(2), "a ten-second sleep held its caller for {:?}", report.elapsed);
    assert_eq!(call("sleep-clock").0, Ok(Verdict::Rewrite("2500 2500".into())));
    // An endless sleep is an endless loop: it ends in a fault, within the call's budget.
    let (verdict, report) = call("sleep-forever");
    assert!(matches!(verdict, Err(Fault::OutOfFuel(_) | Fault::Deadline(_))), "{verdict:?}");
    assert!(report.elapsed < Duration::from_secs(5), "sleep-forever held its caller for {:?}", report.elapsed);
    // stdin is closed, and sockets are refused: each answers at once.
    let (stdin, _) = call("stdin");
    assert_eq!(stdin, Ok(Verdict::Rewrite("stdin: Ok(0)".into())));
    let (socket, _) = call("socket");
    assert!(matches!(socket, Ok(Verdict::Rewrite(ref r)) if r.starts_with("socket: Err(")), "{socket:?}");
    // Printing and panicking end in the log and a trap, never in the host's own output.
    let (printed, report) = call("print");
    assert!(matches!(printed, Err(Fault::Trap(_))), "{printed:?}");
    assert!(report.log.iter().any(|l| l.contains("to stdout")), "{:?}", report.log);
    assert!(report.log.iter().any(|l| l.contains("panics after printing")), "{:?}", report.log);
}

/// wasi:random is seeded from the record: a plugin that draws random numbers, or hashes with a
/// random seed as Rust's `HashMap` does, decides the same each time the record is replayed, and
/// another record draws other numbers.
#[test]
fn random_numbers_and_hash_maps_come_from_the_record() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    let decide = |id: &str, time: u64| {
        let message = Message { id: id.into(), ..message("random") };
        match host.validate(&hostile, &limits, &message, time).0 {
            Ok(Verdict::Rewrite(drawn)) => drawn,
            other => panic!("{other:?}"),
        }
    };
    let first = decide("m1", RECORD_TIME);
    for _ in 0..3 {
        assert_eq!(decide("m1", RECORD_TIME), first, "a replay of the record draws the same");
    }
    assert_ne!(decide("m2", RECORD_TIME), first, "another record draws others");
    assert_ne!(decide("m1", RECORD_TIME + 1), first, "the record's time is part of the seed");
}

/// One memory budget per plugin, not per memory: a component whose core modules each bring a
/// 12 MiB memory works with one of them, and with eight (96 MiB, if each had the cap to itself)
/// faults at instantiation over its 16 MiB. A core module with two memories is refused at
/// upload: multi-memory is off.
#[test]
fn every_memory_of_a_plugin_counts_against_one_budget() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let one = host.compile(&memories_component(1, 192), &limits).unwrap();
    let calls = host.message(&one, &limits, &message("hello"), RECORD_TIME);
    let (verdict, route) = calls.outcome.0.unwrap();
    assert_eq!(verdict, Verdict::Accept);
    assert!(route.extra_rooms.is_empty());

    let eight = host.compile(&memories_component(8, 192), &limits).unwrap();
    let calls = host.message(&eight, &limits, &message("hello"), RECORD_TIME);
    assert_eq!(calls.outcome.0.map(|(v, _)| v), Err(Fault::Memory(limits.memory_bytes)));

    // `roomcast plugin test` says the same, as the processor would.
    let file = std::env::temp_dir().join(format!("roomcast-memories-{}.wasm", std::process::id()));
    std::fs::write(&file, memories_component(8, 192)).unwrap();
    let out = std::process::Command::new(roomcast_tests::aws::binary("roomcast"))
        .args(["plugin", "test"])
        .arg(&file)
        .arg("--event")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/events/spam.json"))
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&file);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("validate+route FAULT exceeded its memory limit of 16777216 bytes"), "{stdout}");

    // Nor 64-bit memories (memory64 is off: sizes a budget could not count).
    let wide = wat::parse_str("(component (core module (memory i64 1)))").unwrap();
    assert!(matches!(host.compile(&wide, &limits), Err(Rejected::NotAComponent(_))));

    let two_memories = wat::parse_str("(component (core module (memory 1) (memory 1)))").unwrap();
    match host.compile(&two_memories, &limits) {
        Err(Rejected::NotAComponent(why)) => assert!(why.contains("multiple memories"), "{why}"),
        other => panic!("expected multi-memory to be refused, got {other:?}"),
    }
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
fn one_instance_serves_many_calls_each_with_its_own_fuel_clock_and_log() {
    let host = PluginHost::new().unwrap();
    let limits = Limits::default();
    let hostile = host.compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    let (instance, setup) = host.instantiate(&hostile, &limits);
    let mut instance = instance.unwrap();
    assert!(setup.fuel_used < limits.fuel, "{setup:?}");

    // Each call sees its own record's time.
    for time in [RECORD_TIME, RECORD_TIME + 5_000, RECORD_TIME - 1] {
        assert_eq!(instance.validate(&message("clock"), time).0, Ok(Verdict::Rewrite(time.to_string())));
    }
    // Each call gets the whole log budget, and only its own lines.
    for _ in 0..3 {
        let (verdict, report) = instance.validate(&message("flood"), RECORD_TIME);
        assert_eq!(verdict, Ok(Verdict::Accept));
        assert!(report.log[0].starts_with("info: line 0"), "{:?}", &report.log[..2]);
        let logged: usize = report.log.iter().map(String::len).sum();
        assert!(logged < limits.log_bytes + 200, "{logged} bytes of log");
    }
    // Fresh fuel per call: many calls together burn far more than one call's budget.
    let mut burned = 0;
    for _ in 0..50 {
        let (verdict, report) = instance.validate(&message("fine"), RECORD_TIME);
        assert_eq!(verdict, Ok(Verdict::Accept));
        burned += report.fuel_used;
    }
    assert!(burned > 0 && instance.calls == 56, "{burned} fuel over {} calls", instance.calls);
    let (_, one) = instance.validate(&message("fine"), RECORD_TIME);
    assert!(one.fuel_used < limits.fuel / 100, "{one:?}");

    // Why the processor gives every message an instance of its own: a reused instance remembers
    // what it drew (std's `HashMap` keys), so the same record decides otherwise the second time.
    let (first, _) = instance.validate(&message("random"), RECORD_TIME);
    let (second, _) = instance.validate(&message("random"), RECORD_TIME);
    assert!(matches!(first, Ok(Verdict::Rewrite(_))), "{first:?}");
    assert_ne!(first, second);
    let fresh = host.message(&hostile, &limits, &message("random"), RECORD_TIME).outcome.0.map(|(v, _)| v);
    assert_eq!(fresh, first, "a fresh instance decides as the first call did");

    // A loop still stops at one call's budget, not the instance's.
    assert_eq!(instance.validate(&message("loop"), RECORD_TIME).0, Err(Fault::OutOfFuel(limits.fuel)));
}

#[test]
fn precompiled_artifacts_are_reused_and_a_damaged_one_is_compiled_again() {
    let dir = std::env::temp_dir().join(format!("roomcast-artifacts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let limits = Limits::default();
    let bytes = component("roomcast-plugin-moderation");

    let first = PluginHost::new().unwrap().with_artifact_dir(&dir).unwrap();
    let compiled = first.compile(&bytes, &limits).unwrap();
    assert!(!compiled.from_artifact, "nothing was cached yet");
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&compiled.sha256) && name.ends_with(".cwasm"), "{name}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
    }

    // Another process (a new host, same engine settings) loads it instead of compiling.
    let second = PluginHost::new().unwrap().with_artifact_dir(&dir).unwrap();
    let loaded = second.compile(&bytes, &limits).unwrap();
    assert!(loaded.from_artifact);
    assert_eq!(loaded.sha256, compiled.sha256);
    assert_eq!(
        second.validate(&loaded, &limits, &message("buy spam"), RECORD_TIME).0,
        Ok(Verdict::Reject("the word \"spam\" is not allowed here".into()))
    );
    // Other bytes never match it: a different component compiles afresh.
    assert!(!second.compile(&component("roomcast-plugin-welcome"), &limits).unwrap().from_artifact);

    // A damaged artifact is discarded and the component compiled again.
    std::fs::write(&files[0], b"garbage").unwrap();
    let third = PluginHost::new().unwrap().with_artifact_dir(&dir).unwrap();
    let recompiled = third.compile(&bytes, &limits).unwrap();
    assert!(!recompiled.from_artifact);
    assert_eq!(third.validate(&recompiled, &limits, &message("hello"), RECORD_TIME).0, Ok(Verdict::Accept));
    assert!(third.compile(&bytes, &limits).unwrap().from_artifact, "and written anew");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tenant_overrides_change_the_limits_within_the_ceiling() {
    use roomcast::plugins::{CEILING, LimitOverrides};
    let base = Limits::default();
    let tight = base.with_overrides(&LimitOverrides { fuel: Some(1000), memory_mib: Some(2), ..Default::default() });
    assert_eq!((tight.fuel, tight.memory_bytes, tight.deadline), (1000, 2 << 20, base.deadline));
    let greedy = base.with_overrides(&LimitOverrides {
        fuel: Some(u64::MAX),
        memory_mib: Some(1 << 20),
        deadline_ms: Some(3_600_000),
        log_bytes: Some(usize::MAX),
        max_extra_rooms: Some(usize::MAX),
        max_only_users: Some(usize::MAX),
    });
    assert_eq!(
        (greedy.fuel, greedy.memory_bytes, greedy.deadline, greedy.log_bytes),
        (CEILING.fuel, CEILING.memory_bytes, CEILING.deadline, CEILING.log_bytes)
    );
    assert_eq!((greedy.max_extra_rooms, greedy.max_only_users), (CEILING.max_extra_rooms, CEILING.max_only_users));
    assert_eq!(base.with_overrides(&LimitOverrides::default()), base);
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
    a_plugin_that_sleeps_forever_never_stops_delivery,
    routing_is_bounded_by_entries_rooms_and_users,
    a_route_fault_follows_the_failure_policy_and_never_widens_the_audience,
    the_breaker_counts_messages_and_only_the_plugins_faults,
    uploads_activate_through_the_stream_and_roll_back,
    a_cold_processor_loads_the_active_plugin,
    eight_partitions_asking_for_a_cold_tenants_plugin_compile_it_once,
    every_warm_container_follows_activation_rollback_disable_and_reupload,
    a_cold_container_runs_no_room_of_a_tenant_without_its_plugin,
    old_plugin_records_never_undo_a_newer_change,
    a_rollback_right_after_an_upload_is_never_undone,
    an_active_version_that_cannot_load_leaves_no_plugin_and_is_not_retried,
    every_message_runs_on_an_instance_of_its_own,
    per_tenant_limits_from_the_upload_apply_and_are_capped,
    the_compiled_plugin_cache_is_bounded_and_evicted_tenants_reload,
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

    // A welcome hook that loops, hoards, traps or greets with 1 MiB: the welcome still goes
    // out, without a greeting, and each fault is counted.
    stack.install_plugin("lax", "roomcast-hostile-plugin", Policy::FailClosed);
    let before = stack.processor.counts();
    for user in ["loop", "grow", "trap", "giant"] {
        stack.connect(user, "lax", user, "general").await;
    }
    stack.pump().await;
    for user in ["loop", "grow", "trap", "giant"] {
        let welcome = stack.recorder.received_action(user, "welcome");
        assert_eq!(welcome.len(), 1, "{user}");
        assert!(welcome[0].get("greeting").is_none(), "{user}: {welcome:?}");
    }
    assert_eq!(stack.processor.counts().since(&before).plugin_faults, 4);
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

/// A tenant whose plugin sleeps without end, in the same batch as a good tenant: the batch
/// ends, the good tenant's messages arrive, and the sleeper's call ends in a fault within its
/// budget (its sleeps are virtual: an endless one is an endless loop).
async fn a_plugin_that_sleeps_forever_never_stops_delivery(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.install_plugin("lax", "roomcast-hostile-plugin", Policy::FailClosed);
    for (id, tenant) in [("ann", "acme"), ("bob", "acme"), ("lou", "lax"), ("liz", "lax")] {
        stack.connect(id, tenant, id, "general").await;
    }
    stack.pump().await;
    stack.send("lou", json!({"action":"sendMessage","room":"general","message":"sleep-forever"})).await;
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"still here"})).await;
    let pumped = tokio::time::timeout(Duration::from_secs(60), stack.pump()).await;
    assert!(pumped.is_ok(), "the batch never ended");
    let to_bob: Vec<_> =
        stack.recorder.received_action("bob", "message").into_iter().map(|m| m["message"].clone()).collect();
    assert_eq!(to_bob, [json!("still here")]);
    // Fail-closed: the sleeper's message is rejected, never delivered.
    assert!(stack.recorder.received_action("liz", "message").is_empty());
    let rejected = stack.recorder.received_action("lou", "rejected");
    assert!(
        rejected.iter().any(|r| r["reason"].as_str().unwrap_or("").contains("could not be checked")),
        "{rejected:?}"
    );
}

/// Four members of `general` in tenant `lax` (the hostile plugin, `policy`), one in `room0`.
async fn hostile_room(kind: &str, policy: Policy) -> Stack {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("lax", "roomcast-hostile-plugin", policy);
    for id in ["ann", "bob", "cy", "dee"] {
        stack.connect(id, "lax", id, "general").await;
    }
    stack.connect("eve", "lax", "eve", "room0").await;
    stack.pump().await;
    stack.recorder.clear();
    stack
}

async fn routing_is_bounded_by_entries_rooms_and_users(kind: &str) {
    let mut stack = hostile_room(kind, Policy::FailOpen).await;
    let before = stack.processor.counts();
    // 18,000 copies of one room name fit 128 KB counting bytes alone: every entry counts now,
    // so it is an oversized output (fail-open: the room alone receives it).
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"route-aliased"})).await;
    // Twenty rooms are more than the tenant's eight.
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"route-wide"})).await;
    stack.pump().await;
    let faults = stack.processor.counts().plugin_faults - before.plugin_faults;
    assert_eq!(faults, 2, "both routes are the plugin's faults");
    for text in ["route-aliased", "route-wide"] {
        let got = stack.recorder.received_action("bob", "message");
        assert!(got.iter().any(|m| m["message"] == text), "{text} reaches its own room: {got:?}");
        assert!(stack.recorder.received_action("eve", "message").is_empty(), "{text} reached room0");
    }
}

async fn a_route_fault_follows_the_failure_policy_and_never_widens_the_audience(kind: &str) {
    // Fail-closed: a route that faults rejects the message; nobody receives it.
    let mut closed = hostile_room(kind, Policy::FailClosed).await;
    closed.send("ann", json!({"action":"sendMessage","room":"general","message":"route-trap"})).await;
    closed.pump().await;
    assert!(closed.recorder.received_action("bob", "message").is_empty(), "fail-closed delivered it");
    assert_eq!(closed.recorder.received_action("ann", "rejected").len(), 1);

    // Fail-open: its room receives it, as with no plugin — never anyone outside the room.
    let mut open = hostile_room(kind, Policy::FailOpen).await;
    open.send("ann", json!({"action":"sendMessage","room":"general","message":"route-trap"})).await;
    open.pump().await;
    assert_eq!(open.recorder.received_action("bob", "message").len(), 1);
    assert!(open.recorder.received_action("eve", "message").is_empty());

    // And a route that narrows works: only bob.
    open.send("ann", json!({"action":"sendMessage","room":"general","message":"route-to-bob"})).await;
    open.pump().await;
    let narrowed =
        |id: &str| open.recorder.received_action(id, "message").iter().any(|m| m["message"] == "route-to-bob");
    assert!(narrowed("bob") && !narrowed("cy") && !narrowed("dee"));
}

async fn the_breaker_counts_messages_and_only_the_plugins_faults(kind: &str) {
    use roomcast::model::Clock;
    // A validate that faults on every message opens the breaker, although route succeeds.
    let mut stack = hostile_room(kind, Policy::FailOpen).await;
    for _ in 0..BREAKER_THRESHOLD {
        stack.send("ann", json!({"action":"sendMessage","room":"general","message":"trap"})).await;
    }
    stack.pump().await;
    let before = stack.processor.counts();
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"trap"})).await;
    stack.pump().await;
    let since = stack.processor.counts().since(&before);
    assert_eq!(since.plugin_faults, 0, "the breaker is open: the plugin was not called");
    assert_eq!((since.plugin_breaker_skips, since.plugin_instances), (1, 0), "{since:?}");

    // A rewrite that grows a near-maximum message past the recipients' frame is the sender's
    // doing: the policy applies (fail-open: the original goes out), and however many there are,
    // the breaker stays shut.
    let mut stack = hostile_room(kind, Policy::FailOpen).await;
    let near_max = format!("pad:{}", "y".repeat(roomcast::protocol::MAX_OUTGOING_BYTES - 1200));
    let before = stack.processor.counts();
    for _ in 0..BREAKER_THRESHOLD + 1 {
        let ack = stack.send("ann", json!({"action":"sendMessage","room":"general","message":near_max})).await;
        assert_eq!(ack["action"], "ack", "{ack:.200}");
    }
    stack.pump().await;
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"trap"})).await;
    stack.pump().await;
    let since = stack.processor.counts().since(&before);
    assert_eq!((since.plugin_faults, since.plugin_breaker_skips), (1, 0), "only the trap counted: {since:?}");
    let got = stack.recorder.received_action("bob", "message");
    assert_eq!(got.len(), BREAKER_THRESHOLD as usize + 2);
    assert_eq!(got[0]["message"], near_max.as_str(), "fail-open delivers the original");

    // Messages too large for the plugin are the caller's: however many, the breaker stays shut.
    let mut stack = hostile_room(kind, Policy::FailClosed).await;
    let sender = stack.table.store.get_connection("ann", stack.clock.now()).await.unwrap().unwrap();
    for _ in 0..BREAKER_THRESHOLD + 2 {
        // Written around the handlers (an older handler, a console edit): over the plugin's input.
        let body = "x".repeat(Limits::default().io_bytes);
        let record = roomcast::model::Message::new(&sender, "general", body, stack.clock.now(), 3600);
        stack.table.store.put_message(&record).await.unwrap();
        stack.clock.advance(chrono::Duration::milliseconds(1));
    }
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("ann", "rejected").len(), BREAKER_THRESHOLD as usize + 2);
    let before = stack.processor.counts().plugin_faults;
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"fine"})).await;
    stack.pump().await;
    assert_eq!(stack.processor.counts().plugin_faults, before);
    assert_eq!(
        stack.recorder.received_action("bob", "message").len(),
        1,
        "the plugin still decides: the breaker is shut"
    );
}

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
    let v1 = stack
        .upload_plugin("acme", &moderation, FailurePolicy::Open, roomcast::plugins::LimitOverrides::default())
        .await;
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
    let v2 = stack
        .upload_plugin(
            "acme",
            &component("roomcast-plugin-welcome"),
            FailurePolicy::Open,
            roomcast::plugins::LimitOverrides::default(),
        )
        .await;
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

/// Another processor container on the same table: its own registry and deliverer.
async fn another_container(
    stack: &Stack,
) -> (roomcast::pipeline::Processor, std::sync::Arc<roomcast::plugins::registry::Registry>) {
    let metrics = std::sync::Arc::new(roomcast::metrics::Metrics::default());
    let registry = std::sync::Arc::new(fresh_registry(&metrics));
    let processor = stack.assembly(metrics).await.processor().with_plugins(registry.clone());
    (processor, registry)
}

/// Whether spam is rejected when container `b`, not the stack's own processor, processes it.
async fn spam_is_rejected_by(stack: &mut Stack, b: &mut roomcast::pipeline::Processor) -> bool {
    std::mem::swap(&mut stack.processor, b);
    let rejected = spam_is_rejected(stack).await;
    std::mem::swap(&mut stack.processor, b);
    rejected
}

/// Lambda runs many processor containers at once; a plugin change is a record only one of them
/// processes. Container A processes every plugin record; container B only later messages, and
/// still follows each change from its next batch on.
async fn every_warm_container_follows_activation_rollback_disable_and_reupload(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    let (mut b, b_registry) = another_container(&stack).await;
    let store = stack.table.store.clone();
    let none = roomcast::plugins::LimitOverrides::default;
    assert!(!spam_is_rejected_by(&mut stack, &mut b).await, "no plugin yet, and B is warm");

    let moderation = component("roomcast-plugin-moderation");
    let v1 = stack.upload_plugin("acme", &moderation, FailurePolicy::Closed, none()).await;
    stack.pump().await; // A activates
    assert!(spam_is_rejected_by(&mut stack, &mut b).await, "B follows an activation made by A");

    stack.clock.advance(chrono::Duration::seconds(1));
    stack.upload_plugin("acme", &component("roomcast-plugin-welcome"), FailurePolicy::Closed, none()).await;
    stack.pump().await;
    assert!(!spam_is_rejected_by(&mut stack, &mut b).await, "B follows a new version");

    store.set_active_plugin("acme", Some(&v1.version)).await.unwrap();
    stack.pump().await;
    assert!(spam_is_rejected_by(&mut stack, &mut b).await, "B follows a rollback");

    store.set_active_plugin("acme", None).await.unwrap();
    stack.pump().await;
    assert!(!spam_is_rejected_by(&mut stack, &mut b).await, "B follows a disable");
    assert_eq!(b_registry.installed_version("acme"), None);

    // Re-uploading the same component with another failure policy takes effect everywhere.
    store.set_active_plugin("acme", Some(&v1.version)).await.unwrap();
    stack.pump().await;
    assert!(spam_is_rejected_by(&mut stack, &mut b).await);
    assert_eq!(b_registry.installed_policy("acme"), Some(Policy::FailClosed));
    let again = stack.upload_plugin("acme", &moderation, FailurePolicy::Open, none()).await;
    assert_eq!(again.version, v1.version, "the same component is the same version");
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v1.version);
    assert!(spam_is_rejected_by(&mut stack, &mut b).await);
    assert_eq!(b_registry.installed_policy("acme"), Some(Policy::FailOpen), "B runs the re-uploaded settings");
    assert_eq!(stack.plugins.installed_policy("acme"), Some(Policy::FailOpen), "and so does A");
}

/// Rooms of one batch run concurrently: on a cold container, every room of the tenant waits
/// for the one look-up of its plugin, so no message skips it.
async fn a_cold_container_runs_no_room_of_a_tenant_without_its_plugin(kind: &str) {
    let mut stack = Stack::on(kind).await;
    let rooms = ["r1", "r2", "r3", "r4"];
    for room in rooms {
        stack.connect(&format!("s-{room}"), "acme", &format!("sender-{room}"), room).await;
        stack.connect(&format!("l-{room}"), "acme", &format!("listener-{room}"), room).await;
    }
    let moderation = component("roomcast-plugin-moderation");
    stack.upload_plugin("acme", &moderation, FailurePolicy::Closed, roomcast::plugins::LimitOverrides::default()).await;
    stack.pump().await;
    let (cold, _) = another_container(&stack).await;
    stack.processor = cold;
    stack.recorder.clear();
    for room in rooms {
        stack.send(&format!("s-{room}"), json!({"action":"sendMessage","room":room,"message":"spam"})).await;
    }
    stack.pump().await;
    for room in rooms {
        assert!(
            stack.recorder.received_action(&format!("l-{room}"), "message").is_empty(),
            "spam in {room} skipped the plugin on a cold container"
        );
        assert_eq!(stack.recorder.received_action(&format!("s-{room}"), "rejected").len(), 1, "{room}");
    }
}

/// The stream redelivers, and a record may be late: an upload record seen again after a
/// rollback does not activate its version again.
async fn old_plugin_records_never_undo_a_newer_change(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    let store = stack.table.store.clone();
    let none = roomcast::plugins::LimitOverrides::default;
    let v1 = stack.upload_plugin("acme", &component("roomcast-plugin-moderation"), FailurePolicy::Closed, none()).await;
    stack.pump().await;
    stack.clock.advance(chrono::Duration::seconds(1));
    let v2 = stack.upload_plugin("acme", &component("roomcast-plugin-welcome"), FailurePolicy::Closed, none()).await;
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v2.version);
    let v2_upload = stack
        .captured
        .iter()
        .find(|r| {
            r.event_name == "INSERT"
                && matches!(
                    roomcast::stream::Change::from_record(r),
                    roomcast::stream::Change::Inserted(roomcast::stream::Record::Plugin(ref m)) if m.version == v2.version
                )
        })
        .cloned()
        .expect("v2's upload record");
    store.set_active_plugin("acme", Some(&v1.version)).await.unwrap();
    stack.pump().await;
    assert!(spam_is_rejected(&mut stack).await, "rolled back to moderation");

    // The event source delivers v2's upload record again.
    let response = stack.processor.handle_event(&json!({ "Records": [v2_upload] })).await.unwrap();
    assert!(response.batch_item_failures.is_empty());
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v1.version, "the rollback stands");
    assert!(spam_is_rejected(&mut stack).await, "moderation still runs");
}

/// A rollback right after an upload (issue 28, point 1): `plugin upload` of a new version, then at
/// once `plugin activate --version <previous>`, before any processor has handled the upload.
/// The upload's record, handled after the rollback — by this container, or by a second one —
/// does not activate it over the rollback: the previous version stays active, the upload is
/// kept inactive with the reason, and both containers run the previous version. A disable
/// right after an upload stands the same way, and an upload nobody overtook still activates.
async fn a_rollback_right_after_an_upload_is_never_undone(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    let store = stack.table.store.clone();
    let none = roomcast::plugins::LimitOverrides::default;
    let v1 = stack.upload_plugin("acme", &component("roomcast-plugin-moderation"), FailurePolicy::Closed, none()).await;
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v1.version, "an upload activates");
    let (mut second, _) = another_container(&stack).await;
    assert!(spam_is_rejected_by(&mut stack, &mut second).await, "the second container runs moderation");

    // The upload, then the rollback, before either container has seen the upload's record.
    stack.clock.advance(chrono::Duration::seconds(1));
    let v2 = stack.upload_plugin("acme", &component("roomcast-plugin-welcome"), FailurePolicy::Closed, none()).await;
    store.set_active_plugin("acme", Some(&v1.version)).await.unwrap();
    // The second container handles the batch with the upload's record.
    std::mem::swap(&mut stack.processor, &mut second);
    stack.pump().await;
    std::mem::swap(&mut stack.processor, &mut second);
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v1.version, "the rollback stands");
    let kept = store.plugin("acme", &v2.version).await.unwrap().unwrap();
    assert_eq!(kept.status, roomcast::model::PluginStatus::Inactive, "{kept:?}");
    assert!(kept.reason.as_deref().is_some_and(|r| r.contains("changed after this upload")), "{kept:?}");
    assert!(spam_is_rejected(&mut stack).await, "this container runs moderation");
    assert!(spam_is_rejected_by(&mut stack, &mut second).await, "and so does the second");

    // A disable right after an upload stands too.
    stack.clock.advance(chrono::Duration::seconds(1));
    let v3 = stack.upload_plugin("acme", &component("roomcast-plugin-routing"), FailurePolicy::Closed, none()).await;
    store.set_active_plugin("acme", None).await.unwrap();
    stack.pump().await;
    assert!(store.active_plugin("acme").await.unwrap().is_none(), "the disable stands");
    let kept = store.plugin("acme", &v3.version).await.unwrap().unwrap();
    assert_eq!(kept.status, roomcast::model::PluginStatus::Inactive, "{kept:?}");

    // And an upload nobody overtook is activated as ever, from no plugin.
    stack.clock.advance(chrono::Duration::seconds(1));
    let v4 = stack.upload_plugin("acme", &component("roomcast-plugin-moderation"), FailurePolicy::Open, none()).await;
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, v4.version);

    // Two uploads in a row before a processor handles either (a fix right after a bad upload):
    // the first is activated, then the second replaces it — an upload's own activation does not
    // stand against a later upload, as an operator's change does.
    stack.clock.advance(chrono::Duration::seconds(1));
    let bad = stack.upload_plugin("acme", &component("roomcast-plugin-welcome"), FailurePolicy::Open, none()).await;
    stack.clock.advance(chrono::Duration::seconds(1));
    let fix = stack.upload_plugin("acme", &component("roomcast-plugin-routing"), FailurePolicy::Open, none()).await;
    std::mem::swap(&mut stack.processor, &mut second);
    stack.pump().await;
    std::mem::swap(&mut stack.processor, &mut second);
    stack.pump().await;
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, fix.version, "the later upload wins");
    let first = store.plugin("acme", &bad.version).await.unwrap().unwrap();
    assert_eq!(first.status, roomcast::model::PluginStatus::Inactive, "{first:?}");
}

/// An operator points the tenant at a version that cannot load: the container runs no plugin
/// (not the older one the pointer no longer names), and does not try again every batch.
async fn an_active_version_that_cannot_load_leaves_no_plugin_and_is_not_retried(kind: &str) {
    use roomcast::model::Clock;
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    let store = stack.table.store.clone();
    let moderation = component("roomcast-plugin-moderation");
    stack.upload_plugin("acme", &moderation, FailurePolicy::Closed, roomcast::plugins::LimitOverrides::default()).await;
    stack.pump().await;
    assert!(spam_is_rejected(&mut stack).await);

    let mut broken = roomcast::model::PluginMeta::new(
        "acme",
        &"0".repeat(64),
        moderation.len(),
        FailurePolicy::Closed,
        stack.clock.now(),
    );
    broken.version = "broken".into();
    broken.sk = roomcast::model::plugin_meta_sk("broken");
    broken.status = PluginStatus::Inactive;
    store.put_plugin(&broken, &roomcast::model::plugin_chunks("acme", "broken", &moderation)).await.unwrap();
    store.set_active_plugin("acme", Some("broken")).await.unwrap();
    stack.pump().await;
    assert_eq!(stack.plugins.installed_version("acme"), None, "no plugin rather than the one rolled away from");
    assert!(stack.plugins.unloadable("acme").is_some_and(|(v, _)| v == "broken"));

    // The next batches do not load it again: no new status write follows a message.
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"hello"})).await;
    assert_eq!(stack.pump().await, 1, "only the message: the version was not tried (and rejected) again");
}

/// A cold container meets one tenant in eight rooms of one batch (eight partitions, run at
/// once): the plugin is read and compiled once. And eight callers at the same moment without a
/// batch's shared look-up (a registry serving several batches) still compile it once.
async fn eight_partitions_asking_for_a_cold_tenants_plugin_compile_it_once(kind: &str) {
    use roomcast::rules::{Mode, TenantRules};
    let mut stack = Stack::on(kind).await;
    for i in 0..8 {
        stack.connect(&format!("c{i}"), "acme", &format!("u{i}"), &format!("room{i}")).await;
    }
    stack
        .upload_plugin(
            "acme",
            &component("roomcast-plugin-moderation"),
            FailurePolicy::Open,
            roomcast::plugins::LimitOverrides::default(),
        )
        .await;
    stack.pump().await;

    let (mut cold, _) = another_container(&stack).await;
    stack.recorder.clear();
    for i in 0..8 {
        stack.send(&format!("c{i}"), json!({"action":"sendMessage","room":format!("room{i}"),"message":"spam"})).await;
    }
    std::mem::swap(&mut stack.processor, &mut cold);
    stack.pump().await;
    std::mem::swap(&mut stack.processor, &mut cold);
    for i in 0..8 {
        assert_eq!(stack.recorder.received_action(&format!("c{i}"), "rejected").len(), 1, "room{i} ran the plugin");
    }
    assert_eq!(cold.counts().plugin_compiles, 1, "{:?}", cold.counts());

    let metrics = std::sync::Arc::new(roomcast::metrics::Metrics::default());
    let registry = std::sync::Arc::new(fresh_registry(&metrics));
    let rules = roomcast::plugins::PluginRules::new(registry.clone(), stack.table.store.clone());
    let asks = (0..8).map(|_| rules.refresh("acme", Mode::Execute));
    for asked in futures::future::join_all(asks).await {
        asked.unwrap();
    }
    assert!(registry.installed_version("acme").is_some());
    assert_eq!(metrics.snapshot().plugin_compiles, 1);
}

async fn a_cold_processor_loads_the_active_plugin(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack
        .upload_plugin(
            "acme",
            &component("roomcast-plugin-moderation"),
            FailurePolicy::Closed,
            roomcast::plugins::LimitOverrides::default(),
        )
        .await;
    stack.pump().await;

    // A new container: an empty registry, the same table.
    let (cold, registry) = another_container(&stack).await;
    assert_eq!(registry.installed_version("acme"), None);
    stack.processor = cold;
    assert!(spam_is_rejected(&mut stack).await, "the cold processor found and loaded acme's plugin");
    assert!(registry.installed_version("acme").is_some());
}

/// Every message runs on an instance of its own (its `validate` and `route` share it), so no
/// state carries from one message to the next; a trap costs only its own message.
async fn every_message_runs_on_an_instance_of_its_own(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-moderation", Policy::FailOpen);
    stack.install_plugin("lax", "roomcast-hostile-plugin", Policy::FailOpen);
    for (id, tenant) in [("ann", "acme"), ("bob", "acme"), ("lou", "lax"), ("liz", "lax")] {
        stack.connect(id, tenant, id, "general").await;
    }
    stack.pump().await;
    let before = stack.processor.counts();
    stack.recorder.clear();

    // One batch: five messages from acme, and lax's plugin trapping between two good calls.
    for text in ["one", "two", "spam", "  four  ", "five"] {
        stack.send("ann", json!({"action":"sendMessage","room":"general","message":text})).await;
    }
    for text in ["fine", "trap", "fine again"] {
        stack.send("lou", json!({"action":"sendMessage","room":"general","message":text})).await;
    }
    assert_eq!(
        stack.pump().await,
        10,
        "eight messages, and the verdicts recorded on the rejected and the rewritten one"
    );
    let counts = stack.processor.counts().since(&before);
    assert_eq!(counts.plugin_instances, 8, "one instance per message: {counts:?}");
    assert_eq!(counts.plugin_faults, 1);
    let got: Vec<_> = stack.recorder.received_action("bob", "message").iter().map(|m| m["message"].clone()).collect();
    assert_eq!(got, [json!("one"), json!("two"), json!("four"), json!("five")]);
    assert_eq!(stack.recorder.received_action("liz", "message").len(), 3, "fail-open delivers the trap's message");

    // The hostile plugin's randomness (wasi:random, a HashMap's order): each message decides as
    // it would alone, on a fresh instance, whatever came before it in the batch.
    stack.recorder.clear();
    for _ in 0..3 {
        stack.send("lou", json!({"action":"sendMessage","room":"general","message":"random"})).await;
    }
    stack.pump().await;
    let delivered = stack.recorder.received_action("liz", "message");
    assert_eq!(delivered.len(), 3);
    // The host blocks on its own runtime: from a thread of its own, as the processor calls it.
    tokio::task::spawn_blocking(move || {
        let host = PluginHost::new().unwrap();
        let hostile = host.compile(&component("roomcast-hostile-plugin"), &Limits::default()).unwrap();
        for m in delivered {
            let timestamp = m["timestamp"].as_str().unwrap();
            let at = chrono::DateTime::parse_from_rfc3339(timestamp).unwrap().timestamp_millis() as u64;
            let alone = Message {
                id: m["id"].as_str().unwrap().into(),
                tenant: "lax".into(),
                user_id: "lou".into(),
                timestamp: timestamp.into(),
                ..message("random")
            };
            let calls = host.message(&hostile, &Limits::default(), &alone, at);
            assert_eq!(calls.outcome.0.map(|(v, _)| v), Ok(Verdict::Rewrite(m["message"].as_str().unwrap().into())));
        }
    })
    .await
    .unwrap();
}

async fn per_tenant_limits_from_the_upload_apply_and_are_capped(kind: &str) {
    use roomcast::plugins::{CEILING, LimitOverrides};
    let mut stack = Stack::on(kind).await;
    for (id, tenant) in [("ann", "acme"), ("bob", "acme"), ("gus", "globex"), ("gil", "globex")] {
        stack.connect(id, tenant, id, "general").await;
    }
    stack.pump().await;
    let store = stack.table.store.clone();
    let moderation = component("roomcast-plugin-moderation");
    // acme's plugin gets too little fuel to run at all and fails closed; globex asks for far more
    // than the ceiling and gets the ceiling.
    let starved = LimitOverrides { fuel: Some(500), ..Default::default() };
    let meta = stack.upload_plugin("acme", &moderation, FailurePolicy::Closed, starved).await;
    assert_eq!(meta.limits, Some(starved), "kept with the version");
    let greedy = LimitOverrides { fuel: Some(u64::MAX), memory_mib: Some(4096), ..Default::default() };
    stack.upload_plugin("globex", &moderation, FailurePolicy::Closed, greedy).await;
    stack.pump().await;
    assert_eq!(store.plugins("acme").await.unwrap()[0].limits, Some(starved), "read back from the table");
    assert_eq!(stack.plugins.installed_limits("acme").unwrap().fuel, 500);
    let globex = stack.plugins.installed_limits("globex").unwrap();
    assert_eq!((globex.fuel, globex.memory_bytes), (CEILING.fuel, CEILING.memory_bytes));

    stack.recorder.clear();
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"hello"})).await;
    stack.send("gus", json!({"action":"sendMessage","room":"general","message":"hello"})).await;
    stack.pump().await;
    let rejected = stack.recorder.received_action("ann", "rejected");
    assert!(rejected[0]["reason"].as_str().unwrap().contains("ran out of fuel (500 units)"), "{rejected:?}");
    assert!(stack.recorder.received_action("bob", "message").is_empty());
    assert_eq!(stack.recorder.received_action("gil", "message")[0]["message"], "hello", "globex runs normally");
}

async fn the_compiled_plugin_cache_is_bounded_and_evicted_tenants_reload(kind: &str) {
    let mut stack = Stack::with_plugin_capacity(kind, 2).await;
    let tenants = ["acme", "globex", "initech"];
    for tenant in tenants {
        let (a, b) = (format!("{tenant}-a"), format!("{tenant}-b"));
        stack.connect(&a, tenant, "a", "general").await;
        stack.connect(&b, tenant, "b", "general").await;
        stack
            .upload_plugin(
                tenant,
                &component("roomcast-plugin-moderation"),
                FailurePolicy::Closed,
                roomcast::plugins::LimitOverrides::default(),
            )
            .await;
    }
    stack.pump().await;
    assert!(stack.plugins.loaded() <= 2, "at most two tenants' plugins are kept");

    // Round robin over three tenants with room for two: every turn may evict, and every tenant's
    // plugin still decides its own messages (reloaded from the table when it was evicted).
    for round in 0..2 {
        for tenant in tenants {
            stack.recorder.clear();
            stack.send(&format!("{tenant}-a"), json!({"action":"sendMessage","room":"general","message":"spam"})).await;
            stack.pump().await;
            assert_eq!(
                stack.recorder.received_action(&format!("{tenant}-a"), "rejected").len(),
                1,
                "round {round}, {tenant}: {:?}",
                stack.recorder.calls()
            );
            assert!(stack.plugins.loaded() <= 2);
        }
    }
    assert!(stack.processor.counts().plugin_evictions >= 4, "{:?}", stack.processor.counts());
}

// ---------------------------------------------------------------------------------------------
// What a cold load reads, on moto through a tap that counts what DynamoDB read.

/// Items and bytes DynamoDB read, as `roomcast::partitions` counts them, over every key since
/// the last call; the count starts afresh.
fn take(tap: &roomcast::partitions::Partitions) -> (u64, u64) {
    let read = tap.all().values().fold((0, 0), |(items, bytes), k| (items + k.items_read, bytes + k.bytes_read));
    tap.reset();
    read
}

/// A cold container loading a tenant's active plugin reads the `ACTIVE` pointer, that version's
/// metadata and its chunks — by key — and nothing of the tenant's other versions, however many
/// there are and however large.
#[tokio::test]
async fn a_cold_load_reads_only_the_active_version_by_key() {
    use roomcast::rules::{Mode, TenantRules};
    let (store, _) = roomcast_tests::moto_table().await;
    let table = store.table_name().to_string();
    // What DynamoDB read, counted by the partition layer (with budgets no test reaches).
    let unbounded = roomcast::partitions::PartitionLimits {
        latency: std::time::Duration::ZERO,
        read_units: 1e12,
        write_units: 1e12,
    };
    let tap = roomcast::partitions::Partitions::start(&roomcast_tests::moto_endpoint(), unbounded).await.unwrap();
    let sdk = roomcast_tests::sdk_config().await;
    let tapped: std::sync::Arc<dyn roomcast::store::Store> =
        std::sync::Arc::new(roomcast::store::dynamodb::DynamoStore::new(
            roomcast::config::dynamodb_client(&sdk, Some(&tap.endpoint)),
            table,
        ));
    let host = std::sync::Arc::new(PluginHost::new().unwrap());
    let now = chrono::Utc::now();
    // Three versions of 200+ KB each; the last uploaded is active.
    let mut active = None;
    for name in ["roomcast-plugin-welcome", "roomcast-plugin-routing", "roomcast-hostile-plugin"] {
        let meta = roomcast::plugins::upload(
            &*tapped,
            &host,
            "acme",
            &component(name),
            FailurePolicy::Open,
            roomcast::plugins::LimitOverrides::default(),
            now,
        )
        .await
        .unwrap();
        active = Some(meta);
    }
    let active = active.unwrap();
    tapped.set_active_plugin("acme", Some(&active.version)).await.unwrap();
    tapped.set_plugin_status("acme", &active.version, PluginStatus::Active, None).await.unwrap();
    let others: u64 =
        tapped.plugins("acme").await.unwrap().iter().map(|m| m.size as u64).sum::<u64>() - active.size as u64;
    take(&tap);

    let registry = std::sync::Arc::new(roomcast::plugins::registry::Registry::new(host, Default::default()));
    let rules = roomcast::plugins::PluginRules::new(registry.clone(), tapped.clone());
    rules.refresh("acme", Mode::Execute).await.unwrap();
    assert_eq!(registry.installed_version("acme"), Some(active.version.clone()));
    let (items, bytes) = take(&tap);
    println!(
        "cold load of a {} byte version beside {others} bytes of other versions: {items} items, {bytes} bytes read",
        active.size
    );
    // The pointer, the metadata, and the version's chunks.
    assert_eq!(items, 2 + active.chunks as u64, "{items} items, {bytes} bytes");
    assert!(bytes < active.size as u64 * 2 + 10_000, "{bytes} bytes: the other versions' bytes were read too");
}

/// All plugin instances of a process share one memory budget: eight messages at once whose
/// instances each fill their 16 MiB cap, under a 32 MiB budget, never hold more than 32 MiB
/// together — the others wait their turn — and every one is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_instances_share_the_processs_memory_budget() {
    let metrics = std::sync::Arc::new(roomcast::metrics::Metrics::default());
    let registry = fresh_registry(&metrics).with_memory_budget(32);
    let limits = Limits::default();
    let hostile = registry.host().compile(&component("roomcast-hostile-plugin"), &limits).unwrap();
    registry.install("lax", hostile, limits.clone(), Policy::FailOpen, true);
    let asks = (0..8).map(|i| {
        let message = Message { id: format!("m{i}"), tenant: "lax".into(), ..message("grow") };
        let registry = &registry;
        let at = roomcast::rules::RecordAt { time_ms: RECORD_TIME, sequence: format!("{i}") };
        async move { registry.decide_message(&message, &at).await.unwrap() }
    });
    for (decision, _, calls) in futures::future::join_all(asks).await {
        assert_eq!(decision, roomcast::react::Decision::Deliver { rewritten: None }, "fail-open");
        assert!(calls[0].outcome.contains("memory limit"), "{:?}", calls[0]);
    }
    let peak = registry.memory_peak_mib();
    assert!((16..=32).contains(&peak), "{peak} MiB reserved at once");
}

/// A load whose caller gave up (its record ran out of time) leaves the compilation running, and
/// the next caller joins it instead of compiling the same component again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_whose_caller_gave_up_is_joined_not_repeated() {
    let metrics = std::sync::Arc::new(roomcast::metrics::Metrics::default());
    let registry = fresh_registry(&metrics);
    let bytes = component("roomcast-hostile-plugin");
    let limits = Limits::default();
    let read = || {
        let bytes = bytes.clone();
        async move { Ok(Ok(bytes)) }
    };
    let gave_up = tokio::time::timeout(Duration::from_micros(1), registry.load("acme", "v1", &limits, read())).await;
    assert!(gave_up.is_err(), "the first caller was meant to give up before the compile ended");
    let loaded = registry.load("acme", "v1", &limits, read()).await.unwrap();
    assert!(loaded.is_ok(), "{loaded:?}");
    assert_eq!(metrics.snapshot().plugin_compiles, 1);
}

/// A registry with nothing installed and a host of its own, counting into `metrics`.
fn fresh_registry(metrics: &std::sync::Arc<roomcast::metrics::Metrics>) -> roomcast::plugins::registry::Registry {
    roomcast::plugins::registry::Registry::new(std::sync::Arc::new(PluginHost::new().unwrap()), metrics.clone())
}
