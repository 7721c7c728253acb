//! Plugins 0.2 through the handlers and the processor, on the embedded store and on moto: room
//! authorization (`authorize-join`, `join_denied`, the token's `rooms` claim), per-tenant
//! configuration without re-uploading, a 0.1.0 component still working, and the failure policy
//! for a plugin that never answers a join.

use roomcast::model::{FailurePolicy, PluginConfig};
use roomcast::plugins::LimitOverrides;
use roomcast::plugins::registry::Policy;
use roomcast_tests::{Stack, component};
use serde_json::{Value, json};

roomcast_tests::on_both_stores!(
    a_denied_join_gets_nothing_of_the_room_and_an_allowed_one_works,
    rooms_asked_for_at_connect_wait_for_the_rules_too,
    a_configuration_change_takes_effect_without_a_reupload,
    the_tokens_rooms_claim_limits_rooms_without_a_plugin,
    a_plugin_that_never_answers_a_join_meets_the_tenants_policy,
    a_component_of_the_first_world_still_works,
    recovery_waits_for_the_rules_and_a_denied_room_recovers_nothing,
    a_connection_opened_before_the_plugin_cannot_slip_a_message_into_a_room_it_is_denied,
    a_redelivered_join_is_decided_once,
    two_concurrent_joins_of_one_room_settle_to_one_answer,
    a_hostile_plugins_pending_joins_meet_its_policy,
    a_message_sent_just_before_its_sender_leaves_is_still_delivered,
);

/// `config` as the tenant's plugin configuration, written as `roomcast plugin config set` does.
async fn configure(stack: &Stack, tenant: &str, pairs: &[(&str, &str)]) {
    let values = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let config = PluginConfig::new(tenant, values, stack.clock_now()).unwrap();
    stack.table.store.put_plugin_config(&config).await.unwrap();
}

/// A stack whose tenant `acme` runs the rooms-acl example, uploaded and activated through the
/// stream (so its `ACTIVE` pointer says that it decides joins), with `room.vip=ann`.
async fn acl_stack(kind: &str) -> Stack {
    let mut stack = Stack::on(kind).await;
    configure(&stack, "acme", &[("room.vip", "ann")]).await;
    stack
        .upload_plugin(
            "acme",
            &component("roomcast-plugin-rooms-acl"),
            FailurePolicy::Closed,
            LimitOverrides::default(),
        )
        .await;
    stack.pump().await;
    let active = stack.table.store.active_plugin("acme").await.unwrap().expect("activated");
    assert_eq!(active.authorizes_joins, Some(true), "the pointer says the plugin decides joins");
    stack
}

fn rooms_of(frames: &[Value], room: &str) -> Vec<Value> {
    frames.iter().filter(|f| f["room"] == room).cloned().collect()
}

