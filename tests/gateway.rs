//! `roomcast dev` end to end with real WebSocket clients on loopback, on the embedded store and
//! on moto: the gateway emulator runs the real authorizer rule and handlers, the store's stream
//! feeds the real processor, and the processor's real SDK client posts to the emulator's
//! `@connections` API.

use std::time::Duration;

use roomcast::gateway::Fault;
use roomcast_tests::ws::{self, connect, try_connect};
use serde_json::{Value, json};

roomcast_tests::on_both_stores!(multi_thread:
    welcome_pong_and_info,
    a_room_broadcast_reaches_members_only_and_tenants_are_isolated,
    presence_is_once_per_user_across_two_connections,
    history_comes_back_as_the_route_response,
    bad_frames_get_errors_and_an_oversize_frame_closes_with_1009,
    bad_tokens_are_refused_at_the_upgrade,
    the_idle_timeout_closes_the_connection_and_announces_left,
    injected_410_429_500_and_stalls_are_handled,
    a_tenant_plugin_that_sleeps_forever_never_stops_other_tenants,
    hostile_plugins_in_roomcast_dev_fault_within_their_limits,
    a_room_that_keeps_its_latest_message_gives_it_to_each_joiner_first,
    webhooks_tell_a_tenants_backend_in_order_and_a_hung_endpoint_holds_up_no_other_tenant,
    undeliverable_webhooks_become_dead_letters_that_an_operator_can_redrive,
    a_connection_refreshes_its_token_in_place_and_an_expired_one_may_only_refresh,
    a_backend_disconnects_a_user_everywhere_and_keeps_them_out_for_a_while,
    a_backend_puts_a_users_connections_into_a_room_under_the_rules_of_a_join_and_takes_them_out,
    a_backend_sends_to_every_connection_of_a_user_in_any_room_or_none,
);

/// Polls the table until `connection_id` is no longer a member of acme's `general` room.
async fn wait_until_not_a_member(stack: &roomcast::dev::DevStack, connection_id: &str) {
    for _ in 0..200 {
        let members = stack.store.room_members("acme", "general", chrono::Utc::now()).await.unwrap();
        if members.iter().all(|m| m.connection_id != connection_id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{connection_id} was still a member of acme/general after 10 s");
}

fn presence(user: &str, event: &str) -> impl Fn(&Value) -> bool {
    let (user, event) = (user.to_string(), event.to_string());
    move |f| f["action"] == "presence" && f["user_id"] == user.as_str() && f["event"] == event.as_str()
}

async fn welcome_pong_and_info(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let mut ann = connect(&stack, "acme", "ann", "general,ops").await;
    let welcome = ann.expect_action("welcome").await;
    assert_eq!(welcome["tenant"], "acme");
    assert_eq!(welcome["user_id"], "ann");
    assert_eq!(welcome["rooms"], json!(["general", "ops"]));
    let id = welcome["connection_id"].as_str().unwrap().to_string();
    assert!(id.ends_with('='), "API Gateway-style id: {id}");

    assert_eq!(ann.ask(json!({"action":"ping"}), "pong").await, json!({"action":"pong"}));
    assert_eq!(ann.ask(json!({"type":"ping"}), "pong").await, json!({"action":"pong"}));
    let info = ann.ask(json!({"action":"info"}), "info").await;
    assert_eq!(info["connection_id"], id.as_str());
    assert_eq!(info["rooms"], json!(["general", "ops"]));
    stack.shutdown().await;
}

async fn a_room_broadcast_reaches_members_only_and_tenants_are_isolated(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    let mut cid = connect(&stack, "acme", "cid", "random").await;
    let mut eve = connect(&stack, "globex", "eve", "general").await;
    for c in [&mut ann, &mut bob, &mut cid, &mut eve] {
        c.expect_action("welcome").await;
    }
    let ack = ann.ask(json!({"action":"sendMessage","room":"general","message":"hello"}), "ack").await;
    let id = ack["id"].as_str().unwrap().to_string();
    for c in [&mut ann, &mut bob] {
        let m = c.expect("the message", |f| f["action"] == "message").await;
        assert_eq!(
            (m["id"].as_str(), m["message"].as_str(), m["user_id"].as_str()),
            (Some(id.as_str()), Some("hello"), Some("ann"))
        );
    }
    // Negative checks wait for a marker written after the message was delivered: a record the
    // processor handles later, so anything the message would have sent them is there before it.
    cid.ask(json!({"action":"sendMessage","room":"random","message":"cid's marker"}), "ack").await;
    cid.expect_before("her own marker", |f| f["message"] == "cid's marker", |f| f["message"] == "hello").await;
    // Eve's own room of the same name works, and stays hers.
    eve.ask(json!({"action":"sendMessage","room":"general","message":"globex only"}), "ack").await;
    eve.expect_before("her own message", |f| f["message"] == "globex only", |f| f["message"] == "hello").await;
    ann.ask(json!({"action":"sendMessage","room":"general","message":"ann's marker"}), "ack").await;
    ann.expect_before("her own marker", |f| f["message"] == "ann's marker", |f| f["message"] == "globex only").await;
    stack.shutdown().await;
}

async fn presence_is_once_per_user_across_two_connections(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    bob.expect_action("welcome").await;
    let mut ann1 = connect(&stack, "acme", "ann", "general").await;
    ann1.expect_action("welcome").await;
    bob.expect("ann joined", presence("ann", "joined")).await;
    let mut ann2 = connect(&stack, "acme", "ann", "general").await;
    ann2.expect_action("welcome").await;
    // A marker after Ann's second tab: once Bob has it, any second `joined` would be there too.
    let mut cid = connect(&stack, "acme", "cid", "general").await;
    cid.expect_action("welcome").await;
    bob.expect_before("cid joined", presence("cid", "joined"), presence("ann", "joined")).await;

    // Ann closes one tab. Once the processor has removed that tab's membership, a message in
    // the room is a later record of the same partition: no `left` for Ann may come before it.
    let first_tab = ann1.ask(json!({"action":"info"}), "info").await["connection_id"].as_str().unwrap().to_string();
    ann1.close().await;
    wait_until_not_a_member(&stack, &first_tab).await;
    cid.ask(json!({"action":"sendMessage","room":"general","message":"marker"}), "ack").await;
    bob.expect_before("cid's marker", |f| f["message"] == "marker", presence("ann", "left")).await;
    ann2.close().await;
    let left = bob.expect("ann left", presence("ann", "left")).await;
    assert_eq!(left["reason"], "disconnect");
    stack.shutdown().await;
}

async fn history_comes_back_as_the_route_response(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    for text in ["first", "second"] {
        ann.ask(json!({"action":"sendMessage","room":"general","message":text}), "ack").await;
    }
    let history = ann.ask(json!({"action":"history","room":"general"}), "history").await;
    let texts: Vec<&str> =
        history["messages"].as_array().unwrap().iter().map(|m| m["message"].as_str().unwrap()).collect();
    assert_eq!(texts, ["first", "second"]);
    stack.shutdown().await;
}

async fn bad_frames_get_errors_and_an_oversize_frame_closes_with_1009(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    ann.expect_action("welcome").await;
    ann.send_text("this is not json".into()).await;
    assert_eq!(ann.expect_action("error").await["code"], "invalid_json");
    ann.send(json!({"action":"dance"})).await;
    assert_eq!(ann.expect_action("error").await["code"], "unknown_action");
    ann.send(json!({"action":"sendMessage","room":"secret","message":"x"})).await;
    assert_eq!(ann.expect_action("error").await["code"], "not_member");
    // The connection survives errors...
    ann.ask(json!({"action":"ping"}), "pong").await;
    // ...but not a frame over API Gateway's 128 KB limit.
    ann.send(json!({"action":"sendMessage","room":"general","message":"x".repeat(130 * 1024)})).await;
    let (code, _) = ann.expect_close(Duration::from_secs(10)).await;
    assert_eq!(code, 1009);
    stack.shutdown().await;
}

async fn bad_tokens_are_refused_at_the_upgrade(kind: &str) {
    use roomcast::auth::{Claims, mint};
    let stack = ws::dev(kind, |_| {}).await;
    let now = chrono::Utc::now().timestamp();
    let expired = mint(
        &Claims {
            tenant: "acme".into(),
            sub: "ann".into(),
            exp: now - 10,
            nbf: None,
            scope: None,
            rooms: None,
            extra: Default::default(),
        },
        ws::SECRET,
    );
    let wrongly_signed = mint(
        &Claims {
            tenant: "acme".into(),
            sub: "ann".into(),
            exp: now + 600,
            nbf: None,
            scope: None,
            rooms: None,
            extra: Default::default(),
        },
        b"not-the-secret",
    );
    let claimless = {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        // Properly signed, but with none of our claims but `exp`.
        let signed = format!("{}.{}", b64(r#"{"alg":"HS256"}"#), b64(&format!(r#"{{"exp":{}}}"#, now + 600)));
        roomcast_tests::sign_hs256(&signed, ws::SECRET)
    };
    for (what, query, status) in [
        ("no token", "rooms=general".to_string(), 401),
        ("garbage", "token=not.a.jwt".to_string(), 403),
        ("expired", format!("token={expired}"), 403),
        ("wrong signature", format!("token={wrongly_signed}"), 403),
        ("no tenant or sub claims", format!("token={claimless}"), 403),
        ("unsigned identity without --insecure-dev-auth", "tenant=acme&user_id=ann".to_string(), 401),
    ] {
        assert_eq!(try_connect(&stack, &query).await.err(), Some(status), "{what}");
    }
    assert_eq!(stack.gateway.connection_count(), 0);
    // A good token in a header: API Gateway never reads it (its authorizer's identity source is
    // the query string), so neither does the local gateway.
    let good = ws::token("acme", "ann");
    let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "{}?rooms=general",
        stack.ws_url()
    ))
    .unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {good}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("?token="), "the refusal says where the token goes: {body:?}");
        }
        other => panic!("a header token must be refused: {:?}", other.map(|_| "connected")),
    }
    let in_the_query = try_connect(&stack, &format!("token={good}&rooms=general")).await;
    assert!(in_the_query.is_ok(), "the same token in the query string is accepted");
    stack.shutdown().await;
}

