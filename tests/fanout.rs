//! Fan-out as AWS runs it: `@connections` answering after tens of milliseconds, and an account
//! quota past which API Gateway answers `429 LimitExceededException` — imposed by the tests'
//! recorder (`Stack::as_aws`, `roomcast::gateway::account`) in front of the real SDK client.
//!
//! What these show is behaviour, not speed (speeds are in `roomcast bench`): the deliverer keeps
//! more calls in flight when calls are slow, and a throttled account is waited out — every member
//! served once, nobody closed as a slow consumer.

use std::time::Duration;

use roomcast::gateway::account::AccountSettings;
use roomcast::model::TenantSettings;
use roomcast_tests::Stack;
use serde_json::json;

/// A room of `size` members of tenant `acme` (`m000`, `m001`, …), each its own user; presence
/// is not announced, so that the only fan-out is the message's.
async fn room_of(stack: &mut Stack, size: usize) -> Vec<String> {
    let settings = TenantSettings { presence_announce_max_users: Some(0), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    let members: Vec<String> = (0..size).map(|i| format!("m{i:03}")).collect();
    for member in &members {
        assert_eq!(stack.connect(member, "acme", member, "big").await.status_code, 200);
    }
    stack.pump().await;
    for member in &members {
        assert_eq!(stack.recorder.received_action(member, "welcome").len(), 1, "{member} was not welcomed once");
    }
    members
}

/// `m000` sends `text` into the big room; the handler acknowledges it.
async fn say(stack: &Stack, text: &str) {
    let sent = stack.send("m000", json!({"action": "sendMessage", "room": "big", "message": text})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
}

/// Every member got the message exactly once.
fn each_got_it_once(stack: &Stack, members: &[String], text: &str) {
    for member in members {
        let got: Vec<_> =
            stack.recorder.received_action(member, "message").into_iter().filter(|m| m["message"] == text).collect();
        assert_eq!(got.len(), 1, "{member} got {text:?} {} times", got.len());
    }
}

/// At 20 ms a call, 32 calls in flight serve 1,600 recipients a second: the deliverer grows its
/// limit (slow start) instead, and keeps many more in flight for a big room's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_grow_when_each_call_is_slow() {
    let latency = AccountSettings {
        latency: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        quota: None,
        burst: 1.0,
    };
    let mut stack = Stack::as_aws("memory", latency).await;
    let members = room_of(&mut stack, 600).await;
    let before = stack.recorder.account().peak_in_flight();
    say(&stack, "hello all").await;
    stack.pump().await;
    each_got_it_once(&stack, &members, "hello all");
    let peak = stack.recorder.account().peak_in_flight();
    assert!(peak > 32, "at most {peak} calls in flight (before the message: {before}); a fixed 32 never passes 32");
    assert!(peak <= roomcast::deliver::DeliverySettings::default().concurrency, "{peak} in flight, past the ceiling");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// The account's quota is hit: API Gateway answers 429 to many connections at once. That is the
/// account, not slow clients: every member is still served, once, and nobody is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_account_serves_every_member_and_closes_no_one() {
    let loopback = AccountSettings {
        latency: Duration::from_millis(2),
        jitter: Duration::from_millis(1),
        quota: None,
        burst: 1.0,
    };
    let mut stack = Stack::as_aws("memory", loopback).await;
    let members = room_of(&mut stack, 300).await;
    // From now on, 100 calls a second: the message's 300 deliveries take three seconds, longer
    // than a client may answer 429 before it is judged slow (2 s).
    stack.recorder.account().set_quota(Some(100.0), 10.0);
    say(&stack, "under the quota").await;
    stack.pump().await;
    each_got_it_once(&stack, &members, "under the quota");
    assert!(stack.recorder.account().throttled() > 0, "the quota never bit: the test shows nothing");
    assert_eq!(stack.recorder.deleted(), Vec::<String>::new(), "healthy clients were closed as slow consumers");
    let counts = stack.processor.counts();
    assert_eq!(counts.slow_consumers, 0);
    assert!(counts.account_throttled > 0, "{counts:?}");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// One client whose buffer is full, in a room whose other members are served: still a slow
/// consumer, closed, while the account is not throttling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_full_client_is_still_a_slow_consumer() {
    let loopback =
        AccountSettings { latency: Duration::from_millis(2), jitter: Duration::ZERO, quota: None, burst: 1.0 };
    let mut stack = Stack::as_aws("memory", loopback).await;
    let members = room_of(&mut stack, 50).await;
    stack.recorder.script("m007", &[429; 400]);
    say(&stack, "one is full").await;
    stack.pump().await;
    let others: Vec<String> = members.iter().filter(|m| *m != "m007").cloned().collect();
    each_got_it_once(&stack, &others, "one is full");
    assert_eq!(stack.recorder.deleted(), ["m007"], "the full client is closed");
    assert_eq!(stack.processor.counts().slow_consumers, 1);
}

/// Five clients whose buffers stay full, in a room of 50: five connections answering 429 at once
/// are not taken for the account throttling for long (their repeated 429s are not fresh calls,
/// and `GetConnection` answers them): all five are closed as slow consumers, the others served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_full_clients_are_each_closed_and_do_not_pass_for_the_account() {
    let loopback =
        AccountSettings { latency: Duration::from_millis(2), jitter: Duration::ZERO, quota: None, burst: 1.0 };
    let mut stack = Stack::as_aws("memory", loopback).await;
    let members = room_of(&mut stack, 50).await;
    let full = ["m003", "m011", "m020", "m033", "m047"];
    for id in full {
        stack.recorder.script(id, &[429; 400]);
    }
    say(&stack, "five are full").await;
    stack.pump().await;
    let others: Vec<String> = members.iter().filter(|m| !full.contains(&m.as_str())).cloned().collect();
    each_got_it_once(&stack, &others, "five are full");
    let mut closed = stack.recorder.deleted();
    closed.sort();
    assert_eq!(closed, full, "each full client is closed");
    assert_eq!(stack.processor.counts().slow_consumers, 5);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// A message to 1,200 members that the invocation's deadline cuts off part-way is reported for
/// redelivery; the redelivered record serves only the members not yet served, and a record
/// redelivered once its fan-out was done (a later record of the batch failed) serves nobody again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_cut_off_by_the_deadline_resumes_where_it_stopped() {
    let fast = AccountSettings { latency: Duration::from_millis(5), jitter: Duration::ZERO, quota: None, burst: 1.0 };
    let mut stack = Stack::as_aws("memory", fast).await;
    let members = room_of(&mut stack, 1200).await;
    // 400 calls a second: the message's 1,200 deliveries take three seconds.
    stack.recorder.account().set_quota(Some(400.0), 20.0);
    say(&stack, "cut off").await;
    let records = stack.table.stream.drain().await;
    assert_eq!(records.len(), 1, "the message record");
    let event = json!({ "Records": records });
    // The invocation must answer within 2.8 s: its work ends 1 s before; a big fan-out starts no
    // call in its last 0.4 s.
    let deadline = std::time::Instant::now() + Duration::from_millis(2800);
    let first = stack.processor.handle_event_until(&event, Some(deadline)).await.unwrap();
    assert_eq!(first.batch_item_failures.len(), 1, "the cut-off record is reported for redelivery");
    let served_first: usize = members
        .iter()
        .filter(|m| stack.recorder.received_action(m, "message").iter().any(|f| f["message"] == "cut off"))
        .count();
    assert!(
        served_first > 0 && served_first < members.len(),
        "{served_first} of {} served before the cut",
        members.len()
    );

    let second = stack.processor.handle_event(&event).await.unwrap();
    assert!(second.batch_item_failures.is_empty(), "{second:?}");
    each_got_it_once(&stack, &members, "cut off");
    let skipped = stack.processor.counts().resumed_skips;
    assert!(skipped >= served_first as u64, "{skipped} skipped, {served_first} were served");

    // Redelivered once more after it was done: nobody is served twice.
    let third = stack.processor.handle_event(&event).await.unwrap();
    assert!(third.batch_item_failures.is_empty(), "{third:?}");
    each_got_it_once(&stack, &members, "cut off");
    assert_eq!(stack.processor.counts().resumed_skips, skipped + members.len() as u64);
}

