//! The write-path handlers fed with AWS-documented WebSocket events, and every bad input: each
//! gets a clear answer and writes nothing.

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use roomcast::handlers;
use roomcast_tests::{CONNECT_FIXTURE, DYNAMODB_EVENT_FIXTURE, Stack, body_json, connect_request, message_request};
use serde_json::{Value, json};

fn fixture(raw: &str) -> ApiGatewayWebsocketProxyRequest {
    serde_json::from_str(raw).expect("AWS fixture parses")
}

fn item_count(stack: &Stack) -> usize {
    stack.table.memory.as_ref().expect("embedded store").item_count()
}

#[tokio::test]
async fn the_aws_example_connect_without_a_tenant_is_refused_with_403() {
    let stack = Stack::memory().await;
    // AWS's example request carries an authorizer context (principalId, clientId) but no tenant.
    let response = handlers::connect(&fixture(CONNECT_FIXTURE), &stack.deps).await;
    assert_eq!(response.status_code, 403);
    assert_eq!(item_count(&stack), 0);
}

#[tokio::test]
async fn connect_without_any_authorizer_context_is_refused_with_401() {
    let stack = Stack::memory().await;
    let mut v: Value = serde_json::from_str(CONNECT_FIXTURE).unwrap();
    v["requestContext"]["authorizer"] = Value::Null;
    let response = handlers::connect(&serde_json::from_value(v).unwrap(), &stack.deps).await;
    assert_eq!(response.status_code, 401);
    assert_eq!(item_count(&stack), 0);
}

#[tokio::test]
async fn connect_uses_principal_id_when_there_is_no_user_id_and_writes_the_callback_endpoint() {
    let stack = Stack::memory().await;
    let mut v = serde_json::to_value(connect_request("c1", "acme", "ann", "general")).unwrap();
    v["requestContext"]["authorizer"] = json!({"principalId": "user-7", "tenant": "acme"});
    let response = handlers::connect(&serde_json::from_value(v).unwrap(), &stack.deps).await;
    assert_eq!(response.status_code, 200);
    let conn = stack.table.store.get_connection("c1", stack.clock_now()).await.unwrap().unwrap();
    assert_eq!(conn.user_id, "user-7");
    assert_eq!(conn.endpoint, "https://abcd1234.execute-api.us-east-1.amazonaws.com/prod");
    assert_eq!(conn.deployment_id.as_deref(), Some("deploy-1"));
    assert_eq!(conn.connection_type.as_deref(), Some("client"));
    assert_eq!(item_count(&stack), 2, "the connection and its membership");
    // The client's labels come back in `info` (issue 28, point 7), and `echo` answers its data.
    let info = stack.send("c1", json!({"action": "info"})).await;
    assert_eq!((info["deployment_id"].as_str(), info["connection_type"].as_str()), (Some("deploy-1"), Some("client")));
    let echo = stack.send("c1", json!({"action": "echo", "data": {"n": 1}, "ref": "e1"})).await;
    assert_eq!(echo, json!({"action": "echo", "data": {"n": 1}, "ref": "e1"}));
    // A label the handler would store and show everywhere is bounded at connect.
    let mut v = serde_json::to_value(connect_request("c2", "acme", "ann", "general")).unwrap();
    for params in ["queryStringParameters", "multiValueQueryStringParameters"] {
        if let Some(map) = v[params].as_object_mut() {
            let long = "x".repeat(129);
            map.insert("deployment_id".into(), if params.starts_with("multi") { json!([long]) } else { json!(long) });
        }
    }
    v["requestContext"]["authorizer"] = json!({"principalId": "ann", "tenant": "acme"});
    let refused = handlers::connect(&serde_json::from_value(v).unwrap(), &stack.deps).await;
    assert_eq!(refused.status_code, 400);
    assert_eq!(item_count(&stack), 2, "nothing written for it");
}

#[tokio::test]
async fn connect_refuses_bad_tenants_and_rooms_and_writes_nothing() {
    let stack = Stack::memory().await;
    assert_eq!(stack.connect("c1", "ac#me", "ann", "").await.status_code, 403);
    assert_eq!(stack.connect("c1", "acme", "ann", "general,bad#room").await.status_code, 400);
    let many: Vec<String> = (0..51).map(|i| format!("r{i}")).collect();
    assert_eq!(stack.connect("c1", "acme", "ann", &many.join(",")).await.status_code, 400);
    assert_eq!(item_count(&stack), 0);
}