async fn the_idle_timeout_closes_the_connection_and_announces_left(kind: &str) {
    // API Gateway's 10-minute idle timeout, on the stack's clock: the test moves it.
    let clock = roomcast::model::ManualClock::at(chrono::Utc::now());
    let stack = ws::dev(kind, |o| {
        o.limits.idle_timeout = Duration::from_secs(600);
        o.clock = clock.clone();
    })
    .await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    ann.expect_action("welcome").await;
    bob.expect_action("welcome").await;
    // Five minutes on, Bob says something; Ann says nothing. Six more: Ann has been idle for
    // eleven minutes and is closed like API Gateway does (1001); Bob for six, and stays.
    clock.advance(chrono::Duration::minutes(5));
    bob.ask(json!({"action":"ping"}), "pong").await;
    clock.advance(chrono::Duration::minutes(6));
    let closed = ann.expect_close(Duration::from_secs(10)).await;
    assert_eq!(closed.0, 1001, "{closed:?}");
    assert!(closed.1.contains("idle timeout"), "{closed:?}");
    let left = bob.expect("ann left", presence("ann", "left")).await;
    assert_eq!(left["reason"], "disconnect");
    bob.ask(json!({"action":"ping"}), "pong").await;
    stack.shutdown().await;
}

async fn injected_410_429_500_and_stalls_are_handled(kind: &str) {
    // The records' clock is the test's: Bob grows old by advancing it, not by waiting.
    let clock = roomcast::model::ManualClock::at(chrono::Utc::now());
    let stack = ws::dev(kind, |o| {
        o.delivery.young_connection = Duration::from_millis(1500);
        o.delivery.call_timeout = Duration::from_millis(300);
        o.clock = clock.clone();
    })
    .await;
    let faults = stack.gateway.faults();
    // A young connection's 410 is retried: the welcome arrives.
    faults.inject(None, Fault::Status(410), 2);
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    ann.expect_action("welcome").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    bob.expect_action("welcome").await;

    // 429, 500 and a stalled call are retried: the message arrives.
    for fault in [Fault::Status(429), Fault::Status(500), Fault::Stall(Duration::from_secs(2))] {
        faults.inject(None, fault, 1);
        ann.ask(json!({"action":"sendMessage","room":"general","message":format!("{fault:?}")}), "ack").await;
        let expected = format!("{fault:?}");
        bob.expect("the message despite the fault", |f| f["message"] == expected.as_str()).await;
        ann.expect("the message despite the fault", |f| f["message"] == expected.as_str()).await;
    }

    // Once Bob is no longer young, a 410 means he is gone: his record is deleted and Ann is told.
    clock.advance(chrono::Duration::milliseconds(1600));
    let bob_id = bob.ask(json!({"action":"info"}), "info").await["connection_id"].as_str().unwrap().to_string();
    faults.inject(Some(&bob_id), Fault::Status(410), 1);
    ann.ask(json!({"action":"sendMessage","room":"general","message":"still there?"}), "ack").await;
    let left = ann.expect("bob left", presence("bob", "left")).await;
    assert_eq!(left["reason"], "gone");
    assert_eq!(bob.ask(json!({"action":"ping"}), "error").await["code"], "not_connected");
    let counts = stack.metrics.snapshot();
    assert!(counts.retried >= 5, "{counts:?}");
    assert_eq!(counts.gone, 1);
    stack.shutdown().await;
}

/// Only the embedded store runs TTL (moto does not): Ann's TTL passes on the stack's clock, and
/// Bob, who pinged in between (refreshing his), is told she left with reason `expired`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_expiry_announces_left_with_reason_expired() {
    let clock = roomcast::model::ManualClock::at(chrono::Utc::now());
    let stack = ws::dev("memory", |o| {
        o.connection_ttl_seconds = 3600;
        o.ttl_sweep_every = Duration::from_millis(50);
        // Past API Gateway's idle timeout here: only the TTL is under test.
        o.limits.idle_timeout = Duration::from_secs(3 * 3600);
        o.clock = clock.clone();
    })
    .await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    ann.expect_action("welcome").await;
    bob.expect_action("welcome").await;
    clock.advance(chrono::Duration::minutes(40));
    bob.ask(json!({"action":"ping"}), "pong").await;
    // Ann's hour is up; Bob's, refreshed at minute 40, is not.
    clock.advance(chrono::Duration::minutes(25));
    let left = bob.expect("ann's TTL expiry", presence("ann", "left")).await;
    assert_eq!(left["reason"], "expired");
    bob.ask(json!({"action":"ping"}), "pong").await;
    stack.shutdown().await;
}