async fn a_denied_join_gets_nothing_of_the_room_and_an_allowed_one_works(kind: &str) {
    let mut stack = acl_stack(kind).await;
    stack.connect("ann", "acme", "ann", "lobby").await;
    stack.connect("eve", "acme", "eve", "lobby").await;
    stack.pump().await;

    // Both joins wait for the processor: the handler's answer says so.
    for who in ["ann", "eve"] {
        let answer = stack.send(who, json!({"action":"join","room":"vip"})).await;
        assert_eq!((answer["action"].as_str(), answer["pending"].as_bool()), (Some("ack"), Some(true)), "{answer}");
        // Nothing of the room may be read or sent while it waits.
        let history = stack.send(who, json!({"action":"history","room":"vip"})).await;
        assert_eq!(history["code"], "not_member", "{history}");
    }
    stack.pump().await;
    let denied = stack.recorder.received_action("eve", "join_denied");
    assert_eq!(denied.len(), 1, "{:?}", stack.recorder.received("eve"));
    assert_eq!(denied[0]["room"], "vip");
    assert!(denied[0]["reason"].as_str().unwrap().contains("eve is not on the list"), "{}", denied[0]);
    let acks: Vec<Value> =
        stack.recorder.received_action("ann", "ack").into_iter().filter(|a| a["room"] == "vip").collect();
    assert_eq!(acks.len(), 1, "the allowed join is acknowledged once: {acks:?}");
    assert_eq!((acks[0]["users"].as_u64(), acks[0].get("pending")), (Some(1), None), "{}", acks[0]);

    // The allowed member sends; the denied one receives nothing of the room, not even presence.
    let sent = stack.send("ann", json!({"action":"sendMessage","room":"vip","message":"members only"})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
    let refused = stack.send("eve", json!({"action":"sendMessage","room":"vip","message":"let me in"})).await;
    assert_eq!(refused["code"], "not_member", "{refused}");
    let history = stack.send("eve", json!({"action":"history","room":"vip"})).await;
    assert_eq!(history["code"], "not_member", "{history}");
    let who = stack.send("eve", json!({"action":"who","room":"vip"})).await;
    assert_eq!(who["code"], "not_member", "{who}");
    stack.pump().await;
    assert_eq!(rooms_of(&stack.recorder.received_action("ann", "message"), "vip").len(), 1);
    let eve_saw: Vec<Value> = stack
        .recorder
        .received("eve")
        .into_iter()
        .filter(|f| f["room"] == "vip" && f["action"] != "join_denied")
        .collect();
    assert!(eve_saw.is_empty(), "the denied member got {eve_saw:?}");
    assert_eq!(stack.live_set("acme", "vip").await, vec![("ann".to_string(), 1)], "only ann is present");
    let counts = stack.processor.counts();
    // Allowed: both connects' `lobby` and ann's `vip`; denied: eve's `vip`.
    assert_eq!((counts.joins_allowed, counts.joins_denied), (3, 1));
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

async fn rooms_asked_for_at_connect_wait_for_the_rules_too(kind: &str) {
    let mut stack = acl_stack(kind).await;
    stack.connect("eve", "acme", "eve", "lobby,vip").await;
    stack.connect("ann", "acme", "ann", "lobby,vip").await;
    stack.pump().await;
    // Every room waits for the rules: the welcome names none; each is acknowledged or denied.
    let welcome = &stack.recorder.received_action("eve", "welcome")[0];
    assert_eq!(welcome["rooms"], json!([]), "{welcome}");
    assert!(welcome.get("counts").is_none(), "no room's size before the rules allow it: {welcome}");
    assert_eq!(stack.recorder.received_action("eve", "join_denied")[0]["room"], "vip");
    assert_eq!(rooms_of(&stack.recorder.received_action("eve", "ack"), "lobby").len(), 1);
    let vip_acks = rooms_of(&stack.recorder.received_action("ann", "ack"), "vip");
    assert_eq!(vip_acks.len(), 1, "{:?}", stack.recorder.received("ann"));
    stack.send("ann", json!({"action":"sendMessage","room":"vip","message":"hi"})).await;
    stack.pump().await;
    assert!(rooms_of(&stack.recorder.received("eve"), "vip").iter().all(|f| f["action"] == "join_denied"));
    assert_eq!(rooms_of(&stack.recorder.received_action("ann", "message"), "vip").len(), 1);
    // The connection record no longer holds the denied room; leaving a room never joined is refused.
    let info = stack.send("eve", json!({"action":"info"})).await;
    assert_eq!(info["rooms"], json!(["lobby"]), "{info}");
}

async fn a_configuration_change_takes_effect_without_a_reupload(kind: &str) {
    let mut stack = acl_stack(kind).await;
    stack.connect("eve", "acme", "eve", "lobby").await;
    stack.pump().await;
    stack.send("eve", json!({"action":"join","room":"vip"})).await;
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("eve", "join_denied").len(), 1);

    // The same version, a new list: the next batch reads it.
    let before = stack.table.store.active_plugin("acme").await.unwrap().unwrap();
    configure(&stack, "acme", &[("room.vip", "ann,eve")]).await;
    stack.pump().await;
    stack.send("eve", json!({"action":"join","room":"vip"})).await;
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("eve", "join_denied").len(), 1, "no second denial");
    assert_eq!(rooms_of(&stack.recorder.received_action("eve", "ack"), "vip").len(), 1);
    let after = stack.table.store.active_plugin("acme").await.unwrap().unwrap();
    assert_eq!((before.version, before.revision), (after.version, after.revision), "nothing was re-uploaded");

    // The moderation example reads its banned words from the same configuration.
    configure(&stack, "beta", &[("banned", "durian")]).await;
    stack
        .upload_plugin("beta", &component("roomcast-plugin-moderation"), FailurePolicy::Open, LimitOverrides::default())
        .await;
    stack.connect("bea", "beta", "bea", "general").await;
    stack.pump().await;
    stack.send("bea", json!({"action":"sendMessage","room":"general","message":"durian for lunch"})).await;
    stack.send("bea", json!({"action":"sendMessage","room":"general","message":"spam is fine here"})).await;
    stack.pump().await;
    let rejected = stack.recorder.received_action("bea", "rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0]["reason"].as_str().unwrap().contains("durian"));
    assert_eq!(stack.recorder.received_action("bea", "message").len(), 1);
}

/// `$connect` as API Gateway passes it when the authorizer put a `rooms` claim in the context.
fn connect_with_rooms_claim(
    id: &str,
    user: &str,
    rooms: &str,
    claim: &[&str],
) -> aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest {
    let mut request = roomcast_tests::connect_request(id, "acme", user, rooms);
    request
        .request_context
        .authorizer
        .fields
        .insert("rooms".into(), Value::String(serde_json::to_string(claim).unwrap()));
    request
}

async fn the_tokens_rooms_claim_limits_rooms_without_a_plugin(kind: &str) {
    let mut stack = Stack::on(kind).await;
    let request = connect_with_rooms_claim("sue", "sue", "support-1,general", &["support-*", "team-42"]);
    let answer = roomcast::handlers::connect(&request, &stack.deps).await;
    assert_eq!(answer.status_code, 200);
    stack.connect("bob", "acme", "bob", "general,support-1").await;
    stack.pump().await;
    let welcome = &stack.recorder.received_action("sue", "welcome")[0];
    assert_eq!(welcome["rooms"], json!(["support-1"]), "{welcome}");
    let denied = stack.recorder.received_action("sue", "join_denied");
    assert_eq!((denied.len(), denied[0]["room"].as_str()), (1, Some("general")), "{denied:?}");

    // `join` answers at once: allowed by name, refused otherwise.
    let ok = stack.send("sue", json!({"action":"join","room":"team-42"})).await;
    assert_eq!((ok["action"].as_str(), ok.get("pending")), (Some("ack"), None), "{ok}");
    let refused = stack.send("sue", json!({"action":"join","room":"team-420"})).await;
    assert_eq!(refused["action"], "join_denied", "{refused}");
    stack.send("bob", json!({"action":"sendMessage","room":"general","message":"not for sue"})).await;
    stack.send("bob", json!({"action":"sendMessage","room":"support-1","message":"for sue"})).await;
    stack.pump().await;
    let got: Vec<String> = stack
        .recorder
        .received_action("sue", "message")
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, vec!["for sue".to_string()]);

    // A claim that is not a list of names refuses the connection, not the check.
    let mut bad = roomcast_tests::connect_request("bad", "acme", "bad", "general");
    bad.request_context.authorizer.fields.insert("rooms".into(), Value::String("support-*".into()));
    assert_eq!(roomcast::handlers::connect(&bad, &stack.deps).await.status_code, 403);
}

