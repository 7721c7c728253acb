//! History that pages correctly, idempotent sends and recovery after a reconnect, through the
//! real handlers on both stores: cursors are message ids (or keys), never raw timestamps; pages
//! fit one 128 KB frame whatever the messages' sizes and say `next` when there is more.

use chrono::Duration as Age;
use roomcast_tests::Stack;
use serde_json::{Value, json};

roomcast_tests::on_both_stores!(
    a_thousand_messages_page_forward_and_backward_with_nothing_skipped_or_repeated,
    large_messages_fit_the_frame_and_the_answer_says_next,
    a_repeated_idempotency_key_delivers_once_and_answers_the_first_id,
    recover_gives_what_was_missed_in_order_or_says_it_cannot,
    bad_history_and_recover_requests_are_refused_and_write_nothing,
    history_and_recover_give_what_members_got,
    a_direct_message_is_history_only_for_those_it_was_sent_to,
    a_message_routed_into_other_rooms_is_in_their_history_for_those_it_reached,
    a_reconnect_with_since_gets_what_it_missed_after_its_welcome,
    a_signal_reaches_the_others_and_is_never_history,
);

fn ids(page: &Value) -> Vec<String> {
    page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
}

/// 1,000 messages, 20 of them in one millisecond.
async fn thousand(stack: &Stack) -> Vec<String> {
    let mut sent = Vec::new();
    for i in 0..1000 {
        if !(500..520).contains(&i) {
            stack.clock.advance(Age::milliseconds(1));
        }
        let ack =
            stack.send("ann", json!({"action":"sendMessage","room":"general","message":format!("m{i:04}")})).await;
        sent.push(ack["id"].as_str().expect("an id").to_string());
    }
    sent
}

async fn a_thousand_messages_page_forward_and_backward_with_nothing_skipped_or_repeated(kind: &str) {
    let stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    let sent = thousand(&stack).await;

    // Backward from the newest, 100 at a time.
    let mut backward: Vec<String> = Vec::new();
    let mut before = Value::Null;
    loop {
        let page = stack.send("ann", json!({"action":"history","room":"general","limit":100,"before":before})).await;
        assert_eq!(page["action"], "history", "{page}");
        let mut got = ids(&page);
        got.extend(backward);
        backward = got;
        match &page["next"] {
            Value::String(next) => before = json!(next),
            _ => break,
        }
    }
    assert_eq!(backward, sent, "backward: every message once, in order");

    // Forward from before the first, 64 at a time (the cursor a time with an offset once).
    let mut forward: Vec<String> = Vec::new();
    let mut after = json!("2000-01-01T02:00:00+02:00");
    loop {
        let page = stack.send("ann", json!({"action":"history","room":"general","limit":64,"after":after})).await;
        forward.extend(ids(&page));
        match &page["next"] {
            Value::String(next) => after = json!(next),
            _ => break,
        }
    }
    assert_eq!(forward, sent, "forward: every message once, in order");

    // From the middle of the millisecond that holds 20, both ways.
    let middle = &sent[510];
    let older = stack.send("ann", json!({"action":"history","room":"general","limit":15,"before":middle})).await;
    assert_eq!(ids(&older), sent[495..510]);
    let newer = stack.send("ann", json!({"action":"history","room":"general","limit":15,"after":middle})).await;
    assert_eq!(ids(&newer), sent[511..526]);
    assert_eq!(newer["next"], json!(roomcast::model::message_sk_of_id(&sent[525]).unwrap()), "next is a message key");
}

