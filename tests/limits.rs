//! Rate limits per connection, user and tenant, through the real handlers on both stores (the
//! counters are the table's), and over real WebSockets with `roomcast dev`: a flood gets
//! `rate_limited` with a retry time, is closed when it keeps going, and never costs another
//! connection, user or tenant its sends.

use std::time::Duration;

use chrono::{DurationRound, TimeDelta};
use roomcast::limits::{Limiter, RateLimits};
use roomcast_tests::Stack;
use serde_json::{Value, json};

roomcast_tests::on_both_stores!(
    a_flooding_connection_is_refused_then_closed_and_another_tenant_is_served,
    a_user_and_a_tenant_are_held_to_their_limits_across_connections,
    joins_reads_and_connects_are_limited_too,
    a_tenants_backend_is_held_to_the_tenants_limit_and_the_operator_is_not,
);

/// The stack with the deployment's default limits, its clock at `ms` past a whole second.
async fn limited(kind: &str, ms: i64) -> Stack {
    let mut stack = Stack::on(kind).await;
    stack.deps.limits = Limiter::new(RateLimits::default());
    let second = stack.clock_now().duration_trunc(TimeDelta::seconds(1)).unwrap() + TimeDelta::seconds(1);
    stack.clock.set(second + TimeDelta::milliseconds(ms));
    stack
}

fn say(text: &str) -> Value {
    json!({"action":"sendMessage","room":"general","message":text})
}

fn refused(answer: &Value, scope: &str) -> bool {
    answer["action"] == "error"
        && answer["code"] == "rate_limited"
        && answer["message"].as_str().is_some_and(|m| m.contains(&format!("per {scope}")))
}