async fn a_plugin_that_never_answers_a_join_meets_the_tenants_policy(kind: &str) {
    // A plugin installed from a file has no ACTIVE pointer: joins do not wait, and the processor
    // asks the plugin when it sees the membership — denial then removes it before any message.
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("shut", "roomcast-hostile-plugin", Policy::FailClosed);
    stack.install_plugin("open", "roomcast-hostile-plugin", Policy::FailOpen);
    for (id, tenant) in [("s1", "shut"), ("o1", "open")] {
        stack.connect(id, tenant, id, "lobby").await;
    }
    stack.pump().await;
    for room in ["loop", "trap", "grow", "sleep-forever", "giant"] {
        stack.send("s1", json!({"action":"join","room":room})).await;
        stack.send("o1", json!({"action":"join","room":room})).await;
    }
    stack.send("s1", json!({"action":"join","room":"deny-x"})).await;
    stack.pump().await;
    let shut: Vec<String> = stack
        .recorder
        .received_action("s1", "join_denied")
        .iter()
        .map(|d| d["room"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(shut.len(), 6, "fail-closed denies every join the plugin could not answer: {shut:?}");
    for denial in stack.recorder.received_action("s1", "join_denied") {
        let reason = denial["reason"].as_str().unwrap();
        assert!(reason.len() <= 4100, "a deny reason is bounded");
        if denial["room"] != "deny-x" {
            assert!(reason.contains("could not be checked"), "{reason}");
        }
    }
    assert!(stack.recorder.received_action("o1", "join_denied").is_empty(), "fail-open allows");
    assert_eq!(stack.live_set("open", "loop").await, vec![("o1".to_string(), 1)]);
    assert!(stack.live_set("shut", "loop").await.is_empty());
    // The denied connection is out of the rooms; the tenant next door was never touched.
    let info = stack.send("s1", json!({"action":"info"})).await;
    assert_eq!(info["rooms"], json!(["lobby"]), "{info}");
    assert!(stack.processor.counts().plugin_faults >= 8, "each fault is counted");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

async fn a_component_of_the_first_world_still_works(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-legacy-plugin", Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.connect("cat", "acme", "cat", "general").await;
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("ann", "welcome")[0]["greeting"], "hello ann (0.1.0)");
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"buy spam"})).await;
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"  trimmed  "})).await;
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"@bob just you"})).await;
    stack.pump().await;
    assert!(stack.recorder.received_action("ann", "rejected")[0]["reason"].as_str().unwrap().contains("0.1.0"));
    let bob: Vec<String> = stack
        .recorder
        .received_action("bob", "message")
        .iter()
        .map(|m| m["message"].as_str().unwrap().into())
        .collect();
    assert_eq!(bob, vec!["trimmed".to_string(), "@bob just you".to_string()]);
    let cat = stack.recorder.received_action("cat", "message");
    assert_eq!(cat.len(), 1, "the mention went to bob and the sender only: {cat:?}");
    // Its joins are never asked: 0.1.0 has no such hook.
    stack.send("cat", json!({"action":"join","room":"vip"})).await;
    stack.pump().await;
    assert!(stack.recorder.received_action("cat", "join_denied").is_empty());
}

