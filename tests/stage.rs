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

/// The stream's records given to the processor twice, as Lambda redelivers a batch; neither
/// time reports a record.
async fn handle_twice(stack: &mut Stack) {
    let records = stack.table.stream.drain().await;
    let event = json!({ "Records": records });
    for _ in 0..2 {
        let response = stack.processor.handle_event(&event).await.unwrap();
        assert!(response.batch_item_failures.is_empty());
    }
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
    handle_twice(&mut stack).await;
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

/// The stage as AWS runs it: jobs on an SQS FIFO queue (moto's), worked by the `fanout`
/// function's handler (`deliver::stage::sqs::handle_jobs`) on events built as Lambda's SQS event
/// source builds them. Every member gets the message once, also when its stream record is
/// redelivered after the hand-off (the queue drops the repeated jobs); a message that is not a job
/// is logged, counted and dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_go_through_an_sqs_fifo_queue_to_the_fanout_handler() {
    use roomcast::deliver::stage::sqs::SqsStage;
    let sqs = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&roomcast_tests::sdk_config().await)
            .endpoint_url(roomcast_tests::moto_endpoint())
            .build(),
    );
    let name = format!(
        "fanout-{}-{}.fifo",
        std::process::id(),
        roomcast_tests::TABLES.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    );
    let queue = sqs
        .create_queue()
        .queue_name(&name)
        .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();

    let mut stack = Stack::as_aws("memory", AccountSettings::default()).await;
    let members = room(&mut stack, "big", "b", 600).await;
    let worker = stack.worker_deliverer().await;
    stack.hand_off_to(std::sync::Arc::new(SqsStage::new(sqs.clone(), &queue)), 500).await;
    say(&stack, &members[0], "big", "through the queue").await;
    handle_twice(&mut stack).await;
    let (jobs, reported) = work(&sqs, &queue, &name, &worker, &stack.table.metrics).await;
    assert!(reported.is_empty(), "{reported:?}");
    assert!(jobs >= 2, "{jobs} jobs: 600 members in lanes of up to 500");
    let inboxes = inboxes(&stack);
    for member in &members {
        assert_eq!(inboxes.get(member).map(Vec::as_slice), Some(&["through the queue".to_string()][..]), "{member}");
    }

    // Not a job: it can never succeed, so it is logged, counted and dropped, not retried into the
    // dead-letter queue at the expense of its group.
    sqs.send_message()
        .queue_url(&queue)
        .message_body("{\"not\": \"a job\"}")
        .message_group_id("poison")
        .message_deduplication_id("poison-1")
        .send()
        .await
        .unwrap();
    let (jobs, reported) = work(&sqs, &queue, &name, &worker, &stack.table.metrics).await;
    assert!(reported.is_empty(), "a message that can never be a job is not retried: {reported:?}");
    assert_eq!(jobs, 1);
    let counts = stack.table.metrics.snapshot();
    assert_eq!(counts.fanout_jobs_dropped, 1, "{counts:?}");
}

/// Plays Lambda's SQS event source until the queue is empty: receives up to ten messages, gives
/// them to the `fanout` handler as an SQS event, and deletes them (this test plays each once).
/// The jobs worked, and the bodies of the messages the handler reported.
async fn work(
    sqs: &aws_sdk_sqs::Client,
    queue: &str,
    name: &str,
    worker: &roomcast::deliver::Deliverer,
    metrics: &roomcast::metrics::Metrics,
) -> (usize, Vec<String>) {
    let (mut jobs, mut reported) = (0, Vec::new());
    loop {
        let out = sqs
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(10)
            .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
            .send()
            .await
            .unwrap();
        let messages = out.messages.unwrap_or_default();
        if messages.is_empty() {
            return (jobs, reported);
        }
        let records: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                json!({
                    "messageId": m.message_id, "receiptHandle": m.receipt_handle, "body": m.body,
                    "md5OfBody": m.md5_of_body, "attributes": {}, "messageAttributes": {},
                    "eventSource": "aws:sqs", "eventSourceARN": format!("arn:aws:sqs:us-east-1:123456789012:{name}"),
                    "awsRegion": "us-east-1",
                })
            })
            .collect();
        let event: aws_lambda_events::sqs::SqsEvent = serde_json::from_value(json!({ "Records": records })).unwrap();
        let response = roomcast::deliver::stage::sqs::handle_jobs(worker, metrics, &event, None).await;
        let failed: Vec<String> = response.batch_item_failures.iter().map(|f| f.item_identifier.clone()).collect();
        for m in &messages {
            if failed.contains(m.message_id.as_ref().unwrap()) {
                reported.push(m.body.clone().unwrap());
            } else {
                jobs += 1;
            }
            let handle = m.receipt_handle.clone().unwrap();
            sqs.delete_message().queue_url(queue).receipt_handle(handle).send().await.unwrap();
        }
    }
}