/// The management API as the real `aws-sdk-apigatewaymanagement` client sees it: GET describes a
/// connection, POST over 128 KB is `PayloadTooLargeException`, an unknown id is
/// `GoneException`, DELETE closes the socket (then `$disconnect` and presence follow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_answers_like_api_gateway() {
    use aws_sdk_apigatewaymanagement::primitives::Blob;
    let stack = ws::dev("memory", |_| {}).await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    let ann_id = ann.expect_action("welcome").await["connection_id"].as_str().unwrap().to_string();
    bob.expect_action("welcome").await;

    let config = aws_sdk_apigatewaymanagement::config::Builder::from(&roomcast_tests::sdk_config().await)
        .endpoint_url(format!("http://{}/local", stack.addr))
        .build();
    let client = aws_sdk_apigatewaymanagement::Client::from_conf(config);

    let described = client.get_connection().connection_id(&ann_id).send().await.expect("GET @connections");
    assert!(described.connected_at().is_some());
    assert_eq!(described.identity().and_then(|i| i.source_ip()), Some("127.0.0.1"));

    client.post_to_connection().connection_id(&ann_id).data(Blob::new(r#"{"action":"hello"}"#)).send().await.unwrap();
    ann.expect_action("hello").await;

    let too_big =
        client.post_to_connection().connection_id(&ann_id).data(Blob::new(vec![b'x'; 129 * 1024])).send().await;
    assert!(too_big.unwrap_err().into_service_error().is_payload_too_large_exception());
    let unknown = client.post_to_connection().connection_id("nobody=").data(Blob::new("x")).send().await;
    assert!(unknown.unwrap_err().into_service_error().is_gone_exception());
    let unknown = client.get_connection().connection_id("nobody=").send().await;
    assert!(unknown.unwrap_err().into_service_error().is_gone_exception());

    client.delete_connection().connection_id(&ann_id).send().await.expect("DELETE @connections");
    assert_eq!(ann.expect_close(Duration::from_secs(10)).await.0, 1000);
    assert_eq!(bob.expect("ann left", presence("ann", "left")).await["reason"], "disconnect");
    stack.shutdown().await;
}

/// `roomcast dev --management-latency 30ms --management-quota …`: every `@connections` call is
/// answered after the latency, and past the account's quota with `429 LimitExceededException`,
/// as the real SDK client sees it; the frames admitted arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_answers_after_its_latency_and_within_the_account_quota() {
    use aws_sdk_apigatewaymanagement::primitives::Blob;
    use roomcast::gateway::account::AccountSettings;
    let latency = Duration::from_millis(30);
    let account = AccountSettings { latency, jitter: Duration::from_millis(10), quota: Some(10_000.0), burst: 5_000.0 };
    let stack = ws::dev("memory", |o| o.limits.account = account).await;
    let mut ann = connect(&stack, "acme", "ann", "").await;
    let ann_id = ann.expect_action("welcome").await["connection_id"].as_str().unwrap().to_string();
    // Three calls' worth of quota left, refilled at one every 20 seconds.
    stack.gateway.account().set_quota(Some(0.05), 3.0);
    let before = stack.gateway.account().throttled();
    let config = aws_sdk_apigatewaymanagement::config::Builder::from(&roomcast_tests::sdk_config().await)
        .endpoint_url(format!("http://{}/local", stack.addr))
        .retry_config(aws_sdk_apigatewaymanagement::config::retry::RetryConfig::disabled())
        .build();
    let client = aws_sdk_apigatewaymanagement::Client::from_conf(config);
    let mut answers = Vec::new();
    for i in 0..6 {
        let started = std::time::Instant::now();
        let frame = Blob::new(json!({"action": "numbered", "n": i}).to_string());
        let answer = client.post_to_connection().connection_id(&ann_id).data(frame).send().await;
        assert!(started.elapsed() >= latency, "call {i} answered in {:?}", started.elapsed());
        answers.push(answer.map_err(|e| e.into_service_error()));
    }
    // The quota's calls first (any other call of the stack may have taken one), then 429s.
    let admitted = answers.iter().take_while(|a| a.is_ok()).count();
    assert!((1..=3).contains(&admitted), "{answers:?}");
    for answer in &answers[admitted..] {
        assert!(answer.as_ref().unwrap_err().is_limit_exceeded_exception(), "{answer:?}");
    }
    for i in 0..admitted {
        assert_eq!(ann.expect_action("numbered").await["n"], i);
    }
    assert!(stack.gateway.account().throttled() - before >= (6 - admitted) as u64);
    stack.shutdown().await;
}

/// A client that does not read fills its send buffer; then `@connections` answers 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_send_buffer_answers_429() {
    use aws_sdk_apigatewaymanagement::primitives::Blob;
    let stack = ws::dev("memory", |o| o.limits.send_buffer = 4).await;
    let mut ann = connect(&stack, "acme", "ann", "").await;
    let ann_id = ann.expect_action("welcome").await["connection_id"].as_str().unwrap().to_string();
    let config = aws_sdk_apigatewaymanagement::config::Builder::from(&roomcast_tests::sdk_config().await)
        .endpoint_url(format!("http://{}/local", stack.addr))
        .retry_config(aws_sdk_apigatewaymanagement::config::retry::RetryConfig::disabled())
        .build();
    let client = aws_sdk_apigatewaymanagement::Client::from_conf(config);
    // Ann never reads: large frames fill the socket, then the buffer of 4.
    let frame = Blob::new(vec![b'x'; 120 * 1024]);
    let mut throttled = false;
    for _ in 0..400 {
        match client.post_to_connection().connection_id(&ann_id).data(frame.clone()).send().await {
            Ok(_) => continue,
            Err(e) => {
                assert!(e.into_service_error().is_limit_exceeded_exception());
                throttled = true;
                break;
            }
        }
    }
    assert!(throttled, "400 frames of 120 KB never filled a buffer of 4");
    stack.shutdown().await;
}

/// API Gateway's two-hour limit, on the stack's clock: the connection is closed with 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_maximum_connection_duration_closes_even_a_busy_connection() {
    // API Gateway's two-hour maximum, on the stack's clock: Ann is never idle for ten minutes,
    // and is closed anyway once two hours have passed.
    let clock = roomcast::model::ManualClock::at(chrono::Utc::now());
    let stack = ws::dev("memory", |o| {
        o.limits.max_connection = Duration::from_secs(2 * 3600);
        o.limits.idle_timeout = Duration::from_secs(600);
        o.clock = clock.clone();
    })
    .await;
    let mut ann = connect(&stack, "acme", "ann", "").await;
    ann.expect_action("welcome").await;
    for _ in 0..23 {
        clock.advance(chrono::Duration::minutes(5));
        ann.ask(json!({"action":"ping"}), "pong").await;
    }
    clock.advance(chrono::Duration::minutes(5));
    let (code, reason) = ann.expect_close(Duration::from_secs(10)).await;
    assert_eq!(code, 1001);
    assert!(reason.contains("maximum connection duration"), "{reason}");
    stack.shutdown().await;
}

/// `--insecure-dev-auth` takes `?tenant=&user_id=` unsigned (and still takes real tokens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_dev_auth_accepts_an_unsigned_identity() {
    let stack =
        ws::dev("memory", |o| o.auth = roomcast::gateway::AuthMode::InsecureDev { secret: ws::SECRET.to_vec() }).await;
    let mut ann = try_connect(&stack, "tenant=acme&user_id=ann&rooms=general").await.expect("accepted unsigned");
    let welcome = ann.expect_action("welcome").await;
    assert_eq!((welcome["tenant"].as_str(), welcome["user_id"].as_str()), (Some("acme"), Some("ann")));
    assert!(try_connect(&stack, &format!("token={}", ws::token("acme", "bob"))).await.is_ok());
    assert_eq!(try_connect(&stack, "token=bad.bad.bad").await.err(), Some(403), "a bad token is still refused");
    stack.shutdown().await;
}