async fn recovery_waits_for_the_rules_and_a_denied_room_recovers_nothing(kind: &str) {
    let mut stack = acl_stack(kind).await;
    stack.connect("ann", "acme", "ann", "vip").await;
    stack.pump().await;
    let mut ids = Vec::new();
    for text in ["one", "two"] {
        let ack = stack.send("ann", json!({"action":"sendMessage","room":"vip","message":text})).await;
        ids.push(ack["id"].as_str().unwrap().to_string());
    }
    stack.pump().await;
    let since = format!("vip:{}", ids[0]);
    let reconnect = |id: &str, user: &str| {
        let mut request = roomcast_tests::connect_request(id, "acme", user, "vip");
        request.query_string_parameters = roomcast_tests::query(&[("rooms", "vip"), ("since", &since)]);
        request
    };
    for (id, user) in [("eve", "eve"), ("ann2", "ann")] {
        assert_eq!(roomcast::handlers::connect(&reconnect(id, user), &stack.deps).await.status_code, 200);
    }
    stack.pump().await;
    // Denied: the room's history never reaches the connection, whatever `since` asked for.
    let eve: Vec<Value> = stack.recorder.received("eve").into_iter().filter(|f| f["room"] == "vip").collect();
    assert_eq!(eve.len(), 1, "{eve:?}");
    assert_eq!(eve[0]["action"], "join_denied");
    // Allowed: the ack, then what was missed, then the `recover` frame.
    let ann2: Vec<(String, String)> = stack
        .recorder
        .received("ann2")
        .into_iter()
        .filter(|f| f["room"] == "vip")
        .map(|f| (f["action"].as_str().unwrap().to_string(), f["message"].as_str().unwrap_or("").to_string()))
        .collect();
    let want = [("ack", ""), ("message", "two"), ("recover", "")].map(|(a, m)| (a.to_string(), m.to_string()));
    assert_eq!(ann2, want.to_vec());
}