/// The `fanout` handler starts no job in the last seconds of its invocation: it reports it, and
/// every job after it, untouched, so that their retry serves nobody twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fanout_handler_starts_no_job_it_may_not_finish() {
    use roomcast::deliver::stage::sqs::{JOB_RESERVE, handle_jobs};
    let mut stack = Stack::as_aws("memory", AccountSettings::default()).await;
    let members = room(&mut stack, "big", "b", 40).await;
    let worker = stack.worker_deliverer().await;
    let recipients: Vec<roomcast::react::Recipient> = stack
        .table
        .store
        .room_members("acme", "big", stack.clock_now())
        .await
        .unwrap()
        .iter()
        .map(roomcast::react::Recipient::from)
        .collect();
    let payload: roomcast::protocol::ServerMessage = serde_json::from_value(
        json!({"action": "signal", "id": "s1", "room": "big", "user_id": "b0000", "data": "late"}),
    )
    .unwrap();
    let jobs = roomcast::deliver::stage::jobs("acme", "big", "ev#0", &payload, &recipients);
    let records: Vec<serde_json::Value> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| json!({"messageId": format!("m{i}"), "body": serde_json::to_string(job).unwrap(), "eventSource": "aws:sqs"}))
        .collect();
    let event: aws_lambda_events::sqs::SqsEvent = serde_json::from_value(json!({ "Records": records })).unwrap();
    let soon = std::time::Instant::now() + JOB_RESERVE / 2;
    let metrics = stack.table.metrics.clone();
    let response = handle_jobs(&worker, &metrics, &event, Some(soon)).await;
    assert_eq!(response.batch_item_failures.len(), jobs.len(), "every job reported");
    // With time, the same batch serves everyone once.
    let response = handle_jobs(&worker, &metrics, &event, Some(std::time::Instant::now() + JOB_RESERVE * 4)).await;
    assert!(response.batch_item_failures.is_empty());
    for member in &members {
        let got = stack.recorder.received_action(member, "signal");
        assert_eq!(got.len(), 1, "{member}: {got:?}");
    }
}

/// The room decides, not the frame: a signal into a room of 600 goes to its 599 other members,
/// fewer than the threshold of 600, and still goes through the stage, behind the message sent
/// before it, so that each member gets the two in the order they were sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_frame_of_a_big_room_goes_through_its_lanes_in_order() {
    let mut stack = Stack::as_aws("memory", AWS_LIKE).await;
    let members = room(&mut stack, "big", "b", 600).await;
    let stage = stack.hand_off_at(600).await;
    say(&stack, &members[0], "big", "first").await;
    let sent = stack.send(&members[0], json!({"action": "signal", "room": "big", "data": "second"})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
    stack.pump().await;
    stage.idle().await;
    assert_eq!(stack.processor.counts().handed_off, 600 + 599);
    for member in &members[1..] {
        let frames: Vec<String> = stack
            .recorder
            .received(member)
            .into_iter()
            .filter(|f| f["action"] == "message" || f["action"] == "signal")
            .map(|f| f["action"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(frames, ["message", "signal"], "{member}");
    }
}

/// A room of 100,000 (the members written to the table directly: their welcomes are not what
/// this shows). Two messages through the fan-out stage reach every member exactly once each, in
/// the order they were sent, through the room's 32 lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_of_100_000_gets_every_message_once_and_in_order() {
    use roomcast::model::{Connection, JoinReason, Name, NewConnection};
    let mut stack = Stack::as_aws("memory", AccountSettings::default()).await;
    let settings = TenantSettings { presence_announce_max_users: Some(0), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    let (now, tenant) = (stack.clock_now(), Name::parse("tenant", "acme").unwrap());
    for i in 0..100_000 {
        let id = format!("h{i:06}");
        let connection = Connection::new(NewConnection {
            connection_id: &id,
            tenant: &tenant,
            user_id: &id,
            connection_type: None,
            deployment_id: None,
            rooms: std::collections::BTreeSet::from(["huge".to_string()]),
            endpoint: stack.recorder.endpoint.clone(),
            now,
            ttl_seconds: 7200,
        });
        let membership = connection.membership("huge", JoinReason::Connect, now);
        stack.table.store.put_connection(&connection, &[membership]).await.unwrap();
    }
    stack.table.stream.drain().await;
    let stage = stack.hand_off_at(roomcast::deliver::stage::HANDOFF_RECIPIENTS).await;
    for text in ["one", "two"] {
        say(&stack, "h000000", "huge", text).await;
    }
    stack.pump().await;
    stage.idle().await;
    let inboxes = inboxes(&stack);
    assert_eq!(inboxes.len(), 100_000, "members served");
    for (member, got) in &inboxes {
        assert_eq!(got, &["one", "two"], "{member}: each message once, in order");
    }
    let counts = stack.processor.counts();
    assert_eq!((counts.handed_off, counts.failed), (200_000, 0), "{counts:?}");
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// A big room that shrinks below the threshold goes on staging its messages for a while: its
/// next message must not overtake one still queued. Here the room of 600 (threshold 600) loses a
/// member; its next message still goes through the lanes, behind the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_that_shrinks_below_the_threshold_keeps_its_order() {
    let mut stack = Stack::as_aws("memory", AWS_LIKE).await;
    let members = room(&mut stack, "big", "b", 600).await;
    let stage = stack.hand_off_at(600).await;
    say(&stack, &members[0], "big", "first").await;
    stack.pump().await;
    let left = stack.send(&members[599], json!({"action": "leave", "room": "big"})).await;
    assert_eq!(left["action"], "ack", "{left}");
    say(&stack, &members[0], "big", "second").await;
    stack.pump().await;
    stage.idle().await;
    assert_eq!(stack.processor.counts().handed_off, 600 + 599, "the second message was not staged");
    let inboxes = inboxes(&stack);
    for member in &members[..599] {
        assert_eq!(
            inboxes.get(member).map(Vec::as_slice),
            Some(&["first".to_string(), "second".to_string()][..]),
            "{member}"
        );
    }
}
