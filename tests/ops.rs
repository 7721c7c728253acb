//! Deployment-side operations: the `$connect` REQUEST authorizer (AWS's documented WebSocket
//! authorizer event), the admin operations' events and responses, and the
//! stale-connection sweeper — against moto and the embedded store.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
use chrono::Duration as Age;
use roomcast::admin::Admin;
use roomcast::auth::{Claims, mint};
use roomcast::handlers::authorize;
use roomcast_tests::{Stack, sign_hs256};
use serde_json::{Value, json};

const SECRET: &[u8] = b"authorizer-secret";
const NOW: i64 = 1_800_000_000;

fn authorizer_event(query: Value) -> ApiGatewayCustomAuthorizerRequestTypeRequest {
    let mut v: Value =
        serde_json::from_str(include_str!("fixtures/example-apigw-v2-custom-authorizer-websocket-request.json"))
            .unwrap();
    v["queryStringParameters"] = query;
    serde_json::from_value(v).unwrap()
}

fn token(tenant: &str, sub: &str, exp: i64, secret: &[u8]) -> String {
    mint(
        &Claims {
            tenant: tenant.into(),
            sub: sub.into(),
            exp,
            nbf: None,
            scope: None,
            rooms: None,
            extra: Default::default(),
        },
        secret,
    )
}

fn shared() -> roomcast::identity::Verifier {
    roomcast::identity::Verifier::new(SECRET.to_vec(), None)
}

#[tokio::test]
async fn the_authorizer_allows_a_valid_token_with_a_flat_context() {
    let event = authorizer_event(json!({"token": token("acme", "ann", NOW + 60, SECRET)}));
    let policy = authorize(&event, &shared(), NOW).await.unwrap();
    assert_eq!(policy["principalId"], "ann");
    // The token's expiry too: the connection keeps it, and asks for a `refresh` after it.
    assert_eq!(policy["context"], json!({"tenant": "acme", "userId": "ann", "exp": NOW + 60}));
    let statement = &policy["policyDocument"]["Statement"][0];
    assert_eq!(statement["Effect"], "Allow");
    assert_eq!(statement["Action"], "execute-api:Invoke");
    assert_eq!(statement["Resource"], json!(["arn:aws:execute-api:eu-west-1:123456789012:abcdef123/test/$connect"]));
}