async fn a_connection_opened_before_the_plugin_cannot_slip_a_message_into_a_room_it_is_denied(kind: &str) {
    let mut stack = Stack::on(kind).await;
    configure(&stack, "acme", &[("room.vip", "ann")]).await;
    stack.connect("ann", "acme", "ann", "vip").await;
    stack.connect("eve", "acme", "eve", "lobby").await;
    stack.pump().await;
    stack
        .upload_plugin(
            "acme",
            &component("roomcast-plugin-rooms-acl"),
            FailurePolicy::Closed,
            LimitOverrides::default(),
        )
        .await;
    stack.pump().await;
    // Eve's connection (and this handler's few-second view of the tenant) predate the plugin:
    // her join is answered at once, and she sends straight away.
    let answer = stack.send("eve", json!({"action":"join","room":"vip"})).await;
    assert_eq!(answer["action"], "ack", "{answer}");
    let sent = stack.send("eve", json!({"action":"sendMessage","room":"vip","message":"sneaking in"})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
    stack.send("eve", json!({"action":"signal","room":"vip","data":{"typing":true}})).await;
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("eve", "join_denied")[0]["room"], "vip");
    let ann_saw: Vec<Value> =
        stack.recorder.received("ann").into_iter().filter(|f| f["user_id"] == "eve" && f["room"] == "vip").collect();
    assert!(ann_saw.is_empty(), "the denied sender reached the room: {ann_saw:?}");
    // Her next join waits for the rules: the connection is marked now.
    let again = stack.send("eve", json!({"action":"join","room":"vip"})).await;
    assert_eq!(again["pending"], true, "{again}");
}

async fn a_redelivered_join_is_decided_once(kind: &str) {
    let mut stack = acl_stack(kind).await;
    configure(&stack, "acme", &[("room.vip", "eve")]).await;
    stack.connect("eve", "acme", "eve", "lobby").await;
    stack.pump().await;
    stack.send("eve", json!({"action":"join","room":"vip"})).await;
    let batch = stack.pump_once().await;
    stack.pump().await;
    assert_eq!(rooms_of(&stack.recorder.received_action("eve", "ack"), "vip").len(), 1);
    // The rules change, then the same batch comes again (Lambda redelivers): the join was
    // decided already, and stays as decided.
    configure(&stack, "acme", &[("room.vip", "ann")]).await;
    stack.deliver(&batch).await;
    stack.pump().await;
    assert!(stack.recorder.received_action("eve", "join_denied").is_empty(), "{:?}", stack.recorder.received("eve"));
    assert_eq!(stack.live_set("acme", "vip").await, vec![("eve".to_string(), 1)]);
    assert_eq!(stack.processor.counts().joins_denied, 0);
}