#[tokio::test]
async fn every_bad_frame_gets_an_error_answer_and_writes_nothing() {
    let stack = Stack::memory().await;
    stack.connect("c1", "acme", "ann", "general").await;
    let before = item_count(&stack);
    let oversize = json!({"action":"sendMessage","room":"general","message":"x".repeat(128 * 1024)}).to_string();
    let cases: Vec<(String, &str)> = vec![
        ("not json".into(), "invalid_json"),
        ("[1]".into(), "invalid_json"),
        (json!({"action":"dance"}).to_string(), "unknown_action"),
        (json!({"room":"general"}).to_string(), "unknown_action"),
        (json!({"action":"sendMessage","room":"general"}).to_string(), "invalid_request"),
        (json!({"action":"sendMessage","room":"elsewhere","message":"hi"}).to_string(), "not_member"),
        (json!({"action":"sendMessage","room":"a#b","message":"hi"}).to_string(), "invalid_request"),
        (json!({"action":"leave","room":"elsewhere"}).to_string(), "not_member"),
        (oversize, "message_too_large"),
    ];
    for (frame, code) in cases {
        let answer = body_json(&handlers::message(&message_request("c1", &frame), &stack.deps).await);
        assert_eq!(answer["action"], "error", "{frame:.60}");
        assert_eq!(answer["code"], code, "{frame:.60}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let mut binary = message_request("c1", "AAEC");
    binary.is_base64_encoded = true;
    assert_eq!(body_json(&handlers::message(&binary, &stack.deps).await)["code"], "invalid_json");
    assert_eq!(item_count(&stack), before, "bad input writes nothing");
}

/// A frame within the client limit whose message would not fit the frame every recipient gets
/// (a long user id, an id and a time are added) is refused here, not acknowledged and then
/// refused with 413 by every recipient.
#[tokio::test]
async fn a_message_that_would_not_fit_its_recipients_frame_is_refused_when_sent() {
    let stack = Stack::memory().await;
    let user = "u".repeat(roomcast::auth::MAX_USER_ID_BYTES);
    stack.connect("c1", "acme", &user, "general").await;
    let before = item_count(&stack);
    let frame_of = |body: String| json!({"action":"sendMessage","room":"general","message":body}).to_string();
    let envelope = frame_of(String::new()).len();
    let fits_the_client_limit = frame_of("x".repeat(roomcast::protocol::MAX_FRAME_BYTES - envelope));
    assert_eq!(fits_the_client_limit.len(), roomcast::protocol::MAX_FRAME_BYTES);
    let answer = body_json(&handlers::message(&message_request("c1", &fits_the_client_limit), &stack.deps).await);
    assert_eq!(answer["code"], "message_too_large", "{answer:.200}");
    assert_eq!(item_count(&stack), before, "nothing written");
    // A message that fits its recipients' frame is accepted.
    let fits = frame_of("x".repeat(roomcast::protocol::MAX_OUTGOING_BYTES - 1024));
    let answer = body_json(&handlers::message(&message_request("c1", &fits), &stack.deps).await);
    assert_eq!(answer["action"], "ack", "{answer:.200}");
}

#[tokio::test]
async fn a_frame_from_an_unknown_connection_is_told_to_reconnect() {
    let stack = Stack::memory().await;
    let answer = stack.send("ghost", json!({"type":"ping"})).await;
    assert_eq!(answer["code"], "not_connected");
    assert_eq!(item_count(&stack), 0);
}

#[tokio::test]
async fn the_older_type_field_routes_like_action() {
    let stack = Stack::memory().await;
    stack.connect("c1", "acme", "ann", "").await;
    assert_eq!(stack.send("c1", json!({"type":"ping"})).await, json!({"action":"pong"}));
    assert_eq!(stack.send("c1", json!({"type":"info"})).await["user_id"], "ann");
}

#[tokio::test]
async fn the_disconnect_fixture_is_idempotent() {
    let stack = Stack::memory().await;
    stack.connect("AAAA1234=", "acme", "ann", "general").await;
    let disconnect = fixture(roomcast_tests::DISCONNECT_FIXTURE);
    assert_eq!(disconnect.request_context.disconnect_status_code, Some(1005));
    assert_eq!(handlers::disconnect(&disconnect, &stack.deps).await.status_code, 200);
    assert_eq!(handlers::disconnect(&disconnect, &stack.deps).await.status_code, 200);
    assert!(stack.table.store.get_connection("AAAA1234=", stack.clock_now()).await.unwrap().is_none());
}

#[tokio::test]
async fn a_table_outage_is_a_500_with_an_internal_error_and_nothing_half_written() {
    // A DynamoDB endpoint with nothing listening: the real SDK client fails to connect.
    let sdk = roomcast_tests::sdk_config().await;
    let client = roomcast::config::dynamodb_client(&sdk, Some("http://127.0.0.1:9"));
    let mut stack = Stack::memory().await;
    stack.deps.store = std::sync::Arc::new(roomcast::store::dynamodb::DynamoStore::new(client, "roomcast"));
    assert_eq!(stack.connect("c1", "acme", "ann", "general").await.status_code, 500);
    let answer = body_json(&handlers::message(&message_request("c1", r#"{"type":"ping"}"#), &stack.deps).await);
    assert_eq!(answer["code"], "internal");
}

#[tokio::test]
async fn the_aws_example_stream_event_and_malformed_records_are_skipped_not_fatal() {
    let mut stack = Stack::memory().await;
    // AWS's example event: records of another table's shape (keys `Id`), which we do not handle.
    let mut event: Value = serde_json::from_str(DYNAMODB_EVENT_FIXTURE).unwrap();
    let records = event["Records"].as_array_mut().unwrap();
    let aws_examples = records.len() as u64;
    records.push(json!({"eventID": "no-dynamodb-section", "eventName": "INSERT"}));
    records.push(json!("not even an object"));
    records.push(json!({"eventID": "bad-image", "eventName": "INSERT", "awsRegion": "us-east-1",
        "dynamodb": {"Keys": {"pk": {"S": "CONN#x"}, "sk": {"S": "META"}}, "NewImage": {"pk": {"S": "CONN#x"}},
                     "SequenceNumber": "1", "SizeBytes": 1}}));
    let response = stack.processor.handle_event(&event).await.unwrap();
    assert!(response.batch_item_failures.is_empty(), "skipped records never fail the batch");
    let counts = stack.processor.counts();
    assert_eq!(counts.records, aws_examples + 3);
    assert_eq!(counts.skipped, aws_examples + 3);
    assert!(stack.recorder.calls().is_empty());

    let not_a_stream_event = stack.processor.handle_event(&json!({"hello": "world"})).await.unwrap_err();
    assert!(not_a_stream_event.contains("Records"), "{not_a_stream_event}");
    assert_eq!(stack.pump().await, 0);
}

/// A frame's `ref` comes back on its own answer — an ack, an error, a refusal — so a client with
/// several requests in flight matches each; a `ref` too long, or not a string, is refused.
#[tokio::test]
async fn every_answer_carries_its_frames_ref() {
    let stack = Stack::memory().await;
    stack.connect("c1", "acme", "ann", "general").await;
    let ack = stack.send("c1", json!({"action":"sendMessage","room":"general","message":"hi","ref":"r1"})).await;
    assert_eq!((ack["action"].as_str(), ack["ref"].as_str()), (Some("ack"), Some("r1")), "{ack}");
    let refused = stack.send("c1", json!({"action":"history","room":"other","ref":"r2"})).await;
    assert_eq!((refused["code"].as_str(), refused["ref"].as_str()), (Some("not_member"), Some("r2")), "{refused}");
    let unknown = stack.send("c1", json!({"action":"dance","ref":"r3"})).await;
    assert_eq!((unknown["code"].as_str(), unknown["ref"].as_str()), (Some("unknown_action"), Some("r3")), "{unknown}");
    // A `ref` the client cannot have meant is an error, not a silently unmatched answer (issue 28).
    let long = stack.send("c1", json!({"action":"ping","ref":"x".repeat(65)})).await;
    assert_eq!((long["code"].as_str(), long.get("ref")), (Some("invalid_request"), None), "{long}");
    assert!(long["message"].as_str().unwrap().contains("`ref` must be"), "{long}");
    let number = stack.send("c1", json!({"action":"ping","ref":7})).await;
    assert_eq!((number["code"].as_str(), number.get("ref")), (Some("invalid_request"), None), "{number}");
    // So are an empty message and a field the action does not take, with the frame's `ref`.
    let empty = stack.send("c1", json!({"action":"sendMessage","room":"general","message":"","ref":"r4"})).await;
    assert_eq!((empty["code"].as_str(), empty["ref"].as_str()), (Some("invalid_request"), Some("r4")), "{empty}");
    let extra = stack.send("c1", json!({"action":"join","room":"general","colour":"red","ref":"r5"})).await;
    assert_eq!((extra["code"].as_str(), extra["ref"].as_str()), (Some("invalid_request"), Some("r5")), "{extra}");
    assert!(extra["message"].as_str().unwrap().contains("unknown field `colour`"), "{extra}");
}

/// Room names may hold `:`; `since=room:id` splits at the last one (ids never hold it).
#[tokio::test]
async fn since_names_a_room_with_a_colon() {
    let stack = Stack::memory().await;
    let id = roomcast::model::message_id_at(chrono::Utc::now());
    let mut request = connect_request("c1", "acme", "ann", "team:42");
    request.query_string_parameters =
        roomcast_tests::query(&[("rooms", "team:42"), ("since", &format!("team:42:{id}"))]);
    let response = handlers::connect(&request, &stack.deps).await;
    assert_eq!(response.status_code, 200, "{:?}", response.body);
}