/// Frames for one recipient — each connection's `welcome` — meeting the account's throttling:
/// nobody answering 429 because the account is over its quota is closed as a slow consumer;
/// every connection is welcomed, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcomes_under_a_throttled_account_close_no_one() {
    let throttled =
        AccountSettings { latency: Duration::from_millis(2), jitter: Duration::ZERO, quota: Some(10.0), burst: 2.0 };
    let mut stack = Stack::as_aws("memory", throttled).await;
    let settings = TenantSettings { presence_announce_max_users: Some(0), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    let ids: Vec<String> = (0..40).map(|i| format!("w{i:02}")).collect();
    for id in &ids {
        assert_eq!(stack.connect(id, "acme", id, "lobby").await.status_code, 200);
    }
    // 40 welcomes at 10 a second: four seconds of 429s, longer than the slow-consumer budget.
    stack.pump().await;
    for id in &ids {
        assert_eq!(stack.recorder.received_action(id, "welcome").len(), 1, "{id} was not welcomed once");
    }
    assert!(stack.recorder.account().throttled() > 0, "the quota never bit: the test shows nothing");
    assert_eq!(stack.recorder.deleted(), Vec::<String>::new(), "a connection was closed for the account's quota");
    assert_eq!(stack.processor.counts().slow_consumers, 0);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// A big fan-out cut off while only its slow clients were left: on redelivery those two are all
/// that remains, and the frame was served to everyone else before, so they are judged slow
/// consumers and closed — the record does not fail again and again until the dead-letter queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_fan_out_left_with_only_slow_clients_closes_them_and_finishes() {
    let fast = AccountSettings { latency: Duration::from_millis(2), jitter: Duration::ZERO, quota: None, burst: 1.0 };
    let mut stack = Stack::as_aws("memory", fast).await;
    let members = room_of(&mut stack, 1100).await;
    let slow = ["m1098", "m1099"];
    for id in slow {
        stack.recorder.script(id, &[429; 10_000]);
    }
    say(&stack, "two are full").await;
    let event = json!({ "Records": stack.table.stream.drain().await });
    // 2.8 s to answer: the others are served at once, the two full clients are still within
    // their 2-second budget when the fan-out's calls must stop (1.4 s).
    let deadline = std::time::Instant::now() + Duration::from_millis(2800);
    let first = stack.processor.handle_event_until(&event, Some(deadline)).await.unwrap();
    assert_eq!(first.batch_item_failures.len(), 1, "cut off with the two full clients unfinished");
    assert!(stack.recorder.deleted().is_empty(), "nobody judged yet: {:?}", stack.recorder.deleted());

    let second = stack.processor.handle_event(&event).await.unwrap();
    assert!(second.batch_item_failures.is_empty(), "the redelivery failed again: {second:?}");
    let mut closed = stack.recorder.deleted();
    closed.sort();
    assert_eq!(closed, slow, "the two full clients are closed as slow consumers");
    let others: Vec<String> = members.iter().filter(|m| !slow.contains(&m.as_str())).cloned().collect();
    each_got_it_once(&stack, &others, "two are full");
}