async fn a_hostile_plugins_pending_joins_meet_its_policy(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack
        .upload_plugin("evil", &component("roomcast-hostile-plugin"), FailurePolicy::Closed, LimitOverrides::default())
        .await;
    stack.pump().await;
    assert_eq!(stack.table.store.active_plugin("evil").await.unwrap().unwrap().authorizes_joins, Some(true));
    stack.connect("e1", "evil", "e1", "loop,trap,grow,recurse,general").await;
    stack.connect("a1", "acme", "a1", "general").await;
    stack.pump().await;
    let denied: std::collections::BTreeSet<String> = stack
        .recorder
        .received_action("e1", "join_denied")
        .iter()
        .map(|d| d["room"].as_str().unwrap().to_string())
        .collect();
    let want: std::collections::BTreeSet<String> = ["grow", "loop", "recurse", "trap"].map(String::from).into();
    assert_eq!(denied, want);
    assert_eq!(rooms_of(&stack.recorder.received_action("e1", "ack"), "general").len(), 1, "allowed");
    assert_eq!(stack.recorder.received_action("a1", "welcome").len(), 1, "the next tenant is untouched");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

async fn a_message_sent_just_before_its_sender_leaves_is_still_delivered(kind: &str) {
    let mut stack = acl_stack(kind).await;
    configure(&stack, "acme", &[("room.vip", "ann,bob")]).await;
    stack.connect("ann", "acme", "ann", "vip").await;
    stack.connect("bob", "acme", "bob", "vip").await;
    stack.pump().await;
    // Bob says goodbye and leaves before the processor sees either: his message was a member's.
    let sent = stack.send("bob", json!({"action":"sendMessage","room":"vip","message":"bye all"})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
    stack.send("bob", json!({"action":"leave","room":"vip"})).await;
    stack.pump().await;
    let got: Vec<String> = stack
        .recorder
        .received_action("ann", "message")
        .iter()
        .map(|m| m["message"].as_str().unwrap().into())
        .collect();
    assert_eq!(got, vec!["bye all".to_string()]);
}

/// API Gateway runs one connection's frames concurrently: two `join`s of one room both read the
/// connection before either writes (as the handler does), then both write. Only the first
/// membership is written (the second is told so), so the one INSERT is decided, once: one `ack`
/// (or one `join_denied`), and the membership does not stay pending.
async fn two_concurrent_joins_of_one_room_settle_to_one_answer(kind: &str) {
    use roomcast::model::JoinReason;
    let mut stack = acl_stack(kind).await;
    stack.connect("ann", "acme", "ann", "lobby").await;
    stack.connect("eve", "acme", "eve", "lobby").await;
    stack.pump().await;
    let now = stack.clock_now();
    for who in ["ann", "eve"] {
        let conn = stack.table.store.get_connection(who, now).await.unwrap().expect("connected");
        // Both frames' handlers read this same connection, without the room.
        let first = conn.membership("vip", JoinReason::Join, now);
        let second = conn.membership("vip", JoinReason::Join, now);
        assert_eq!((first.pending, second.pending), (Some(true), Some(true)), "the rules decide joins");
        assert_ne!(first.joined_ns, second.joined_ns, "two joins, told apart");
        assert!(stack.table.store.join(&first).await.unwrap(), "the first join is written");
        assert!(!stack.table.store.join(&second).await.unwrap(), "the second finds it and writes nothing");
    }
    stack.pump().await;
    let acks = rooms_of(&stack.recorder.received_action("ann", "ack"), "vip");
    assert_eq!(acks.len(), 1, "one answer: {acks:?}");
    assert_eq!(acks[0].get("pending"), None, "{}", acks[0]);
    assert_eq!(rooms_of(&stack.recorder.received_action("eve", "join_denied"), "vip").len(), 1);
    // Settled: the member's next `join` is answered at once, and a message reaches her.
    let again = stack.send("ann", json!({"action":"join","room":"vip"})).await;
    assert_eq!((again["action"].as_str(), again.get("pending")), (Some("ack"), None), "{again}");
    let sent = stack.send("ann", json!({"action":"sendMessage","room":"vip","message":"settled"})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
    stack.pump().await;
    assert_eq!(rooms_of(&stack.recorder.received_action("ann", "message"), "vip").len(), 1);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}