async fn large_messages_fit_the_frame_and_the_answer_says_next(kind: &str) {
    let stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    let mut sent = Vec::new();
    for i in 0..100 {
        stack.clock.advance(Age::milliseconds(1));
        let body = format!("{i:03}{}", "x".repeat(30_000));
        let ack = stack.send("ann", json!({"action":"sendMessage","room":"general","message":body})).await;
        sent.push(ack["id"].as_str().unwrap().to_string());
    }
    let page = stack.send("ann", json!({"action":"history","room":"general","limit":100})).await;
    let size = page.to_string().len();
    assert!(size <= 128 * 1024, "the answer is {size} bytes");
    let got = ids(&page);
    assert!(!got.is_empty() && got.len() < 100, "{} messages", got.len());
    assert_eq!(got, sent[100 - got.len()..], "the newest that fit, in order");
    assert_eq!(
        page["next"],
        json!(roomcast::model::message_sk_of_id(&got[0]).unwrap()),
        "more, before the oldest given"
    );
    // The largest message a client may send fits a page on its own.
    let biggest = "y".repeat(roomcast::protocol::MAX_MESSAGE_FRAME_BYTES - 200);
    let ack = stack.send("ann", json!({"action":"sendMessage","room":"general","message":biggest})).await;
    assert_eq!(ack["action"], "ack", "{}", ack.to_string().len());
    let page = stack.send("ann", json!({"action":"history","room":"general","limit":5})).await;
    assert!(page.to_string().len() <= 128 * 1024);
    assert_eq!(ids(&page), [ack["id"].as_str().unwrap()]);
}

async fn a_repeated_idempotency_key_delivers_once_and_answers_the_first_id(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.pump().await;
    let send = json!({"action":"sendMessage","room":"general","message":"order shipped","idempotency_key":"order-42"});
    let first = stack.send("ann", send.clone()).await;
    stack.clock.advance(Age::seconds(30));
    let again = stack.send("ann", send.clone()).await;
    assert_eq!(again["id"], first["id"], "{again}");
    stack.pump().await;
    let got = stack.recorder.received_action("bob", "message");
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["id"], first["id"]);
    // The same key for another message within the window: refused, nothing written.
    let other = json!({"action":"sendMessage","room":"general","message":"another","idempotency_key":"order-42"});
    assert_eq!(stack.send("ann", other).await["code"], "invalid_request");
    // Bob's order-42 is his own key.
    let bobs = stack.send("bob", send.clone()).await;
    assert_ne!(bobs["id"], first["id"]);
    stack.pump().await;
    stack.recorder.clear();
    // After the window (five minutes) the key sends again.
    stack.clock.advance(Age::seconds(300));
    let later = stack.send("ann", send).await;
    assert_ne!(later["id"], first["id"]);
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("bob", "message").len(), 1);
}

async fn recover_gives_what_was_missed_in_order_or_says_it_cannot(kind: &str) {
    let stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    let mut sent = Vec::new();
    for i in 0..40 {
        stack.clock.advance(Age::milliseconds(1));
        let ack = stack.send("ann", json!({"action":"sendMessage","room":"general","message":format!("m{i}")})).await;
        sent.push(ack["id"].as_str().unwrap().to_string());
    }
    // Bob saw up to the tenth; he asks for what came after.
    let answer = stack.send("bob", json!({"action":"recover","room":"general","since":sent[9]})).await;
    assert_eq!(answer["action"], "recover", "{answer}");
    assert_eq!(answer["recovered"], true);
    // From a margin before `since` (a slow write may land just behind it): the client keeps one
    // copy per id. Everything after `since`, in order; before it, only messages it had.
    let got = ids(&answer);
    let after: Vec<&String> = got.iter().filter(|id| **id > sent[9]).collect();
    assert_eq!(after, sent[10..].iter().collect::<Vec<_>>());
    assert!(got.iter().filter(|id| **id <= sent[9]).all(|id| sent[..9].contains(id)), "{got:?}");
    assert!(!got.contains(&sent[9]), "not the one it named");
    assert!(answer.get("next").is_none());
    // An id no longer in history (or never): recovered false, nothing given.
    let old = roomcast::model::message_id_at(stack.clock_now() - Age::days(30));
    let answer = stack.send("bob", json!({"action":"recover","room":"general","since":old})).await;
    assert_eq!(answer["recovered"], false, "{answer}");
    assert!(ids(&answer).is_empty());
    assert!(answer["reason"].as_str().unwrap().contains("reload"));
}