/// Mallory sends 40 messages in one second: 10 are taken; the next ones are refused with the
/// time left in the window; at 30 (three times the limit) the connection is deleted, told why
/// and closed, and its `left` says so. Bob, of another tenant, sends between Mallory's frames:
/// every one is acknowledged and delivered. Ann, in Mallory's room, gets the 10 only.
async fn a_flooding_connection_is_refused_then_closed_and_another_tenant_is_served(kind: &str) {
    let mut stack = limited(kind, 250).await;
    stack.connect("flood", "acme", "mallory", "general").await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "globex", "bob", "general").await;
    stack.connect("cy", "globex", "cy", "general").await;
    stack.pump().await;
    let mut answers = Vec::new();
    let mut good = Vec::new();
    for i in 0..40 {
        answers.push(stack.send("flood", say(&format!("spam {i}"))).await);
        if i % 8 == 0 {
            good.push(stack.send("bob", say(&format!("good {i}"))).await);
        }
    }
    assert!(answers[..10].iter().all(|a| a["action"] == "ack"), "{:?}", &answers[..10]);
    for answer in &answers[10..30] {
        assert!(refused(answer, "connection"), "{answer}");
        assert_eq!(answer["retry_after_ms"], 750, "the rest of the window: {answer}");
    }
    assert!(!answers[28]["message"].as_str().unwrap().contains("closed"), "{}", answers[28]);
    assert!(answers[29]["message"].as_str().unwrap().contains("being closed"), "{}", answers[29]);
    assert!(answers[30..].iter().all(|a| a["code"] == "not_connected"), "{:?}", &answers[30..]);
    assert!(good.iter().all(|a| a["action"] == "ack"), "another tenant's sends: {good:?}");
    stack.pump().await;
    let texts = |id: &str| -> Vec<String> {
        let frames = stack.recorder.received_action(id, "message");
        frames.iter().map(|m| m["message"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(texts("ann"), (0..10).map(|i| format!("spam {i}")).collect::<Vec<_>>());
    assert_eq!(texts("cy"), ["good 0", "good 8", "good 16", "good 24", "good 32"]);
    let told = stack.recorder.received_action("flood", "error");
    assert!(told.iter().any(|e| e["code"] == "rate_limited" && e["message"].as_str().unwrap().contains("closed")));
    assert_eq!(stack.recorder.deleted(), ["flood"], "the processor closed the socket");
    let left: Vec<Value> = stack.recorder.presence("ann").into_iter().filter(|f| f["user_id"] == "mallory").collect();
    assert_eq!(left.last().unwrap()["event"], "left", "{left:?}");
    assert_eq!(left.last().unwrap()["reason"], "rate_limited", "{left:?}");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// Ann's three connections send 8 each: the user's 20 are taken, the rest refused per user
/// (and not counted for the tenant). With the tenant's own limit at 25, Bob's sixth is refused per
/// tenant, and taken in the next second.
async fn a_user_and_a_tenant_are_held_to_their_limits_across_connections(kind: &str) {
    let stack = limited(kind, 0).await;
    let mut settings = roomcast::model::TenantSettings::new("acme");
    settings.rate_limits.insert("messages_per_tenant".into(), 25);
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    for id in ["a1", "a2", "a3"] {
        stack.connect(id, "acme", "ann", "general").await;
    }
    stack.connect("b1", "acme", "bob", "general").await;
    stack.connect("g1", "globex", "gil", "general").await;
    let mut taken = 0;
    for round in 0..8 {
        for id in ["a1", "a2", "a3"] {
            let answer = stack.send(id, say(&format!("{id} {round}"))).await;
            if answer["action"] == "ack" {
                taken += 1;
            } else {
                assert!(refused(&answer, "user"), "{answer}");
            }
        }
    }
    assert_eq!(taken, 20, "the user's limit, over three connections");
    for i in 0..5 {
        assert_eq!(stack.send("b1", say(&format!("bob {i}"))).await["action"], "ack", "bob {i}");
    }
    let sixth = stack.send("b1", say("bob 5")).await;
    assert!(refused(&sixth, "tenant"), "{sixth}");
    for i in 0..10 {
        assert_eq!(stack.send("g1", say(&format!("gil {i}"))).await["action"], "ack", "another tenant: {i}");
    }
    stack.clock.advance(TimeDelta::milliseconds(1000));
    assert_eq!(stack.send("b1", say("bob again")).await["action"], "ack", "the next window");
}

/// Joins count per connection (5 a second by default), and a connection over its limit can
/// still leave; reads (`history`, `who`, `ping`, …) count too (10); connects per user (5).
async fn joins_reads_and_connects_are_limited_too(kind: &str) {
    let stack = limited(kind, 0).await;
    stack.connect("a1", "acme", "ann", "general").await;
    let mut answers = Vec::new();
    for i in 0..6 {
        answers.push(stack.send("a1", json!({"action": "join", "room": format!("side{i}")})).await);
    }
    assert!(answers[..5].iter().all(|a| a["action"] == "ack"), "{answers:?}");
    assert!(refused(&answers[5], "connection"), "{}", answers[5]);
    assert_eq!(stack.send("a1", json!({"action": "leave", "room": "side0"})).await["action"], "ack", "leaving");
    let reads: Vec<Value> = futures::future::join_all((0..11).map(|i| {
        let frame = match i % 3 {
            0 => json!({"action": "history", "room": "general"}),
            1 => json!({"action": "who", "room": "general"}),
            _ => json!({"action": "ping"}),
        };
        stack.send("a1", frame)
    }))
    .await;
    assert_eq!(reads.iter().filter(|a| a["action"] != "error").count(), 10, "{reads:?}");
    assert!(reads.iter().any(|a| refused(a, "connection")), "{reads:?}");
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(stack.connect(&format!("d{i}"), "acme", "dan", "general").await.status_code);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
    let refused_connect = stack.connect("d6", "acme", "dan", "general").await;
    assert!(
        matches!(&refused_connect.body, Some(aws_lambda_events::encodings::Body::Text(t)) if t.contains("per user")),
        "{:?}",
        refused_connect.body
    );
    assert!(stack.table.store.get_connection("d5", stack.clock_now()).await.unwrap().is_none(), "nothing written");
    assert_eq!(stack.connect("e1", "acme", "eve", "general").await.status_code, 200, "another user connects");
}

/// Over real sockets: a flooding client gets `rate_limited` answers with a retry time, then its
/// socket is closed; another tenant's client, sending all along, has every send acknowledged and
/// delivered to its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_websockets_a_flood_is_closed_and_another_tenant_is_served() {
    use roomcast_tests::ws;
    let stack = ws::dev("memory", |o| o.rate_limits = RateLimits::default()).await;
    let mut flood = ws::connect(&stack, "acme", "mallory", "general").await;
    let mut bob = ws::connect(&stack, "globex", "bob", "general").await;
    let mut cy = ws::connect(&stack, "globex", "cy", "general").await;
    for client in [&mut flood, &mut bob, &mut cy] {
        client.expect_action("welcome").await;
    }
    let mut goods = Vec::new();
    for i in 0..2000 {
        if !flood.try_send(say(&format!("spam {i}"))).await {
            break;
        }
        // Another tenant's user, within its own connection's limit (10 a second) however long
        // the flood takes to be closed: a window boundary early in the flood can make that take
        // more than 200 frames.
        if i % 20 == 0 && goods.len() < 9 {
            goods.push(format!("good {i}"));
            let answer = bob.ask(say(goods.last().unwrap()), "ack").await;
            assert_eq!(answer["request"], "sendMessage");
        }
    }
    flood.expect_close(Duration::from_secs(20)).await;
    let limited = ws::take_all(&mut flood, |f| f["code"] == "rate_limited");
    assert!(!limited.is_empty(), "the flood was told");
    assert!(limited.iter().any(|f| f["retry_after_ms"].as_u64().is_some_and(|ms| ms <= 1000)), "{limited:?}");
    goods.push("good after".into());
    bob.ask(say("good after"), "ack").await;
    for want in &goods {
        cy.expect(want, |f| f["action"] == "message" && f["message"] == want.as_str()).await;
    }
    stack.shutdown().await;
}

/// A tenant's backend publishing with its token counts against the tenant's message limits (per
/// publishing user and per tenant): over them, 429 with `retry_after_ms`; the operator's publishes
/// (IAM) are not limited.
async fn a_tenants_backend_is_held_to_the_tenants_limit_and_the_operator_is_not(kind: &str) {
    use roomcast::publish::{Caller, PublishDeps, publish};
    let stack = limited(kind, 500).await;
    let mut settings = roomcast::model::TenantSettings::new("acme");
    settings.rate_limits.insert("messages_per_user".into(), 3);
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    let deps = PublishDeps {
        store: stack.table.store.clone(),
        clock: stack.clock.clone(),
        history_ttl_seconds: 3600,
        idempotency_window_seconds: 300,
        limits: Limiter::new(RateLimits::default()),
    };
    let body = |i: usize| serde_json::to_vec(&json!({"tenant": "acme", "room": "general", "message": format!("m{i}")}));
    let tenant = Caller::Tenant("acme".into());
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(publish(&deps, &tenant, &body(i).unwrap()).await);
    }
    assert!(answers[..3].iter().all(Result::is_ok), "{answers:?}");
    let refused = answers[3].as_ref().unwrap_err();
    assert_eq!((refused.status, refused.retry_after_ms), (429, Some(500)), "{refused}");
    assert!(refused.message.contains("per user"), "{refused}");
    for i in 4..10 {
        assert!(publish(&deps, &Caller::Operator, &body(i).unwrap()).await.is_ok(), "the operator's {i}");
    }
}