#[tokio::test]
async fn the_authorizer_denies_expired_wrongly_signed_claimless_and_malformed_tokens() {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let claimless =
        sign_hs256(&format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64(&format!(r#"{{"exp":{}}}"#, NOW + 60))), SECRET);
    let no_tenant = sign_hs256(
        &format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64(&format!(r#"{{"sub":"ann","exp":{}}}"#, NOW + 60))),
        SECRET,
    );
    for (what, token) in [
        ("expired", token("acme", "ann", NOW - 1, SECRET)),
        ("wrong signature", token("acme", "ann", NOW + 60, b"someone-else")),
        ("no claims", claimless),
        ("no tenant", no_tenant),
        ("malformed", "definitely.not.ajwt".to_string()),
        ("two parts", "abc.def".to_string()),
    ] {
        let policy = authorize(&authorizer_event(json!({"token": token})), &shared(), NOW).await.unwrap();
        assert_eq!(policy["policyDocument"]["Statement"][0]["Effect"], "Deny", "{what}");
        assert!(policy.get("context").is_none(), "{what}: a denied caller gets no context");
    }
    // No token at all: "Unauthorized", which API Gateway turns into 401.
    assert_eq!(authorize(&authorizer_event(json!({})), &shared(), NOW).await, Err("Unauthorized"));
    // The AWS example itself carries no token.
    let example: ApiGatewayCustomAuthorizerRequestTypeRequest =
        serde_json::from_str(include_str!("fixtures/example-apigw-v2-custom-authorizer-websocket-request.json"))
            .unwrap();
    assert_eq!(authorize(&example, &shared(), NOW).await, Err("Unauthorized"));
}

async fn admin_for(stack: &Stack) -> Admin {
    stack.admin().await
}

roomcast_tests::on_both_stores!(
    admin_operations_answer_with_the_connection_managers_shapes,
    invalid_admin_events_get_400_with_the_reason,
    cleanup_deletes_only_confirmed_stale_connections_and_presence_follows,
    the_sweeper_expires_presence_although_ttl_has_not_deleted_the_record,
    the_sweeper_asks_about_stale_connections_several_at_a_time,
    a_failing_shard_holds_up_no_other_and_an_open_connection_is_asked_about_once,
);

async fn admin_operations_answer_with_the_connection_managers_shapes(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("c1", "acme", "user-123", "general").await;
    stack.connect("c2", "acme", "user-123", "").await;
    stack.connect("c3", "acme", "bob", "").await;
    stack.pump().await;
    let admin = admin_for(&stack).await;

    let answer = admin.handle(&json!({"action": "get_user_connections", "tenant": "acme", "userId": "user-123"})).await;
    assert_eq!(answer["statusCode"], 200);
    assert_eq!(answer["body"]["count"], 2);
    let first = &answer["body"]["connections"][0];
    for field in ["connectionId", "userId", "status", "createdAt"] {
        assert!(first.get(field).is_some(), "{field} missing from {first}");
    }
    assert_eq!(first["status"], "CONNECTED");

    let page1 = admin.handle(&json!({"action": "get_all_connections", "limit": 2})).await;
    assert_eq!(page1["body"]["count"], 2);
    let token = page1["body"]["nextToken"].as_str().expect("a next page").to_string();
    let page2 = admin.handle(&json!({"action": "get_all_connections", "limit": 2, "nextToken": token})).await;
    assert_eq!(page2["body"]["count"], 1);
    assert!(page2["body"].get("nextToken").is_none());

    let updated = admin
        .handle(&json!({"action": "update_connection_status", "connectionId": "c3", "status": "DISCONNECTED"}))
        .await;
    assert_eq!(updated["statusCode"], 200);
    assert_eq!(updated["body"]["connection"]["status"], "DISCONNECTED");
    let missing = admin
        .handle(&json!({"action": "update_connection_status", "connectionId": "nope", "status": "DISCONNECTED"}))
        .await;
    assert_eq!(missing["statusCode"], 404);
}

async fn invalid_admin_events_get_400_with_the_reason(kind: &str) {
    let stack = Stack::on(kind).await;
    let admin = admin_for(&stack).await;
    for event in [
        json!({}),
        json!({"action": "drop_table"}),
        json!({"action": "get_user_connections", "tenant": "acme"}),
        json!({"action": "update_connection_status", "connectionId": "c1"}),
        json!({"action": "update_connection_status", "connectionId": "c1", "status": "gone fishing"}),
        json!({"action": "get_all_connections", "limit": 0}),
        json!("not an object"),
    ] {
        let answer = admin.handle(&event).await;
        assert_eq!(answer["statusCode"], 400, "{event}: {answer}");
        assert!(answer["body"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{answer}");
    }
}

/// `GetConnection` answers in tens of milliseconds from a Lambda: asked one at a time, the
/// 10,000 connections a network blip leaves stale would take minutes. The sweep keeps up to
/// `SWEEP_PROBES` in flight, and still cleans every gone one.
async fn the_sweeper_asks_about_stale_connections_several_at_a_time(kind: &str) {
    let account =
        roomcast::gateway::account::AccountSettings { latency: Duration::from_millis(20), ..Default::default() };
    let mut stack = Stack::as_aws(kind, account).await;
    let users: Vec<String> = (0..48).map(|i| format!("u{i:02}")).collect();
    for user in &users {
        stack.connect(user, "acme", user, "general").await;
    }
    stack.pump().await;
    stack.clock.advance(Age::seconds(3600));
    for user in &users {
        stack.recorder.mark_gone(user);
    }
    stack.recorder.account().reset();
    let admin = admin_for(&stack).await;
    let report = admin.sweep(Duration::from_secs(600)).await.unwrap();
    assert_eq!((report.checked, report.cleaned, report.shards), (48, 48, 16), "{report:?}");
    let peak = stack.recorder.account().peak_in_flight();
    assert!(
        (2..=roomcast::admin::SWEEP_PROBES).contains(&peak),
        "probes in flight at once: {peak} (one at a time before; at most SWEEP_PROBES)"
    );
}

/// A shard whose reads keep failing (here: one room's memberships, in the presence shard that
/// holds the room) is logged, counted and passed over: every other shard is swept, and the run
/// still gives the lease back with where the next one starts. A stale connection that API
/// Gateway says is open is marked seen, so the next run does not ask about it again.
async fn a_failing_shard_holds_up_no_other_and_an_open_connection_is_asked_about_once(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "sick").await; // open at API Gateway
    let gone: Vec<String> = (0..32).map(|i| format!("c{i:02}")).collect();
    for id in &gone {
        stack.connect(id, "acme", id, "lobby").await;
    }
    stack.pump().await;
    stack.clock.advance(Age::seconds(3600));
    for id in &gone {
        stack.recorder.mark_gone(id);
    }
    let failing = roomcast_tests::UnavailableRoom {
        inner: stack.table.store.clone(),
        room: "sick".into(),
        times: std::sync::atomic::AtomicUsize::new(1000),
    };
    let admin = Admin { store: Arc::new(failing).table(), ..stack.admin().await };
    let report = admin.sweep(Duration::from_secs(600)).await.unwrap();
    assert_eq!((report.shards, report.failed_shards), (16, 1), "{report:?}");
    assert_eq!((report.checked, report.cleaned, report.still_open), (33, 32, 1), "{report:?}");
    // The run gave the lease back: the next takes it at once.
    let now = roomcast::model::Clock::now(stack.clock.as_ref()).timestamp();
    assert!(stack.table.store.take_sweep_lease(now, now + 10, "next").await.unwrap().is_some());
    assert!(stack.table.store.sweep_progress("next", 0, true).await.unwrap());
    // ann was marked seen: the next run has nothing to ask API Gateway.
    let again = stack.admin().await.sweep(Duration::from_secs(600)).await.unwrap();
    assert_eq!((again.checked, again.failed_shards), (0, 0), "{again:?}");
}

async fn cleanup_deletes_only_confirmed_stale_connections_and_presence_follows(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await; // silent, and gone at API Gateway
    stack.connect("cid", "acme", "cid", "general").await; // silent, but still open
    stack.pump().await;
    stack.clock.advance(Age::seconds(301)); // silent past the idle limit asked for, TTL not yet passed
    stack.connect("bob", "acme", "bob", "general").await; // recent
    stack.pump().await;
    stack.recorder.clear();
    stack.recorder.mark_gone("ann");

    let admin = admin_for(&stack).await;
    let answer = admin.handle(&json!({"action": "cleanup_stale_connections", "idleSeconds": 300})).await;
    assert_eq!(
        answer,
        json!({"statusCode": 200, "body": {"message": "Stale connections cleaned up", "cleanedCount": 1, "presenceRepaired": 0,
            "checked": 2, "stillOpen": 1, "unknown": 0, "skipped": false, "shards": 16, "failedShards": 0}})
    );
    let mut probed = stack.recorder.probed();
    probed.sort();
    assert_eq!(probed, ["ann", "cid"], "only stale records are checked");
    use roomcast::model::Clock;
    let now = stack.clock.now();
    assert!(stack.table.store.get_connection("ann", now).await.unwrap().is_none());
    assert!(stack.table.store.get_connection("cid", now).await.unwrap().is_some());

    stack.pump().await;
    assert_eq!(
        stack.recorder.presence("bob"),
        vec![json!({"action":"presence","room":"general","user_id":"ann","event":"left","reason":"gone","users":2})]
    );
}

async fn the_sweeper_expires_presence_although_ttl_has_not_deleted_the_record(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.pump().await;
    stack.clock.advance(Age::seconds(599));
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    stack.clock.advance(Age::seconds(2)); // Ann's TTL (600 s) has passed; nothing deleted her record
    stack.recorder.clear();
    stack.recorder.mark_gone("ann");

    let admin = admin_for(&stack).await;
    let report = admin.sweep(Duration::from_secs(3600)).await.unwrap();
    assert_eq!((report.checked, report.cleaned), (1, 1), "{report:?}");
    stack.pump().await;
    assert_eq!(
        stack.recorder.presence("bob"),
        vec![json!({"action":"presence","room":"general","user_id":"ann","event":"left","reason":"expired","users":1})]
    );
}