/// `?since=room:id` on `$connect`: right after the welcome, the processor sends the messages the
/// client missed, in order, then `recover {recovered: true}`; live messages follow. A `since`
/// older than history, or more missed than the bound, is `recovered: false`.
async fn a_reconnect_with_since_gets_what_it_missed_after_its_welcome(kind: &str) {
    use roomcast::handlers;
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general,ops").await;
    stack.connect("bob-1", "acme", "bob", "general,ops").await;
    stack.pump().await;
    let seen = stack.send("ann", json!({"action":"sendMessage","room":"general","message":"seen"})).await;
    let seen_ops = stack.send("ann", json!({"action":"sendMessage","room":"ops","message":"seen in ops"})).await;
    stack.pump().await;
    stack.disconnect("bob-1").await;
    stack.pump().await;
    let mut missed = Vec::new();
    for i in 0..30 {
        stack.clock.advance(Age::milliseconds(1));
        let ack =
            stack.send("ann", json!({"action":"sendMessage","room":"general","message":format!("missed {i}")})).await;
        missed.push(ack["id"].as_str().unwrap().to_string());
    }
    for i in 0..(roomcast::pipeline::MAX_RECOVERED + 1) {
        stack.send("ann", json!({"action":"sendMessage","room":"ops","message":format!("ops {i}")})).await;
    }
    stack.pump().await;
    stack.recorder.clear();

    let mut request = roomcast_tests::connect_request("bob-2", "acme", "bob", "general,ops");
    let since = format!("general:{},ops:{}", seen["id"].as_str().unwrap(), seen_ops["id"].as_str().unwrap());
    request.query_string_parameters = roomcast_tests::query(&[("rooms", "general,ops"), ("since", &since)]);
    assert_eq!(handlers::connect(&request, &stack.deps).await.status_code, 200);
    stack.pump().await;
    // Bob's own `joined` is another partition's record and may come first; the recovery follows
    // the welcome.
    let got: Vec<Value> = stack.recorder.received("bob-2").into_iter().filter(|f| f["action"] != "presence").collect();
    assert_eq!(got[0]["action"], "welcome", "{got:?}");
    let general: Vec<&str> = got
        .iter()
        .filter(|f| f["action"] == "message" && f["room"] == "general")
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    let general: Vec<&str> = general.into_iter().filter(|id| *id > seen["id"].as_str().unwrap()).collect();
    assert_eq!(general, missed, "all thirty, in order");
    let recovers: Vec<&Value> = got.iter().filter(|f| f["action"] == "recover").collect();
    let of = |room: &str| recovers.iter().find(|f| f["room"] == room).copied().unwrap();
    assert_eq!(of("general")["recovered"], true);
    assert_eq!(of("ops")["recovered"], false, "more than the bound: reload");
    assert!(of("ops")["reason"].as_str().unwrap().contains("reload"));
    assert!(!got.iter().any(|f| f["room"] == "ops" && f["action"] == "message"), "none given when not all can be");
    let position = |pred: &dyn Fn(&Value) -> bool| got.iter().position(pred).unwrap();
    assert!(
        position(&|f: &Value| f["id"] == missed[29].as_str())
            < position(&|f: &Value| f["action"] == "recover" && f["room"] == "general"),
        "the messages, then the word that they are all"
    );
    // Then live ones.
    let live = stack.send("ann", json!({"action":"sendMessage","room":"general","message":"live"})).await;
    stack.pump().await;
    assert!(stack.recorder.received("bob-2").iter().any(|f| f["id"] == live["id"]));

    // Bad `since` values are refused at connect.
    for since in ["general", "general:not-an-id", "secret:0190a8c2-6f4e-7cc2-8a3e-3f6b1c2d4e5f"] {
        let mut request = roomcast_tests::connect_request("bob-3", "acme", "bob", "general");
        request.query_string_parameters = roomcast_tests::query(&[("rooms", "general"), ("since", since)]);
        assert_eq!(handlers::connect(&request, &stack.deps).await.status_code, 400, "{since}");
    }
}

