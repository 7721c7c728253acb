//! Who a message reaches when processor containers keep rooms' rosters (`roomcast::roster`):
//! two containers of the processor over one table, records going to either, as Lambda spreads a
//! stream's shards over containers. A member who joined is served from the next message on, one
//! who left (a `leave`, or a disconnect's cascade) never again, whichever container handles the
//! message and whatever it kept. A steady room's messages do not read the room's memberships:
//! on DynamoDB (moto behind the partition layer, which counts every item read per key) the room's
//! key reads nothing for them; only the roster version's key is read, one item a message.

use std::time::Duration;

use roomcast::deliver::DeliverySettings;
use roomcast::model::ManualClock;
use roomcast::partitions::{PartitionLimits, Partitions};
use roomcast_tests::{Stack, Table};
use serde_json::json;

async fn stack(kind: &str) -> (Stack, Option<Partitions>) {
    match kind {
        "memory" => (Stack::memory().await, None),
        "dynamodb" => {
            let limits = PartitionLimits { latency: Duration::ZERO, ..PartitionLimits::default() };
            let partitions = Partitions::start(&roomcast_tests::moto_endpoint(), limits).await.unwrap();
            let table = Table::dynamodb_behind(&partitions).await;
            let stack = Stack::build(table, ManualClock::starting_now(), DeliverySettings::default()).await;
            (stack, Some(partitions))
        }
        other => panic!("unknown store kind {other}"),
    }
}

fn got(stack: &Stack, connection: &str, text: &str) -> bool {
    stack.recorder.received_action(connection, "message").iter().any(|m| m["message"] == text)
}

async fn say(stack: &Stack, text: &str) {
    let sent = stack.send("ann", json!({"action": "sendMessage", "room": "lobby", "message": text})).await;
    assert_eq!(sent["action"], "ack", "{sent}");
}

async fn two_containers_serve_exactly_the_live_members(kind: &str) {
    let (mut stack, partitions) = stack(kind).await;
    let (one, one_counts) = stack.another_container().await;
    let (two, two_counts) = stack.another_container().await;
    for (id, user) in [("ann", "ann"), ("bob", "bob"), ("dan", "dan")] {
        assert_eq!(stack.connect(id, "acme", user, "lobby").await.status_code, 200);
    }
    stack.pump_into(&one).await;
    // Both containers keep the room.
    say(&stack, "first").await;
    stack.pump_into(&one).await;
    say(&stack, "second").await;
    stack.pump_into(&two).await;
    for member in ["ann", "bob", "dan"] {
        assert!(got(&stack, member, "first") && got(&stack, member, "second"), "{member} missed one");
    }

    // Cal joins through container one; container two, which kept the room before, serves her.
    assert_eq!(stack.connect("cal", "acme", "cal", "").await.status_code, 200);
    assert_eq!(stack.send("cal", json!({"action": "join", "room": "lobby"})).await["action"], "ack");
    stack.pump_into(&one).await;
    say(&stack, "after cal joined").await;
    stack.pump_into(&two).await;
    assert!(got(&stack, "cal", "after cal joined"), "a member who joined is served from the next message on");
    // A join of a room already joined changes no member, and moves nothing: a client repeating
    // it cannot make every container read a big room again.
    let version = || async { stack.table.store.roster_version("acme", "lobby").await.unwrap().unwrap() };
    let before = version().await;
    assert_eq!(stack.send("cal", json!({"action": "join", "room": "lobby"})).await["action"], "ack");
    assert_eq!(version().await, before, "a repeated join moved the version");

    // Bob leaves, handled by two; one, which kept the room with bob in it, serves him no more.
    assert_eq!(stack.send("bob", json!({"action": "leave", "room": "lobby"})).await["action"], "ack");
    stack.pump_into(&two).await;
    // Dan disconnects: the processor removes his membership (the cascade), in container two.
    assert_eq!(stack.disconnect("dan").await.status_code, 200);
    stack.pump_into(&two).await;
    say(&stack, "after bob left").await;
    stack.pump_into(&one).await;
    // The marker: the same message reached the members who stayed, so its fan-out is over.
    assert!(got(&stack, "cal", "after bob left") && got(&stack, "ann", "after bob left"));
    assert!(!got(&stack, "bob", "after bob left"), "a member who left was served");
    assert!(!got(&stack, "dan", "after bob left"), "a disconnected member was served");

    // Container two read the room last before dan went (membership records read their room
    // afresh, not into the roster): its next message reads it again, and keeps it.
    say(&stack, "two catches up").await;
    stack.pump_into(&two).await;
    // A steady room: three messages, each container, no read of the room's memberships.
    let before = (one_counts.snapshot(), two_counts.snapshot());
    if let Some(partitions) = &partitions {
        partitions.reset();
    }
    for (i, container) in [&one, &two, &one].into_iter().enumerate() {
        say(&stack, &format!("steady {i}")).await;
        stack.pump_into(container).await;
    }
    let (one_ran, two_ran) = (one_counts.snapshot().since(&before.0), two_counts.snapshot().since(&before.1));
    // Both read the room last after dan went (one for "after bob left", two for "two catches
    // up"), and the version has not moved since.
    assert_eq!(
        (one_ran.roster_reads, one_ran.roster_kept, two_ran.roster_reads, two_ran.roster_kept),
        (0, 2, 0, 1),
        "one: {one_ran:?}\ntwo: {two_ran:?}"
    );
    for i in 0..3 {
        let text = format!("steady {i}");
        assert!(got(&stack, "ann", &text) && got(&stack, "cal", &text), "{text} missed a member");
        assert!(!got(&stack, "bob", &text) && !got(&stack, "dan", &text), "{text} reached a member who left");
    }
    if let Some(partitions) = &partitions {
        let room = partitions.stats("ROOM#acme#lobby");
        let version = partitions.stats("ROSTER#acme#lobby");
        assert_eq!(room.items_read, 0, "the room's memberships were read for kept messages: {room:?}");
        assert_eq!(version.items_read, 3, "one version read a message: {version:?}");
    }
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_serve_exactly_the_live_members_on_the_embedded_store() {
    two_containers_serve_exactly_the_live_members("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_containers_serve_exactly_the_live_members_on_dynamodb() {
    two_containers_serve_exactly_the_live_members("dynamodb").await;
}
