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
    assert_eq!(newer["next"], json!(sent[525]));
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
    assert_eq!(page["next"], json!(got[0]), "more, before the oldest given");
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
    // After the window (five minutes) the key sends again.
    stack.clock.advance(Age::seconds(300));
    let later = stack.send("ann", send).await;
    assert_ne!(later["id"], first["id"]);
    stack.pump().await;
    assert_eq!(stack.recorder.received_action("bob", "message").len(), 2);
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
    assert_eq!(ids(&answer), sent[10..]);
    assert!(answer.get("next").is_none());
    // An id no longer in history (or never): recovered false, nothing given.
    let old = roomcast::model::message_id_at(stack.clock_now() - Age::days(30));
    let answer = stack.send("bob", json!({"action":"recover","room":"general","since":old})).await;
    assert_eq!(answer["recovered"], false, "{answer}");
    assert!(ids(&answer).is_empty());
    assert!(answer["reason"].as_str().unwrap().contains("reload"));
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