/// `signal {room, data}`: typing indicators and the like reach the room's other members, are
/// never listed by `history`, and their record expires within a minute.
async fn a_signal_reaches_the_others_and_is_never_history(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.connect("bob", "acme", "bob", "general").await;
    stack.connect("cid", "acme", "cid", "elsewhere").await;
    stack.pump().await;
    stack.recorder.clear();
    let ack = stack.send("ann", json!({"action":"signal","room":"general","data":{"typing":true}})).await;
    assert_eq!((ack["action"].as_str(), ack["request"].as_str()), (Some("ack"), Some("signal")), "{ack}");
    stack.pump().await;
    let got = stack.recorder.received_action("bob", "signal");
    assert_eq!(
        got,
        [json!({"action":"signal","id":ack["id"],"room":"general","user_id":"ann","data":{"typing":true}})]
    );
    assert!(stack.recorder.received("ann").is_empty(), "not echoed to its sender");
    assert!(stack.recorder.received("cid").is_empty(), "not another room");
    let history = stack.send("bob", json!({"action":"history","room":"general"})).await;
    assert!(ids(&history).is_empty(), "{history}");
    // Its record expires within a minute.
    let signal = stack
        .captured
        .iter()
        .find_map(|r| match roomcast::stream::Change::from_record(r) {
            roomcast::stream::Change::Inserted(roomcast::stream::Record::Signal(s)) => Some(s),
            _ => None,
        })
        .expect("the signal's record");
    assert!(signal.ttl - signal.timestamp.timestamp() <= 60, "{signal:?}");
    // Bad signals: too much data, a room not joined; nothing written.
    let big = json!({"action":"signal","room":"general","data":"x".repeat(roomcast::protocol::MAX_SIGNAL_BYTES)});
    assert_eq!(stack.send("ann", big).await["code"], "message_too_large");
    assert_eq!(stack.send("ann", json!({"action":"signal","room":"secret","data":1})).await["code"], "not_member");
    assert_eq!(stack.pump().await, 0, "nothing written");
}

/// A message the tenant's plugin rejected is never listed by `history` or given by `recover`, and
/// one it rewrote is given as rewritten: what the room's members got.
async fn history_and_recover_give_what_members_got(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-moderation", roomcast::plugins::registry::Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "general").await;
    stack.pump().await;
    let first = stack.send("ann", json!({"action":"sendMessage","room":"general","message":"hello"})).await;
    for text in ["buy spam now", "   deploy at five   ", "bye"] {
        stack.clock.advance(Age::milliseconds(1));
        stack.send("ann", json!({"action":"sendMessage","room":"general","message":text})).await;
    }
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("ann", "rejected").len(), 1);
    let texts = |page: &Value| -> Vec<String> {
        page["messages"].as_array().unwrap().iter().map(|m| m["message"].as_str().unwrap().to_string()).collect()
    };
    let history = stack.send("ann", json!({"action":"history","room":"general"})).await;
    assert_eq!(texts(&history), ["hello", "deploy at five", "bye"]);
    let recovered = stack.send("ann", json!({"action":"recover","room":"general","since":first["id"]})).await;
    assert_eq!(texts(&recovered), ["deploy at five", "bye"], "hello was the one named; the spam is never given");
}

