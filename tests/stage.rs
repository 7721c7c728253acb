//! The fan-out stage (`roomcast::deliver::stage`): a frame for a big room leaves the stream batch
//! as jobs on a queue, worked by workers of their own, so that the batch — and the next batch of
//! the shard, with every other room and tenant on it — does not wait for it. Here the stage is
//! the in-process one `roomcast dev` runs; `@connections` answers as from a Lambda in its region
//! (20 ms a call) under an account quota, so that a big fan-out takes seconds.

use std::collections::HashMap;
use std::time::Duration;

use roomcast::gateway::account::AccountSettings;
use roomcast::model::TenantSettings;
use roomcast_tests::Stack;
use serde_json::json;

const AWS_LIKE: AccountSettings =
    AccountSettings { latency: Duration::from_millis(20), jitter: Duration::from_millis(5), quota: None, burst: 1.0 };

/// `size` members of tenant `acme` in `room` (`{prefix}0000`, …), each its own user; presence is
/// not announced, so that the only fan-out is the messages'.
async fn room(stack: &mut Stack, room: &str, prefix: &str, size: usize) -> Vec<String> {
    let settings = TenantSettings { presence_announce_max_users: Some(0), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    let members: Vec<String> = (0..size).map(|i| format!("{prefix}{i:04}")).collect();
    for member in &members {
        assert_eq!(stack.connect(member, "acme", member, room).await.status_code, 200);
    }
    stack.pump().await;
    members
}

async fn say(stack: &Stack, from: &str, room: &str, text: &str) {
    let sent = stack.send(from, json!({"action": "sendMessage", "room": room, "message": text})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
}

/// Each connection's `message` frames accepted so far, in arrival order (one copy of the calls).
fn inboxes(stack: &Stack) -> HashMap<String, Vec<String>> {
    let mut inboxes: HashMap<String, Vec<String>> = HashMap::new();
    for call in stack.recorder.calls() {
        if call.status == 200 && call.body["action"] == "message" {
            let text = call.body["message"].as_str().unwrap_or_default().to_string();
            inboxes.entry(call.connection_id).or_default().push(text);
        }
    }
    inboxes
}

/// Waits for `done`, for at most two minutes.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..6_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within two minutes");
}

/// One batch holds 20 messages to a room of 1,000; the next batch one message to a room of 10.
/// Lambda gives a shard's next batch only when the last one has answered: without the stage the
/// small room waits for all 20,000 deliveries. With it, the first batch answers once its jobs
/// are queued, and the small room's members are served while the big room's fan-out is still
/// going — which then serves every member each message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_s_fan_out_leaves_the_batch_and_holds_up_no_other_room() {
    let mut stack = Stack::as_aws("memory", AWS_LIKE).await;
    let big = room(&mut stack, "big", "b", 1_000).await;
    let small = room(&mut stack, "small", "s", 10).await;
    let stage = stack.hand_off_at(500).await;
    // 4,000 calls a second from here on: the big room's 20,000 deliveries take five seconds.
    stack.recorder.account().set_quota(Some(4_000.0), 400.0);

    for i in 0..20 {
        say(&stack, &big[0], "big", &format!("big {i:02}")).await;
    }
    stack.pump().await;
    say(&stack, &small[0], "small", "small news").await;
    stack.pump().await;

    until("the small room's message", || {
        let inboxes = inboxes(&stack);
        small.iter().all(|m| inboxes.get(m).is_some_and(|got| got == &["small news"]))
    })
    .await;
    let now = inboxes(&stack);
    let served: usize = big.iter().map(|m| now.get(m).map_or(0, Vec::len)).sum();
    assert!(served < 20_000, "the big room's fan-out was done ({served} deliveries) before the small room was served");

    stage.idle().await;
    let want: Vec<String> = (0..20).map(|i| format!("big {i:02}")).collect();
    let after = inboxes(&stack);
    for member in &big {
        assert_eq!(after.get(member), Some(&want), "{member}: each message once, in order");
    }
    let counts = stack.processor.counts();
    assert_eq!(counts.handed_off, 20_000, "{counts:?}");
    assert_eq!(counts.failed + counts.slow_consumers, 0, "{counts:?}");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// A stream record redelivered after its hand-off (Lambda retries a batch after a later record's
/// failure or a timeout) queues nothing twice: every member gets the message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_record_queues_nothing_twice() {
    let mut stack = Stack::as_aws("memory", AccountSettings::default()).await;
    let members = room(&mut stack, "big", "b", 600).await;
    let stage = stack.hand_off_at(500).await;
    say(&stack, &members[0], "big", "once").await;
    let records = stack.table.stream.drain().await;
    let event = json!({ "Records": records });
    for _ in 0..2 {
        let response = stack.processor.handle_event(&event).await.unwrap();
        assert!(response.batch_item_failures.is_empty());
    }
    stage.idle().await;
    // A marker through the same lanes: when it has reached everyone, nothing else is queued.
    say(&stack, &members[0], "big", "marker").await;
    stack.pump().await;
    stage.idle().await;
    let inboxes = inboxes(&stack);
    for member in &members {
        assert_eq!(
            inboxes.get(member).map(Vec::as_slice),
            Some(&["once".to_string(), "marker".to_string()][..]),
            "{member}"
        );
    }
    // The processor handed the redelivered record's recipients off again (it cannot know); the
    // stage dropped them as repeats.
    assert_eq!(stack.processor.counts().handed_off, 3 * 600);
}