/// `--stream-log FILE`: every record processed, one JSON line each, in DynamoDB's format.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_log_records_every_processed_record_as_json_lines() {
    let path = std::env::temp_dir().join(format!("roomcast-stream-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let log_path = path.clone();
    let stack = ws::dev("memory", move |o| o.stream_log = Some(log_path)).await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    ann.expect_action("welcome").await;
    ann.ask(json!({"action":"sendMessage","room":"general","message":"logged"}), "ack").await;
    ann.expect_action("message").await;
    // Records are logged before they are processed: the message's delivery means all three are in.
    let text = std::fs::read_to_string(&path).unwrap();
    stack.shutdown().await;

    let records: Vec<aws_lambda_events::dynamodb::EventRecord> =
        text.lines().map(|l| serde_json::from_str(l).expect("each line is a stream record")).collect();
    // The presence state the processor writes is in the stream too; the handlers' records are these.
    let records: Vec<_> = records
        .into_iter()
        .filter(|r| {
            !matches!(
                roomcast::stream::Change::from_record(r),
                roomcast::stream::Change::Inserted(roomcast::stream::Record::State { .. })
                    | roomcast::stream::Change::Modified { new: roomcast::stream::Record::State { .. }, .. }
            )
        })
        .collect();
    let names: Vec<&str> = records.iter().map(|r| r.event_name.as_str()).collect();
    assert_eq!(names, ["INSERT", "INSERT", "INSERT"], "connection, membership, message");
    assert!(records.iter().all(|r| r.change.sequence_number.is_some()));
    assert!(matches!(
        roomcast::stream::Change::from_record(&records[2]),
        roomcast::stream::Change::Inserted(roomcast::stream::Record::Message(m)) if m.body == "logged"
    ));
    let _ = std::fs::remove_file(&path);
}

/// `roomcast dev --plugins DIR` with a hostile tenant whose plugin sleeps without end: its call
/// ends at the deadline (fail-open: the message is delivered by the default rules), and the
/// other tenant's messages keep flowing, before and after.
async fn a_tenant_plugin_that_sleeps_forever_never_stops_other_tenants(kind: &str) {
    let dir = std::env::temp_dir().join(format!("roomcast-dev-plugins-{}-{kind}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lax.wasm"), roomcast_tests::component("roomcast-hostile-plugin")).unwrap();
    let stack = ws::dev(kind, |o| o.plugins = Some(dir.clone())).await;
    let mut lou = connect(&stack, "lax", "lou", "general").await;
    lou.expect_action("welcome").await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    ann.expect_action("welcome").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    bob.expect_action("welcome").await;

    lou.ask(json!({"action":"sendMessage","room":"general","message":"sleep-forever"}), "ack").await;
    for text in ["after the sleeper", "and again"] {
        ann.ask(json!({"action":"sendMessage","room":"general","message":text}), "ack").await;
        bob.expect(text, |f| f["message"] == text).await;
    }
    lou.expect("the sleeper's own message, once its call ended", |f| f["message"] == "sleep-forever").await;
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// `roomcast dev --plugins DIR` with the hostile plugin (tenant `lax`) and a plugin whose core
/// modules together hold more memory than its cap (tenant `hog`), both fail-open, beside a
/// tenant without a plugin: every fault is the plugin's and is counted, the failure policy keeps
/// each message within its room, random numbers come from the record, and the other tenant's
/// messages keep flowing.
async fn hostile_plugins_in_roomcast_dev_fault_within_their_limits(kind: &str) {
    let dir = std::env::temp_dir().join(format!("roomcast-dev-hostile-{}-{kind}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lax.wasm"), roomcast_tests::component("roomcast-hostile-plugin")).unwrap();
    std::fs::write(dir.join("hog.wasm"), roomcast_tests::memories_component(8, 192)).unwrap();
    let stack = ws::dev(kind, |o| o.plugins = Some(dir.clone())).await;
    let mut lou = connect(&stack, "lax", "lou", "general").await;
    let mut liz = connect(&stack, "lax", "liz", "general").await;
    let mut eve = connect(&stack, "lax", "eve", "room0").await;
    let mut hal = connect(&stack, "hog", "hal", "general").await;
    let mut hil = connect(&stack, "hog", "hil", "general").await;
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    for c in [&mut lou, &mut liz, &mut eve, &mut hal, &mut hil, &mut ann, &mut bob] {
        c.expect_action("welcome").await;
    }
    let before = stack.metrics.snapshot();

    // Memories that together pass the cap: the instance is refused; fail-open, the room gets it.
    hal.ask(json!({"action":"sendMessage","room":"general","message":"hi"}), "ack").await;
    hil.expect("hog's message by the default rules", |f| f["message"] == "hi").await;
    // Routing too wide, and a route that traps: faults; fail-open keeps each in its room.
    for body in ["route-wide", "route-trap"] {
        lou.ask(json!({"action":"sendMessage","room":"general","message":body}), "ack").await;
        liz.expect(body, |f| f["message"] == body).await;
    }
    // The room0 member hears none of it: her own later message comes first.
    eve.ask(json!({"action":"sendMessage","room":"room0","message":"marker"}), "ack").await;
    eve.expect("her own marker", |f| f["message"] == "marker").await;
    assert!(eve.pending_match(|f| f["action"] == "message").is_none(), "a route widened the audience");
    let faults = stack.metrics.snapshot().plugin_faults - before.plugin_faults;
    assert_eq!(faults, 3, "memory, too wide, trap");

    // Plugins 0.2's routing under attack: a room named over and over (and the message's own
    // room among the repeats) reaches its members once; other tenants' rooms as the table keys
    // them reach no one, and acme's own `side` nothing of lax's.
    let mut sid = connect(&stack, "lax", "sid", "side").await;
    let mut cal = connect(&stack, "acme", "cal", "side").await;
    let mut gus = connect(&stack, "globex", "gus", "side").await;
    for c in [&mut sid, &mut cal, &mut gus] {
        c.expect_action("welcome").await;
    }
    for body in ["route-repeats", "route-foreign"] {
        lou.ask(json!({"action":"sendMessage","room":"general","message":body}), "ack").await;
        liz.expect(body, |f| f["message"] == body).await;
    }
    sid.expect("the repeated route, once", |f| f["message"] == "route-repeats").await;
    sid.ask(json!({"action":"sendMessage","room":"side","message":"sid's marker"}), "ack").await;
    sid.expect_before(
        "sid's marker",
        |f| f["message"] == "sid's marker",
        |f| f["action"] == "message" && f["user_id"] == "lou",
    )
    .await;
    cal.ask(json!({"action":"sendMessage","room":"side","message":"cal's marker"}), "ack").await;
    cal.expect_before(
        "cal's marker",
        |f| f["message"] == "cal's marker",
        |f| f["action"] == "message" && f["user_id"] == "lou",
    )
    .await;
    // Globex's `side`, which `route-foreign` names as the table keys it: nothing of lax's.
    gus.ask(json!({"action":"sendMessage","room":"side","message":"gus's marker"}), "ack").await;
    gus.expect_before(
        "gus's marker",
        |f| f["message"] == "gus's marker",
        |f| f["action"] == "message" && f["user_id"] == "lou",
    )
    .await;

    // Random numbers and hash order come from the record: what arrived is what this record
    // decides on its own, as a replay of it would.
    lou.ask(json!({"action":"sendMessage","room":"general","message":"random"}), "ack").await;
    let got = liz.expect("the random rewrite", |f| f["action"] == "message" && f["user_id"] == "lou").await;
    let alone = roomcast::plugins::Message {
        id: got["id"].as_str().unwrap().into(),
        tenant: "lax".into(),
        room: "general".into(),
        user_id: "lou".into(),
        body: "random".into(),
        timestamp: got["timestamp"].as_str().unwrap().into(),
    };
    let at = chrono::DateTime::parse_from_rfc3339(got["timestamp"].as_str().unwrap()).unwrap().timestamp_millis();
    let decided = tokio::task::spawn_blocking(move || {
        let host = roomcast::plugins::PluginHost::new().unwrap();
        let limits = roomcast::plugins::Limits::default();
        let plugin = host.compile(&roomcast_tests::component("roomcast-hostile-plugin"), &limits).unwrap();
        host.message(&plugin, &limits, &alone, at as u64).outcome.0.map(|(verdict, _)| verdict)
    })
    .await
    .unwrap();
    assert_eq!(decided, Ok(roomcast::plugins::Verdict::Rewrite(got["message"].as_str().unwrap().into())));

    // A user with a long id sending the largest frames cannot trip the plugin's breaker: what
    // would not fit the recipients' frame (and so the plugin's input) is refused when sent.
    let long_id = "u".repeat(roomcast::model::Name::MAX_LEN);
    let mut max = connect(&stack, "lax", &long_id, "general").await;
    max.expect_action("welcome").await;
    let frame_of = |body: String| json!({"action":"sendMessage","room":"general","message":body}).to_string();
    let largest = frame_of("x".repeat(roomcast::protocol::MAX_FRAME_BYTES - frame_of(String::new()).len()));
    let before = stack.metrics.snapshot();
    for _ in 0..roomcast::plugins::registry::BREAKER_THRESHOLD + 1 {
        max.send_text(largest.clone()).await;
        let refused = max.expect_action("error").await;
        assert_eq!(refused["code"], "message_too_large", "{refused:.200}");
    }
    lou.ask(json!({"action":"sendMessage","room":"general","message":"route-to-bob"}), "ack").await;
    lou.ask(json!({"action":"sendMessage","room":"general","message":"decided"}), "ack").await;
    liz.expect("lax's next message", |f| f["message"] == "decided").await;
    assert!(liz.pending_match(|f| f["message"] == "route-to-bob").is_none(), "the plugin narrowed it to bob");
    let since = stack.metrics.snapshot();
    assert_eq!(since.plugin_faults - before.plugin_faults, 0);
    assert_eq!(since.plugin_breaker_skips - before.plugin_breaker_skips, 0, "the breaker stayed shut");

    // The tenant without a plugin was never held up.
    ann.ask(json!({"action":"sendMessage","room":"general","message":"still flowing"}), "ack").await;
    bob.expect("acme's message", |f| f["message"] == "still flowing").await;
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

/// A tenant's rooms that keep their latest message (`roomcast tenant set --latest-on-join`): a
/// join, by frame or at connect, gets the room's newest message before anything else the room
/// says; other rooms give nothing on join; `recover` from it finds nothing missed.
async fn a_room_that_keeps_its_latest_message_gives_it_to_each_joiner_first(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let settings = roomcast::model::TenantSettings {
        latest_on_join: vec!["score-*".into()],
        ..roomcast::model::TenantSettings::new("acme")
    };
    stack.store.put_tenant_settings(&settings).await.unwrap();
    let mut ann = connect(&stack, "acme", "ann", "score-1,general").await;
    ann.expect_action("welcome").await;
    let mut sent = Vec::new();
    for text in ["1-0", "2-0"] {
        let ack = ann.ask(json!({"action":"sendMessage","room":"score-1","message":text}), "ack").await;
        sent.push(ack["id"].as_str().unwrap().to_string());
    }
    let latest = sent[1].clone();
    ann.ask(json!({"action":"sendMessage","room":"general","message":"said before"}), "ack").await;

    // By a join frame: the room's latest, to the joiner.
    let mut bob = connect(&stack, "acme", "bob", "lobby").await;
    bob.expect_action("welcome").await;
    bob.ask(json!({"action":"join","room":"score-1"}), "ack").await;
    let first = bob.expect("score-1's latest message", |f| f["action"] == "message").await;
    assert_eq!(
        (first["id"].as_str(), first["room"].as_str(), first["message"].as_str()),
        (Some(latest.as_str()), Some("score-1"), Some("2-0"))
    );
    // A room that keeps nothing: the first message Bob gets there is one said after he joined.
    bob.ask(json!({"action":"join","room":"general"}), "ack").await;
    ann.ask(json!({"action":"sendMessage","room":"general","message":"marker"}), "ack").await;
    bob.expect_before("the marker", |f| f["message"] == "marker", |f| f["message"] == "said before").await;

    // At connect (`?rooms=`): the same.
    let mut cid = connect(&stack, "acme", "cid", "score-1").await;
    let first = cid.expect("score-1's latest message", |f| f["action"] == "message").await;
    assert_eq!(first["id"].as_str(), Some(latest.as_str()));
    // A message like any other: recovering from it finds nothing after it (what it gives is the
    // few seconds' margin before it, which a client already holds by id).
    let recovered = cid.ask(json!({"action":"recover","room":"score-1","since":latest}), "recover").await;
    assert_eq!(recovered["recovered"], true, "{recovered}");
    let given: Vec<&str> =
        recovered["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert!(given.iter().all(|id| *id == sent[0]), "only what came before the latest: {recovered}");
    // Another tenant's room of that name keeps nothing of acme's.
    let mut eve = connect(&stack, "globex", "eve", "score-1").await;
    eve.expect_action("welcome").await;
    eve.ask(json!({"action":"sendMessage","room":"score-1","message":"globex's own"}), "ack").await;
    eve.expect_before("her own message", |f| f["message"] == "globex's own", |f| f["message"] == "2-0").await;
    stack.shutdown().await;
}

/// One request to the dev stack's HTTP API: its status and JSON body.
async fn dev_api(stack: &roomcast::dev::DevStack, method: &str, path: &str, body: Value) -> (u16, Value) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<axum::body::Bytes>>();
    let request = axum::http::Request::builder()
        .method(method)
        .uri(format!("http://{}{path}", stack.addr))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(axum::body::Bytes::from(body.to_string())))
        .unwrap();
    let answer = client.request(request).await.unwrap();
    let status = answer.status().as_u16();
    let bytes = answer.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn webhook(tenant: &str, url: String, secret: &str) -> roomcast::model::TenantSettings {
    roomcast::model::TenantSettings {
        webhook: Some(roomcast::model::WebhookSettings { url, secret: secret.into(), events: Vec::new() }),
        ..roomcast::model::TenantSettings::new(tenant)
    }
}

/// Webhooks (issue 26): a tenant's backend hears rooms occupied and vacated, members joined and
/// left (with the presence frames' ids) and connections opened and closed, in order, signed,
/// batched, retried after refusals; another tenant's endpoint that hangs holds none of it up.
async fn webhooks_tell_a_tenants_backend_in_order_and_a_hung_endpoint_holds_up_no_other_tenant(kind: &str) {
    use std::sync::atomic::Ordering::SeqCst;
    let (receiver, url) = roomcast_tests::WebhookReceiver::start().await;
    receiver.refuse_first.store(2, SeqCst);
    let policy = roomcast::webhook::local::RetryPolicy {
        first_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
        retry_for: Duration::from_secs(600),
        timeout: Duration::from_secs(600),
        linger: Duration::from_millis(20),
    };
    // Every stream batch twice, as Lambda may: the same events again, and no room event made up.
    let stack = ws::dev(kind, |o| {
        o.webhook_retry = policy;
        o.redeliver = true;
    })
    .await;
    stack.store.put_tenant_settings(&webhook("acme", format!("{url}/ok"), "acme-webhook-secret")).await.unwrap();
    stack.store.put_tenant_settings(&webhook("globex", format!("{url}/hang"), "globex-webhook-secret")).await.unwrap();
    // Globex's endpoint takes its first delivery and never answers while acme's go on.
    let mut eve = connect(&stack, "globex", "eve", "general").await;
    eve.expect_action("welcome").await;

    let mut ann = connect(&stack, "acme", "ann", "general").await;
    ann.expect_action("welcome").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    bob.expect_action("welcome").await;
    let joined = ann.expect("bob joined", presence("bob", "joined")).await;
    bob.close().await;
    let left = ann.expect("bob left", presence("bob", "left")).await;
    ann.close().await;

    receiver.wait_for("ok", "acme-webhook-secret", "room.vacated", "").await;
    let events = receiver.wait_for("ok", "acme-webhook-secret", "connection.closed", "ann").await;
    assert!(receiver.refused.load(SeqCst) >= 2, "the first two deliveries were refused and retried");
    assert_eq!(receiver.hanging.load(SeqCst), 1, "globex's delivery is still hanging");
    // A redelivered record's events come again with the same ids: a receiver keeps one per id.
    let mut seen = std::collections::HashSet::new();
    let events: Vec<Value> =
        events.into_iter().filter(|e| seen.insert(e["id"].as_str().unwrap().to_string())).collect();
    assert!(events.iter().all(|e| e["tenant"] == "acme"), "{events:?}");
    let in_room: Vec<(String, String)> = events
        .iter()
        .filter(|e| e["room"] == "general")
        .map(|e| (e["type"].as_str().unwrap().to_string(), e["user_id"].as_str().unwrap_or("").to_string()))
        .collect();
    let pairs = |list: &[(&str, &str)]| list.iter().map(|(k, u)| (k.to_string(), u.to_string())).collect::<Vec<_>>();
    assert_eq!(
        in_room,
        pairs(&[
            ("room.occupied", ""),
            ("member.joined", "ann"),
            ("member.joined", "bob"),
            ("member.left", "bob"),
            ("member.left", "ann"),
            ("room.vacated", "")
        ])
    );
    let by_kind = |kind: &str, user: &str| {
        events.iter().find(|e| e["type"] == kind && e["user_id"] == user).unwrap_or_else(|| panic!("{kind} {user}"))
    };
    assert_eq!(by_kind("member.joined", "bob")["id"], joined["id"], "the presence frame's id");
    assert_eq!(by_kind("member.left", "bob")["id"], left["id"]);
    assert_eq!(by_kind("member.left", "bob")["data"]["users"], 1);
    for user in ["ann", "bob"] {
        assert!(by_kind("connection.opened", user)["connection_id"].is_string());
        assert_eq!(by_kind("connection.closed", user)["data"]["reason"], "disconnect");
    }
    // Globex's endpoint answers at last: its events come once it takes them.
    receiver.release();
    stack
        .store
        .put_tenant_settings(&webhook("globex", format!("{url}/ok-too"), "globex-webhook-secret"))
        .await
        .unwrap();
    let globex = receiver.wait_for("ok-too", "globex-webhook-secret", "connection.opened", "eve").await;
    assert!(globex.iter().any(|e| e["tenant"] == "globex"));
    eve.close().await;
    stack.shutdown().await;
}

/// Webhook deliveries that keep failing past the retry budget become dead letters, kept with the
/// error; re-driven once the endpoint takes them, they are delivered.
async fn undeliverable_webhooks_become_dead_letters_that_an_operator_can_redrive(kind: &str) {
    use std::sync::atomic::Ordering::SeqCst;
    let (receiver, url) = roomcast_tests::WebhookReceiver::start().await;
    receiver.refusing.store(true, SeqCst);
    let policy = roomcast::webhook::local::RetryPolicy {
        first_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(50),
        retry_for: Duration::from_millis(300),
        timeout: Duration::from_secs(5),
        linger: Duration::from_millis(20),
    };
    let stack = ws::dev(kind, |o| o.webhook_retry = policy).await;
    // Through the dev API, as `roomcast tenant set --dev` does; a bad webhook is refused.
    let settings = |url: String, secret: &str| json!({"webhook": {"url": url, "secret": secret}});
    let (status, answer) = dev_api(&stack, "PUT", "/_dev/tenants/acme/settings", settings(url.clone(), "short")).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) =
        dev_api(&stack, "PUT", "/_dev/tenants/acme/settings", settings(format!("{url}/refuse"), "acme-webhook-secret"))
            .await;
    assert_eq!(status, 200, "{answer}");
    let mut ann = connect(&stack, "acme", "ann", "general").await;
    ann.expect_action("welcome").await;
    let mut dead = Vec::new();
    for _ in 0..200 {
        dead = stack.webhooks.dead_letters();
        let kinds: Vec<&str> = dead.iter().flat_map(|d| &d.events).map(|e| e.kind.as_str()).collect();
        if ["connection.opened", "room.occupied", "member.joined"].iter().all(|k| kinds.contains(k)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, listed) = dev_api(&stack, "GET", "/_dev/webhooks/dead", Value::Null).await;
    assert_eq!(listed.as_array().map(Vec::len), Some(dead.len()), "{listed}");
    assert_eq!(listed[0]["tenant"], "acme");
    let events: Vec<&str> = dead.iter().flat_map(|d| &d.events).map(|e| e.kind.as_str()).collect();
    assert!(events.contains(&"connection.opened") && events.contains(&"member.joined"), "{dead:?}");
    assert!(dead.iter().all(|d| d.error.contains("503") && d.attempts > 1), "{dead:?}");
    assert!(receiver.events("refuse", "acme-webhook-secret").is_empty());

    // The endpoint moves; the secret is never given out, and a change without one keeps it.
    let (_, shown) = dev_api(&stack, "GET", "/_dev/tenants/acme/settings", Value::Null).await;
    assert_eq!(shown["webhook"]["secret"], "", "{shown}");
    let moved = json!({"webhook": {"url": format!("{url}/ok-too")}});
    let (status, answer) = dev_api(&stack, "PUT", "/_dev/tenants/acme/settings", moved).await;
    assert_eq!((status, answer["webhook"]["secret"].as_str()), (200, Some("")), "{answer}");
    let (_, redriven) = dev_api(&stack, "POST", "/_dev/webhooks/redrive?tenant=acme", Value::Null).await;
    assert_eq!(redriven["events"], events.len());
    // All of them, signed with the secret set first.
    receiver.wait_for("ok-too", "acme-webhook-secret", "member.joined", "ann").await;
    for _ in 0..200 {
        if receiver.events("ok-too", "acme-webhook-secret").len() >= events.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.events("ok-too", "acme-webhook-secret").len(), events.len());
    assert!(stack.webhooks.dead_letters().is_empty());
    ann.close().await;
    stack.shutdown().await;
}

/// Token refresh (issue 26): a connection's token expires, and then the connection may only
/// `refresh` (or `ping`) until it has a new one; `refresh` with a token of its own tenant and user
/// replaces its claims and expiry in place, and a bad token, another tenant's or another user's
/// is refused and changes nothing.
async fn a_connection_refreshes_its_token_in_place_and_an_expired_one_may_only_refresh(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let query = format!("token={}&rooms=general", ws::token_for("acme", "ann", 3));
    let mut ann = try_connect(&stack, &query).await.expect("ann connects");
    ann.expect_action("welcome").await;
    let said = ann.ask(json!({"action":"sendMessage","room":"general","message":"before"}), "ack").await;
    assert!(said["id"].is_string(), "{said}");
    // Refused, and nothing changes: a token that does not verify, another tenant's, another user's.
    for (token, why) in [
        ("not-a-token".to_string(), "refused"),
        (ws::token_for("globex", "ann", 3600), "tenant"),
        (ws::token_for("acme", "bob", 3600), "acme/bob"),
    ] {
        let refused = ann.ask(json!({"action":"refresh","token":token}), "error").await;
        assert_eq!(refused["code"], "unauthorized", "{refused}");
        assert!(refused["message"].as_str().unwrap().contains(why), "{refused}");
    }
    // The connect token expires (3 s): frames are refused until a refresh (polled, not slept).
    let mut expired = Value::Null;
    for n in 0..100 {
        let probe = format!("probe-{n}");
        ann.send(json!({"action":"info","ref":probe})).await;
        let answer = ann.expect("the probe's answer", |f| f["ref"] == probe.as_str()).await;
        if answer["code"] == "token_expired" {
            expired = answer;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired["message"].as_str().unwrap_or("").contains("refresh"), "never expired: {expired}");
    let refused = ann.ask(json!({"action":"sendMessage","room":"general","message":"late"}), "error").await;
    assert_eq!(refused["code"], "token_expired");
    ann.ask(json!({"action":"ping"}), "pong").await;
    // A refresh with the same tenant and user: in place, the same connection, nothing else asked.
    let refreshed = ann.ask(json!({"action":"refresh","token":ws::token_for("acme", "ann", 3600)}), "refreshed").await;
    let until = chrono::DateTime::parse_from_rfc3339(refreshed["expires_at"].as_str().unwrap()).unwrap();
    assert!(until.timestamp() > chrono::Utc::now().timestamp() + 3000, "{refreshed}");
    let said = ann.ask(json!({"action":"sendMessage","room":"general","message":"after"}), "ack").await;
    assert!(said["id"].is_string(), "{said}");
    ann.expect("its own message after the refresh", |f| f["message"] == "after").await;
    stack.shutdown().await;
}

/// Acting on a user (issue 26): a tenant's backend disconnects a user everywhere and refuses them
/// for a minute, through `roomcast dev`'s `POST /publish` with its publish token. Each of their
/// connections is told `terminated` and closed; the room sees them leave with that reason; their
/// reconnect is refused; other users go on; another tenant's token can do none of it.
async fn a_backend_disconnects_a_user_everywhere_and_keeps_them_out_for_a_while(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let base = format!("http://{}", stack.addr);
    let mut tab1 = connect(&stack, "acme", "ann", "general").await;
    let mut tab2 = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    for client in [&mut tab1, &mut tab2, &mut bob] {
        client.expect_action("welcome").await;
    }
    ws::who_settles_on(&stack, &mut bob, "general", &[("ann", 2), ("bob", 1)]).await;
    let until = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    let body = json!({"action": "disconnect_user", "tenant": "acme", "user_id": "ann", "refuse_until": until});
    let post = |token: String| {
        let (base, body) = (base.clone(), body.to_string().into_bytes());
        async move { roomcast::dev::api::request_as(&base, axum::http::Method::POST, "/publish", body, Some(&token)).await }
    };
    let foreign = post(roomcast_tests::users_token("globex", ws::SECRET)).await;
    assert!(foreign.expect_err("globex acts on acme").to_string().contains("tenant globex only"));
    let publisher = post(roomcast_tests::publish_token("acme", ws::SECRET)).await;
    assert!(publisher.expect_err("a publish token acts on users").to_string().contains("`users` scope"));
    let answer = post(roomcast_tests::users_token("acme", ws::SECRET)).await.expect("acme's backend");
    assert_eq!(answer["disconnected"], 2, "{answer}");
    for tab in [&mut tab1, &mut tab2] {
        let told = tab.expect("terminated", |f| f["action"] == "error" && f["code"] == "terminated").await;
        assert!(told["message"].as_str().unwrap().contains("disconnected"), "{told}");
        tab.expect_close(Duration::from_secs(10)).await;
    }
    let left = bob.expect("ann's leaving", ws::presence("ann", "left")).await;
    assert_eq!(left["reason"], "terminated", "{left}");
    // Refused at the upgrade while the refusal stands, once the authorizer sees it (it reads a
    // tenant's identity at most IDENTITY_FRESH late); bob is untouched.
    let mut refused = None;
    for _ in 0..400 {
        match try_connect(&stack, &format!("token={}&rooms=general", ws::token("acme", "ann"))).await {
            Err(status) => {
                refused = Some(status);
                break;
            }
            Ok(early) => early.close().await,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(matches!(refused, Some(401 | 403)), "ann was never refused: {refused:?}");
    let said = bob.ask(json!({"action":"sendMessage","room":"general","message":"still here"}), "ack").await;
    assert!(said["id"].is_string());
    stack.shutdown().await;
}

/// Server-side joins (issue 26): a tenant's backend puts every connection of a user into a room
/// (`join_user`) under the rules of the user's own `join` — the token's `rooms` claim refuses it
/// for a user whose token does not name the room — and each connection is told with an `ack`,
/// the room with `joined` (reason `server`); `leave_user` takes them out.
async fn a_backend_puts_a_users_connections_into_a_room_under_the_rules_of_a_join_and_takes_them_out(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let base = format!("http://{}", stack.addr);
    let mut tab1 = connect(&stack, "acme", "ann", "general").await;
    let mut tab2 = connect(&stack, "acme", "ann", "general").await;
    let mut bob = connect(&stack, "acme", "bob", "vip").await;
    let claims = roomcast::auth::Claims {
        tenant: "acme".into(),
        sub: "cat".into(),
        exp: chrono::Utc::now().timestamp() + 600,
        nbf: None,
        scope: None,
        rooms: Some(vec!["general".into()]),
        extra: Default::default(),
    };
    let query = format!("token={}&rooms=general", roomcast::auth::mint(&claims, ws::SECRET));
    let mut cat = try_connect(&stack, &query).await.expect("cat connects");
    for client in [&mut tab1, &mut tab2, &mut bob, &mut cat] {
        client.expect_action("welcome").await;
    }
    let backend = roomcast_tests::users_token("acme", ws::SECRET);
    let act = |body: Value| {
        let (base, token) = (base.clone(), backend.clone());
        async move {
            let body = body.to_string().into_bytes();
            roomcast::dev::api::request_as(&base, axum::http::Method::POST, "/publish", body, Some(&token))
                .await
                .unwrap()
        }
    };
    let joined = act(json!({"action": "join_user", "tenant": "acme", "user_id": "ann", "room": "vip"})).await;
    assert_eq!(joined, json!({"connections": 2, "joined": 2, "pending": 0, "denied": 0}));
    for tab in [&mut tab1, &mut tab2] {
        let ack = tab.expect("the server's join", |f| f["action"] == "ack" && f["room"] == "vip").await;
        assert_eq!(ack["request"], "join", "{ack}");
    }
    let seen = bob.expect("ann joining", ws::presence("ann", "joined")).await;
    assert_eq!(seen["reason"], "server", "{seen}");
    tab1.ask(json!({"action":"sendMessage","room":"vip","message":"in by the backend"}), "ack").await;
    bob.expect("ann's message", |f| f["message"] == "in by the backend").await;
    // Cat's token names only `general`: the backend cannot put her in `vip` either.
    let refused = act(json!({"action": "join_user", "tenant": "acme", "user_id": "cat", "room": "vip"})).await;
    assert_eq!(refused, json!({"connections": 1, "joined": 0, "pending": 0, "denied": 1}));
    let left = act(json!({"action": "leave_user", "tenant": "acme", "user_id": "ann", "room": "vip"})).await;
    assert_eq!(left, json!({"connections": 2, "left": 2}));
    // Each connection is told it is out (it did not ask), and the room sees why.
    for tab in [&mut tab1, &mut tab2] {
        let told = tab.expect("the server's leave", |f| f["action"] == "ack" && f["request"] == "leave").await;
        assert_eq!(told["room"], "vip", "{told}");
    }
    let gone = bob.expect("ann leaving", ws::presence("ann", "left")).await;
    assert_eq!(gone["reason"], "server", "{gone}");
    let out = tab2.ask(json!({"action":"sendMessage","room":"vip","message":"x"}), "error").await;
    assert_eq!(out["code"], "not_member", "{out}");
    stack.shutdown().await;
}

/// Send to a user (issue 26): a tenant's backend reaches every connection of a user — one in a
/// room, one in none — with one `user_message` each (the same id); another user of the room gets
/// nothing of it; a user with no connection is told so and nothing is written; another tenant's
/// token, a publish token and an oversize message are refused.
async fn a_backend_sends_to_every_connection_of_a_user_in_any_room_or_none(kind: &str) {
    let stack = ws::dev(kind, |_| {}).await;
    let base = format!("http://{}", stack.addr);
    let mut tab1 = connect(&stack, "acme", "ann", "general").await;
    let mut tab2 = connect(&stack, "acme", "ann", "").await;
    let mut bob = connect(&stack, "acme", "bob", "general").await;
    for client in [&mut tab1, &mut tab2, &mut bob] {
        client.expect_action("welcome").await;
    }
    let post = |token: String, body: Value| {
        let base = base.clone();
        async move {
            let body = body.to_string().into_bytes();
            roomcast::dev::api::request_as(&base, axum::http::Method::POST, "/publish", body, Some(&token)).await
        }
    };
    let to = |user: &str, message: &str| json!({"action": "send_to_user", "tenant": "acme", "user_id": user, "message": message, "from": "billing"});
    let backend = roomcast_tests::users_token("acme", ws::SECRET);
    let foreign = post(roomcast_tests::users_token("globex", ws::SECRET), to("ann", "x")).await;
    assert!(foreign.expect_err("globex sends to acme's user").to_string().contains("tenant globex only"));
    let publisher = post(roomcast_tests::publish_token("acme", ws::SECRET), to("ann", "x")).await;
    assert!(publisher.expect_err("a publish token sends to a user").to_string().contains("`users` scope"));
    let big = "x".repeat(roomcast::protocol::MAX_MESSAGE_FRAME_BYTES);
    let oversize = post(backend.clone(), to("ann", &big)).await;
    assert!(oversize.expect_err("an oversize message").to_string().contains("413"));
    let impostor = post(
        backend.clone(),
        json!({"action": "send_to_user", "tenant": "acme", "user_id": "ann",
        "message": "x", "from": "acme#admin"}),
    )
    .await;
    assert!(impostor.expect_err("a from with the key separator").to_string().contains("400"));
    let nobody = post(backend.clone(), to("dan", "hello?")).await.expect("a user without connections");
    assert_eq!(nobody, json!({"id": null, "connections": 0}));

    let sent = post(backend.clone(), to("ann", "your invoice is paid")).await.expect("acme's backend");
    assert_eq!(sent["connections"], 2, "{sent}");
    let id = sent["id"].as_str().expect("an id").to_string();
    for tab in [&mut tab1, &mut tab2] {
        let got = tab.expect("the user message", |f| f["action"] == "user_message").await;
        assert_eq!((got["id"].as_str(), got["from"].as_str()), (Some(id.as_str()), Some("billing")), "{got}");
        assert_eq!(got["message"], "your invoice is paid");
    }
    // Bob shares ann's room and gets nothing of hers: his own message to him is the marker.
    let marker = post(backend.clone(), to("bob", "marker")).await.expect("to bob");
    assert_eq!(marker["connections"], 1, "{marker}");
    let ann_id = id.clone();
    bob.expect_before(
        "bob's own user message",
        |f| f["action"] == "user_message" && f["message"] == "marker",
        move |f| f["id"] == ann_id.as_str(),
    )
    .await;
    stack.shutdown().await;
}

/// `roomcast plugin list` against `roomcast dev` says what a newcomer needs (issue 28, point 8): a
/// tenant with no versions is told so (it printed nothing), and after `plugin disable` the
/// version that ran is listed inactive (it still said active), under "runs no plugin".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_list_says_when_there_is_nothing_and_what_a_disable_left() {
    let stack = ws::dev("memory", |_| {}).await;
    let url = format!("http://{}", stack.addr);
    let file = std::env::temp_dir().join(format!("roomcast-list-{}.wasm", std::process::id()));
    std::fs::write(&file, roomcast_tests::component("roomcast-plugin-moderation")).unwrap();
    let roomcast = |args: &[&str]| {
        let out = std::process::Command::new(roomcast_tests::aws::binary("roomcast"))
            .args(args)
            .args(["--dev", &url])
            .env_remove("DYNAMODB_ENDPOINT_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        // What it says besides the listing goes to stderr.
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let listed = roomcast(&["plugin", "list", "--tenant", "nobody"]);
    assert!(listed.contains("nobody has no plugin versions"), "{listed}");
    let path = file.to_str().unwrap();
    roomcast(&["plugin", "upload", "--tenant", "acme", path]);
    let mut active = String::new();
    for _ in 0..200 {
        active = roomcast(&["plugin", "list", "--tenant", "acme"]);
        if active.contains("* ") && active.contains("active") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(active.lines().any(|l| l.starts_with('*') && l.contains(" active ")), "{active}");
    roomcast(&["plugin", "disable", "--tenant", "acme"]);
    let disabled = roomcast(&["plugin", "list", "--tenant", "acme"]);
    assert!(disabled.contains("acme runs no plugin"), "{disabled}");
    assert!(disabled.lines().any(|l| l.contains(" inactive ")) && !disabled.contains(" active "), "{disabled}");
    let _ = std::fs::remove_file(&file);
    stack.shutdown().await;
}

/// The admin operations against the local stack (issue 28, point 4): `roomcast admin --dev URL`
/// needs no AWS credentials, lists a user's connections with the labels they connected with,
/// and the sweep probes the stack's own `@connections` — an open dev connection is open, not
/// `unknown`; one the emulator no longer has is cleaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roomcast_admin_runs_against_roomcast_dev() {
    let stack = ws::dev("memory", |_| {}).await;
    let url = format!("http://{}", stack.addr);
    let query = format!("token={}&rooms=general&deployment_id=prod-1&connection_type=client", ws::token("acme", "ann"));
    let mut ann = try_connect(&stack, &query).await.expect("ann connects");
    let welcome = ann.expect_action("welcome").await;
    assert_eq!(
        (welcome["deployment_id"].as_str(), welcome["connection_type"].as_str()),
        (Some("prod-1"), Some("client"))
    );
    let admin = |event: Value| {
        let out = std::process::Command::new(roomcast_tests::aws::binary("roomcast"))
            .args(["admin", &event.to_string(), "--dev", &url])
            .env_remove("DYNAMODB_ENDPOINT_URL")
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("ROOMCAST_MANAGEMENT_ENDPOINT")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{event}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| panic!("{stdout}: {e}"))
    };
    let found = admin(json!({"action": "get_user_connections", "tenant": "acme", "userId": "ann"}));
    let connections = found["body"]["connections"].as_array().unwrap();
    assert_eq!(connections.len(), 1, "{found}");
    assert_eq!(
        (connections[0]["deploymentId"].as_str(), connections[0]["connectionType"].as_str()),
        (Some("prod-1"), Some("client"))
    );
    // Every connection idle for the sweep (0 s): ann's is open at the emulator.
    let swept = admin(json!({"action": "cleanup_stale_connections", "idleSeconds": 0}));
    assert_eq!(swept["statusCode"], 200, "{swept}");
    let body = &swept["body"];
    assert!(body["checked"].as_u64() >= Some(1) && body["stillOpen"].as_u64() >= Some(1), "{swept}");
    assert_eq!(body["unknown"], 0, "a dev connection was not probed at the emulator: {swept}");
    assert_eq!(body["cleanedCount"], 0, "{swept}");
    ann.ask(json!({"action": "ping"}), "pong").await;
    stack.shutdown().await;
}

/// A WebSocket upgrade at `/` (where the dev page is) is refused with where to connect instead
/// of answered with the page's HTML (issue 28, point 8); the page itself is still served there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_at_the_page_is_told_where_to_connect() {
    let stack = ws::dev("memory", |_| {}).await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/", stack.addr)).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
            let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
            assert!(body.contains("the WebSocket endpoint is /"), "{body}");
        }
        other => panic!("expected a 400 answer, got {:?}", other.map(|_| "a WebSocket")),
    }
    let page = roomcast::dev::api::request_as(
        &format!("http://{}", stack.addr),
        axum::http::Method::GET,
        "/",
        Vec::new(),
        None,
    )
    .await;
    // Not JSON: the helper says so, with the page's first bytes.
    assert!(page.expect_err("the page is HTML").to_string().contains("<!doctype html>"));
    stack.shutdown().await;
}