/// The routing plugin sends `@bob …` to Bob (and back to its sender) only: `history`, `recover`
/// and a reconnect's recovery give it to them and to no other member, as it was delivered.
async fn a_direct_message_is_history_only_for_those_it_was_sent_to(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-routing", roomcast::plugins::registry::Policy::FailOpen);
    for user in ["ann", "bob", "eve"] {
        stack.connect(user, "acme", user, "general").await;
    }
    stack.pump().await;
    let first = stack.send("ann", json!({"action":"sendMessage","room":"general","message":"hello all"})).await;
    stack.clock.advance(Age::milliseconds(1));
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"@bob lunch?"})).await;
    stack.clock.advance(Age::milliseconds(1));
    stack.send("ann", json!({"action":"sendMessage","room":"general","message":"bye all"})).await;
    stack.pump().await;
    let delivered = |user: &str| -> Vec<String> {
        stack
            .recorder
            .received_action(user, "message")
            .iter()
            .map(|m| m["message"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(delivered("eve"), ["hello all", "bye all"], "the plugin routed it");
    let texts = |page: &Value| -> Vec<String> {
        page["messages"].as_array().unwrap().iter().map(|m| m["message"].as_str().unwrap().to_string()).collect()
    };
    for (user, want) in [
        ("ann", vec!["hello all", "@bob lunch?", "bye all"]),
        ("bob", vec!["hello all", "@bob lunch?", "bye all"]),
        ("eve", vec!["hello all", "bye all"]),
    ] {
        let history = stack.send(user, json!({"action":"history","room":"general"})).await;
        assert_eq!(texts(&history), want, "{user}'s history");
        assert_eq!(texts(&history), delivered(user), "{user}'s history is what {user} was sent");
        let recovered = stack.send(user, json!({"action":"recover","room":"general","since":first["id"]})).await;
        assert_eq!(texts(&recovered), want[1..].to_vec(), "{user}'s recovery");
    }
    // A reconnect with `?since=` recovers, after its welcome, only what Eve would have been sent.
    let mut request = roomcast_tests::connect_request("eve2", "acme", "eve", "general");
    let since = format!("general:{}", first["id"].as_str().unwrap());
    request.query_string_parameters = roomcast_tests::query(&[("rooms", "general"), ("since", &since)]);
    assert_eq!(roomcast::handlers::connect(&request, &stack.deps).await.status_code, 200);
    stack.pump().await;
    let got = stack.recorder.received("eve2");
    assert!(got.iter().any(|f| f["action"] == "recover" && f["recovered"] == true), "{got:?}");
    let recovered: Vec<String> =
        got.iter().filter(|f| f["action"] == "message").map(|m| m["message"].as_str().unwrap().to_string()).collect();
    assert_eq!(recovered, ["bye all"], "the direct message is not recovered for Eve");
}

/// The routing plugin sends an announcement that names `#ops` to the members of ops too: ops's
/// `history`, `recover` and a reconnect's `?since=` recovery give it to them, as they were sent
/// it (its room the announcements'), and a direct one only to those it was for. A redelivered
/// batch keeps one copy.
async fn a_message_routed_into_other_rooms_is_in_their_history_for_those_it_reached(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.install_plugin("acme", "roomcast-plugin-routing", roomcast::plugins::registry::Policy::FailOpen);
    stack.connect("ann", "acme", "ann", "announcements").await;
    for user in ["bob", "eve"] {
        stack.connect(user, "acme", user, "ops").await;
    }
    stack.pump().await;
    let first = stack.send("bob", json!({"action":"sendMessage","room":"ops","message":"on call today"})).await;
    stack.clock.advance(Age::milliseconds(1));
    stack.send("ann", json!({"action":"sendMessage","room":"announcements","message":"release at five #ops"})).await;
    stack.clock.advance(Age::milliseconds(1));
    stack.send("ann", json!({"action":"sendMessage","room":"announcements","message":"@bob your review #ops"})).await;
    stack.clock.advance(Age::milliseconds(1));
    stack.send("ann", json!({"action":"sendMessage","room":"announcements","message":"not for ops"})).await;
    let batch = stack.pump_once().await;
    stack.pump().await;
    let delivered = |user: &str| -> Vec<(String, String)> {
        let frames = stack.recorder.received_action(user, "message");
        frames.iter().map(|m| (m["room"].as_str().unwrap().into(), m["message"].as_str().unwrap().into())).collect()
    };
    let pairs = |page: &Value| -> Vec<(String, String)> {
        let messages = page["messages"].as_array().unwrap();
        messages.iter().map(|m| (m["room"].as_str().unwrap().into(), m["message"].as_str().unwrap().into())).collect()
    };
    let got = |room: &str, text: &str| (room.to_string(), text.to_string());
    let bob = vec![
        got("ops", "on call today"),
        got("announcements", "release at five #ops"),
        got("announcements", "@bob your review #ops"),
    ];
    let eve = vec![got("ops", "on call today"), got("announcements", "release at five #ops")];
    // Two rooms' records are handled side by side: order holds within a room, not across them.
    let by_room = |mut frames: Vec<(String, String)>| {
        frames.sort_by(|a, b| a.0.cmp(&b.0));
        frames
    };
    for (user, want) in [("bob", &bob), ("eve", &eve)] {
        assert_eq!(by_room(delivered(user)), by_room(want.clone()), "{user} was sent these");
    }
    // The batch again, as Lambda redelivers it: its copies are written again, not added.
    stack.deliver(&batch).await;
    stack.pump().await;
    for (user, want) in [("bob", &bob), ("eve", &eve)] {
        let history = stack.send(user, json!({"action":"history","room":"ops"})).await;
        assert_eq!(&pairs(&history), want, "ops's history for {user} is what {user} was sent");
        let recovered = stack.send(user, json!({"action":"recover","room":"ops","since":first["id"]})).await;
        assert_eq!(pairs(&recovered), want[1..].to_vec(), "{user}'s recovery in ops");
    }
    let announcements = stack.send("ann", json!({"action":"history","room":"announcements"})).await;
    assert_eq!(pairs(&announcements).len(), 3, "the announcements keep their own: {announcements}");
    // A reconnect to ops with `?since=` recovers, after its welcome, what Eve was sent there.
    let mut request = roomcast_tests::connect_request("eve2", "acme", "eve", "ops");
    let since = format!("ops:{}", first["id"].as_str().unwrap());
    request.query_string_parameters = roomcast_tests::query(&[("rooms", "ops"), ("since", &since)]);
    assert_eq!(roomcast::handlers::connect(&request, &stack.deps).await.status_code, 200);
    stack.pump().await;
    let got_back: Vec<String> = stack
        .recorder
        .received_action("eve2", "message")
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got_back, ["release at five #ops"], "recovered in ops after the welcome");
}

async fn bad_history_and_recover_requests_are_refused_and_write_nothing(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("ann", "acme", "ann", "general").await;
    stack.pump().await;
    for (frame, code) in [
        (json!({"action":"history","room":"general","before":"yesterday"}), "invalid_request"),
        (json!({"action":"history","room":"general","before":"MSG#x"}), "invalid_request"),
        (
            json!({"action":"history","room":"general","before":"2024-01-01T00:00:00Z","after":"2024-01-01T00:00:00Z"}),
            "invalid_request",
        ),
        (json!({"action":"history","room":"general","limit":101}), "invalid_request"),
        (json!({"action":"history","room":"secret"}), "not_member"),
        (json!({"action":"recover","room":"general","since":"123"}), "invalid_request"),
        (json!({"action":"recover","room":"general"}), "invalid_request"),
        (
            json!({"action":"recover","room":"secret","since":roomcast::model::message_id_at(chrono::Utc::now())}),
            "not_member",
        ),
        (
            json!({"action":"sendMessage","room":"general","message":"x","idempotency_key":"has#hash"}),
            "invalid_request",
        ),
        (json!({"action":"sendMessage","room":"general","message":"x","idempotency_key":""}), "invalid_request"),
        (json!({"action":"sendMessage","room":"general","message":"x","idempotency_key":{"a":1}}), "invalid_request"),
    ] {
        let answer = stack.send("ann", frame.clone()).await;
        assert_eq!(answer["code"], code, "{frame} → {answer}");
    }
    assert_eq!(stack.pump().await, 0, "nothing was written");
}

/// Publishing and recovery through `roomcast dev` with real WebSocket clients.
mod over_websockets {
    use roomcast_tests::ws::{self, connect};
    use serde_json::{Value, json};

    roomcast_tests::on_both_stores!(multi_thread:
        a_backend_publish_reaches_its_room_only_and_a_repeat_delivers_once,
        a_client_that_missed_thirty_messages_recovers_them_in_order_then_gets_live_ones,
    );

    fn publisher(tenant: &str) -> String {
        roomcast_tests::publish_token(tenant, ws::SECRET)
    }

    async fn publish(stack: &roomcast::dev::DevStack, token: &str, body: Value) -> anyhow::Result<Value> {
        let url = format!("http://{}", stack.addr);
        roomcast::dev::api::request_as(
            &url,
            axum::http::Method::POST,
            "/publish",
            body.to_string().into_bytes(),
            Some(token),
        )
        .await
    }

    async fn a_backend_publish_reaches_its_room_only_and_a_repeat_delivers_once(kind: &str) {
        let stack = ws::dev(kind, |_| {}).await;
        let mut ann = connect(&stack, "acme", "ann", "general").await;
        ann.expect_action("welcome").await;
        let mut eve = connect(&stack, "globex", "eve", "general").await;
        eve.expect_action("welcome").await;

        let body = json!({"tenant":"acme","room":"general","message":"order shipped","idempotency_key":"o-9"});
        let first = publish(&stack, &publisher("acme"), body.clone()).await.unwrap();
        let again = publish(&stack, &publisher("acme"), body).await.unwrap();
        assert_eq!(first["id"], again["id"]);
        let got = ann.expect("the published message", |f| f["message"] == "order shipped").await;
        assert_eq!((got["id"].clone(), got["user_id"].clone()), (first["id"].clone(), json!("backend")));

        // Another tenant's token: refused, nothing written; a connect token: refused.
        let refused =
            publish(&stack, &publisher("globex"), json!({"tenant":"acme","room":"general","message":"x"})).await;
        assert!(refused.unwrap_err().to_string().contains("tenant globex only"));
        let refused =
            publish(&stack, &ws::token("acme", "ann"), json!({"tenant":"acme","room":"general","message":"x"})).await;
        assert!(refused.unwrap_err().to_string().contains("publish"));
        let bad = publish(&stack, &publisher("acme"), json!({"tenant":"acme","room":"a#b","message":"x"})).await;
        assert!(bad.unwrap_err().to_string().contains("room"));
        // A publish token is not a user's: it cannot open a connection.
        let refused = ws::try_connect(&stack, &format!("token={}&rooms=general", publisher("acme"))).await;
        assert_eq!(refused.err(), Some(403));

        // A marker: no second copy of the message came before it, and Eve got nothing.
        publish(&stack, &publisher("acme"), json!({"tenant":"acme","room":"general","message":"marker"}))
            .await
            .unwrap();
        ann.expect_before("the marker", |f| f["message"] == "marker", |f| f["message"] == "order shipped").await;
        publish(&stack, &publisher("globex"), json!({"tenant":"globex","room":"general","message":"eve's marker"}))
            .await
            .unwrap();
        eve.expect_before("her marker", |f| f["message"] == "eve's marker", |f| f["action"] == "message").await;
        stack.shutdown().await;
    }

    async fn a_client_that_missed_thirty_messages_recovers_them_in_order_then_gets_live_ones(kind: &str) {
        let stack = ws::dev(kind, |_| {}).await;
        let mut ann = connect(&stack, "acme", "ann", "general").await;
        ann.expect_action("welcome").await;
        let mut bob = connect(&stack, "acme", "bob", "general").await;
        bob.expect_action("welcome").await;
        let last_seen = ann.ask(json!({"action":"sendMessage","room":"general","message":"before"}), "ack").await;
        bob.expect("before", |f| f["message"] == "before").await;
        bob.close().await;

        let mut missed = Vec::new();
        for i in 0..30 {
            let ack =
                ann.ask(json!({"action":"sendMessage","room":"general","message":format!("missed {i}")}), "ack").await;
            missed.push(ack["id"].as_str().unwrap().to_string());
        }
        // Reconnecting with `?since=`: the missed messages come right after the welcome, in order.
        let query = format!(
            "token={}&rooms=general&since=general:{}",
            ws::token("acme", "bob"),
            last_seen["id"].as_str().unwrap()
        );
        let mut pushed = ws::try_connect(&stack, &query).await.unwrap_or_else(|status| panic!("refused: {status}"));
        pushed.expect_action("welcome").await;
        assert_eq!(pushed.expect_action("recover").await["recovered"], true);
        // Every missed message came before the word that they all had. A message still being
        // delivered live when Bob reconnected may come twice (the live copy can come first): a
        // client keeps one per id, and ids sort in time.
        let mut got: Vec<String> = ws::take_all(&mut pushed, |f| f["action"] == "message")
            .iter()
            .map(|f| f["id"].as_str().unwrap().to_string())
            .collect();
        got.sort();
        got.dedup();
        got.retain(|id| id.as_str() > last_seen["id"].as_str().unwrap());
        assert_eq!(got, missed, "all thirty, each once, in id order");
        pushed.close().await;

        // Or by asking, on a connection that did not say `since`.
        let mut bob = connect(&stack, "acme", "bob", "general").await;
        bob.expect_action("welcome").await;
        let recovered = bob.ask(json!({"action":"recover","room":"general","since":last_seen["id"]}), "recover").await;
        assert_eq!(recovered["recovered"], true, "{recovered}");
        let ids: Vec<&str> =
            recovered["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, missed, "all thirty, in order");
        let live = ann.ask(json!({"action":"sendMessage","room":"general","message":"live"}), "ack").await;
        assert_eq!(bob.expect("the live message", |f| f["message"] == "live").await["id"], live["id"]);

        // A `since` older than history: told so.
        let old = roomcast::model::message_id_at(chrono::Utc::now() - chrono::Duration::days(30));
        let lost = bob.ask(json!({"action":"recover","room":"general","since":old}), "recover").await;
        assert_eq!(lost["recovered"], false);
        stack.shutdown().await;
    }
}
