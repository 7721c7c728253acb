//! Presence under concurrency and redelivery, on the embedded store and on moto: the handlers
//! write records, the processor applies each membership record to the room's presence state
//! ([`roomcast::presence`]), and a watcher in the room counts what it is told. In every case:
//! exactly one `joined` and one `left` per user and room (frames are told apart by their id, as
//! clients do), and `who` equal to the room's live memberships afterwards.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use chrono::Duration as Age;
use roomcast::deliver::DeliverySettings;
use roomcast::model::{ManualClock, TenantSettings};
use roomcast_tests::{Stack, Table, UnavailableRoom};
use serde_json::json;

roomcast_tests::on_both_stores!(
    two_tabs_join_and_leave_in_one_batch_and_across_batches,
    a_page_reload_in_one_batch_announces_nothing,
    a_redelivered_batch_announces_with_the_same_ids,
    frames_lost_after_presence_was_written_are_sent_on_redelivery,
    one_of_two_tabs_expiring_by_ttl_leaves_the_user_present,
    gone_connections_deleted_by_the_processor_and_by_the_sweeper,
    a_large_room_stops_announcing_but_counts_and_who_stay_exact,
    the_join_ack_and_the_welcome_carry_the_room_as_it_is,
    memberships_from_before_presence_state_seed_the_room,
);

/// The presence events `observer` was told about `user`, each id once (as a client dedupes).
fn events(stack: &Stack, observer: &str, user: &str) -> Vec<String> {
    stack.presence_events(observer, user)
}

/// `who` (paged by `page`) equals the room's live memberships, and its total their count.
async fn who_is_the_live_set(stack: &Stack, asker: &str, room: &str, page: usize) -> Vec<(String, u64)> {
    let (who, total) = stack.who(asker, room, page).await;
    let live = stack.live_set("acme", room).await;
    assert_eq!(who, live, "who must equal the room's live memberships");
    assert_eq!(total, live.len() as u64, "the room's count");
    who
}

async fn two_tabs_join_and_leave_in_one_batch_and_across_batches(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("bob1", "acme", "bob", "general").await;
    stack.pump().await;

    // One batch: both tabs connect; later one batch closes both.
    stack.connect("ann1", "acme", "ann", "general").await;
    stack.connect("ann2", "acme", "ann", "general").await;
    stack.pump_once().await;
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("ann".into(), 2), ("bob".into(), 1)]);
    stack.disconnect("ann1").await;
    stack.disconnect("ann2").await;
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["joined", "left"]);
    who_is_the_live_set(&stack, "bob1", "general", 10).await;

    // Across batches: a tab, a second tab by `join`, then each closes in a batch of its own.
    stack.connect("ann3", "acme", "ann", "general").await;
    stack.pump().await;
    stack.connect("ann4", "acme", "ann", "").await;
    stack.pump().await;
    assert_eq!(stack.send("ann4", json!({"action":"join","room":"general"})).await["action"], "ack");
    stack.pump().await;
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 1).await, [("ann".into(), 2), ("bob".into(), 1)]);
    stack.disconnect("ann3").await;
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["joined", "left", "joined"], "the second tab keeps Ann here");
    assert_eq!(stack.send("ann4", json!({"action":"leave","room":"general"})).await["action"], "ack");
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["joined", "left", "joined", "left"]);
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("bob".into(), 1)]);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

async fn a_page_reload_in_one_batch_announces_nothing(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("bob1", "acme", "bob", "general").await;
    stack.connect("ann-old", "acme", "ann", "general").await;
    stack.pump().await;
    stack.recorder.clear();

    // The reload: the old connection closes and the new one connects; its REMOVE (whose cascade
    // deletes the old membership) and the new membership's INSERT are in one batch, processed
    // concurrently as different partitions.
    stack.disconnect("ann-old").await;
    stack.connect("ann-new", "acme", "ann", "general").await;
    let batch = stack.pump_once().await;
    let names: Vec<_> = batch.iter().map(|r| r.event_name.as_str()).collect();
    assert!(names.contains(&"REMOVE") && names.contains(&"INSERT"), "{names:?}");
    stack.pump().await; // the cascade's membership REMOVE
    assert!(events(&stack, "bob1", "ann").is_empty(), "Ann never left: nothing to announce");
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("ann".into(), 1), ("bob".into(), 1)]);

    stack.disconnect("ann-new").await;
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["left"]);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

async fn a_redelivered_batch_announces_with_the_same_ids(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("bob1", "acme", "bob", "general").await;
    stack.pump().await;
    stack.recorder.clear();

    stack.connect("ann1", "acme", "ann", "general").await;
    stack.connect("ann2", "acme", "ann", "general").await;
    let batch = stack.pump_once().await;
    stack.deliver(&batch).await; // Lambda delivers the same batch again
    stack.deliver(&batch).await; // and again
    let frames = stack.recorder.received_action("bob1", "presence");
    assert!(frames.len() >= 2, "the redelivery sends the last transition again: {frames:?}");
    assert_eq!(events(&stack, "bob1", "ann"), ["joined"], "one id: {frames:?}");
    assert!(stack.processor.counts().presence_redelivered >= 2, "the record at the watermark, each time");
    assert_eq!(stack.processor.counts().presence_joined, 2, "Bob and Ann each joined once");

    stack.disconnect("ann1").await;
    stack.disconnect("ann2").await;
    stack.pump_once().await;
    let cascade = stack.pump_once().await;
    stack.deliver(&cascade).await;
    stack.deliver(&batch).await; // an old batch, late: it changes nothing
    assert_eq!(events(&stack, "bob1", "ann"), ["joined", "left"]);
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("bob".into(), 1)]);
}

/// The record's presence write succeeded, then reading the room failed (the table throttled):
/// the record is reported, Lambda redelivers it, and the `joined` that was never sent goes out
/// then, once, with the record's id.
async fn frames_lost_after_presence_was_written_are_sent_on_redelivery(kind: &str) {
    let clock = ManualClock::starting_now();
    let table = match kind {
        "memory" => Table::memory(clock.clone()).await,
        _ => Table::dynamodb().await,
    };
    let flaky =
        Arc::new(UnavailableRoom { inner: table.store.clone(), room: "general".into(), times: AtomicUsize::new(0) });
    let mut stack = Stack::build_with_store(flaky.table(), table, clock, DeliverySettings::default()).await;
    stack.connect("bob1", "acme", "bob", "general").await;
    stack.pump().await;
    stack.recorder.clear();

    flaky.times.store(1, std::sync::atomic::Ordering::SeqCst);
    stack.connect("ann1", "acme", "ann", "general").await;
    let batch = stack.pump_once().await;
    assert_eq!(stack.failures.len(), 1, "the record is reported for redelivery");
    assert!(events(&stack, "bob1", "ann").is_empty(), "nothing was sent the first time");
    stack.deliver(&batch).await;
    assert_eq!(stack.failures.len(), 1, "the redelivery succeeds");
    assert_eq!(events(&stack, "bob1", "ann"), ["joined"]);
    assert_eq!(stack.processor.counts().presence_joined, 2, "counted once: Bob's and Ann's");
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("ann".into(), 1), ("bob".into(), 1)]);
}

async fn one_of_two_tabs_expiring_by_ttl_leaves_the_user_present(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("bob1", "acme", "bob", "general").await;
    stack.connect("ann1", "acme", "ann", "general").await;
    stack.connect("ann2", "acme", "ann", "general").await;
    stack.pump().await;
    // Bob and Ann's second tab ping; later only the first tab's TTL (600 s) has passed.
    stack.clock.advance(Age::seconds(400));
    assert_eq!(stack.send("bob1", json!({"action":"ping"})).await["action"], "pong");
    assert_eq!(stack.send("ann2", json!({"action":"ping"})).await["action"], "pong");
    stack.clock.advance(Age::seconds(201));
    stack.expire_by_ttl("ann1", "900000000000000000001").await;
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["joined"], "Ann is still here on her second tab");
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("ann".into(), 1), ("bob".into(), 1)]);

    stack.disconnect("ann2").await;
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["joined", "left"]);
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("bob".into(), 1)]);
}

async fn gone_connections_deleted_by_the_processor_and_by_the_sweeper(kind: &str) {
    let mut stack = Stack::on(kind).await;
    for (id, user) in [("bob1", "bob"), ("ann1", "ann"), ("ann2", "ann"), ("cid1", "cid")] {
        stack.connect(id, "acme", user, "general").await;
    }
    stack.pump().await;
    stack.clock.advance(Age::seconds(60)); // past the young-connection window

    // The processor meets a 410 for one of Ann's tabs: deleted, and Ann is still here.
    stack.recorder.script("ann1", &[410]);
    stack.send("bob1", json!({"action":"sendMessage","room":"general","message":"anyone?"})).await;
    stack.pump().await;
    assert_eq!(stack.processor.counts().gone, 1);
    assert_eq!(events(&stack, "bob1", "ann"), ["joined"]);
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await.len(), 3);

    // The sweeper finds her other tab silently gone (its TTL passed; Bob and Cid pinged).
    assert_eq!(stack.send("bob1", json!({"action":"ping"})).await["action"], "pong");
    assert_eq!(stack.send("cid1", json!({"action":"ping"})).await["action"], "pong");
    stack.clock.advance(Age::seconds(545));
    stack.recorder.mark_gone("ann2");
    let admin = stack.admin().await;
    let report = admin.sweep(std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!(report.cleaned, 1, "{report:?}");
    stack.pump().await;
    assert_eq!(events(&stack, "bob1", "ann"), ["joined", "left"]);
    let left = stack.recorder.presence("bob1").into_iter().rfind(|f| f["user_id"] == "ann").unwrap();
    assert_eq!(left["reason"], "expired");
    assert_eq!(who_is_the_live_set(&stack, "bob1", "general", 10).await, [("bob".into(), 1), ("cid".into(), 1)]);
}

async fn a_large_room_stops_announcing_but_counts_and_who_stay_exact(kind: &str) {
    let mut stack = Stack::on(kind).await;
    let settings = TenantSettings { presence_announce_max_users: Some(5), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    stack.connect("watcher", "acme", "watcher", "general").await;
    stack.pump().await;
    for i in 0..8 {
        stack.connect(&format!("u{i}"), "acme", &format!("u{i}"), "general").await;
        stack.pump().await;
    }
    // Up to five users in the room, joins are announced; beyond, they are counted only.
    let announced: Vec<_> = (0..8).filter(|i| !events(&stack, "watcher", &format!("u{i}")).is_empty()).collect();
    assert_eq!(announced, [0, 1, 2, 3], "{:?}", stack.recorder.presence("watcher"));
    assert_eq!(stack.processor.counts().presence_unannounced, 4);
    assert_eq!(who_is_the_live_set(&stack, "watcher", "general", 3).await.len(), 9);
    // Leaving a large room is silent too, until the room is small again.
    for i in 0..5 {
        stack.disconnect(&format!("u{i}")).await;
    }
    stack.pump().await;
    let left: Vec<_> =
        (0..5).filter(|i| events(&stack, "watcher", &format!("u{i}")).contains(&"left".into())).collect();
    assert_eq!(left, [0, 1, 2, 3], "a left is announced exactly when its joined was: no roster keeps a ghost");
    assert_eq!(who_is_the_live_set(&stack, "watcher", "general", 3).await.len(), 4);
}

/// A room whose memberships were written before presence was state (or by an older processor
/// during a rolling deploy): its first record seeds presence from them, announcing nothing, so
/// a second tab of a user already there is no `joined`, and her last tab closing is her `left`.
async fn memberships_from_before_presence_state_seed_the_room(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("bob-old", "acme", "bob", "general").await;
    stack.connect("ann-old", "acme", "ann", "general").await;
    // Their records went by before presence was state: nothing applied them.
    stack.table.stream.drain().await;
    stack.clock.advance(Age::minutes(2));
    stack.connect("ann-new", "acme", "ann", "general").await;
    stack.pump().await;
    assert!(events(&stack, "bob-old", "ann").is_empty(), "Ann was already here");
    assert_eq!(who_is_the_live_set(&stack, "bob-old", "general", 10).await, [("ann".into(), 2), ("bob".into(), 1)]);
    stack.disconnect("ann-old").await;
    stack.pump().await;
    assert!(events(&stack, "bob-old", "ann").is_empty(), "her new tab keeps her here");
    stack.disconnect("ann-new").await;
    stack.pump().await;
    assert_eq!(events(&stack, "bob-old", "ann"), ["left"]);
    assert_eq!(who_is_the_live_set(&stack, "bob-old", "general", 10).await, [("bob".into(), 1)]);
}

async fn the_join_ack_and_the_welcome_carry_the_room_as_it_is(kind: &str) {
    let mut stack = Stack::on(kind).await;
    stack.connect("bob1", "acme", "bob", "general").await;
    stack.connect("cid1", "acme", "cid", "general").await;
    stack.pump().await;
    // A welcome counts the room with its own user in it, whichever way the batch ran.
    stack.connect("ann1", "acme", "ann", "general").await;
    stack.pump().await;
    let welcome = stack.recorder.received_action("ann1", "welcome");
    assert_eq!(welcome[0]["counts"], json!({"general": 3}));

    stack.connect("dan1", "acme", "dan", "").await;
    stack.pump().await;
    let ack = stack.send("dan1", json!({"action":"join","room":"general"})).await;
    assert_eq!(ack["users"], 3, "{ack}");
    // Each with the version of their `joined`, which a client holds later frames against.
    let mut members = ack["members"].clone();
    for m in members.as_array_mut().unwrap() {
        let version = m.as_object_mut().unwrap().remove("version");
        assert!(version.and_then(|v| v.as_u64()).is_some_and(|v| v > 0), "{ack}");
    }
    assert_eq!(
        members,
        json!([{"user_id":"ann","connections":1},{"user_id":"bob","connections":1},{"user_id":"cid","connections":1}])
    );
    let denied = stack.send("dan1", json!({"action":"who","room":"secret"})).await;
    assert_eq!(denied["code"], "not_member");
}

/// A join storm: 150 users join one room (some from a second tab, some leaving from a tab
/// again) while a member talks, and the processor gets it all as one batch (larger than
/// Lambda's 100 records, to hold runs of 99 users). On DynamoDB behind the partition layer, which counts every call per
/// partition key: presence is applied in runs — one read of the room, one of up to 99 users and
/// one transaction each (`presence::plan_run`) — instead of two reads and a write per record,
/// so the room's key takes far fewer calls than there are joins. A room past its announce limit
/// when the batch is handled announces no `joined` (presence counts it, `who` lists it); the
/// message reaches everyone who joined before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_is_applied_in_runs_and_counts_every_user() {
    use roomcast::partitions::{PartitionLimits, Partitions};
    let limits = PartitionLimits { latency: std::time::Duration::ZERO, ..PartitionLimits::default() };
    let partitions = Partitions::start(&roomcast_tests::moto_endpoint(), limits).await.unwrap();
    let table = Table::dynamodb_behind(&partitions).await;
    let mut stack = Stack::build(table, ManualClock::starting_now(), DeliverySettings::default()).await;
    let settings = TenantSettings { presence_announce_max_users: Some(20), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    stack.connect("ann", "acme", "ann", "lobby").await;
    const USERS: usize = 150;
    let tab = |i: usize, second: bool| if second { format!("u{i:03}-tab2") } else { format!("u{i:03}") };
    for i in 0..USERS {
        assert_eq!(stack.connect(&tab(i, false), "acme", &tab(i, false)[..4], "").await.status_code, 200);
        if i % 10 == 0 {
            assert_eq!(stack.connect(&tab(i, true), "acme", &tab(i, false)[..4], "").await.status_code, 200);
        }
    }
    stack.pump().await;

    let join = json!({"action": "join", "room": "lobby"});
    for i in 0..USERS {
        assert_eq!(stack.send(&tab(i, false), join.clone()).await["action"], "ack");
        if i % 10 == 0 {
            assert_eq!(stack.send(&tab(i, true), join.clone()).await["action"], "ack");
        }
        if i % 20 == 5 {
            let leave = json!({"action": "leave", "room": "lobby"});
            assert_eq!(stack.send(&tab(i - 5, false), leave).await["action"], "ack");
        }
        if i == USERS / 2 {
            let sent =
                stack.send("ann", json!({"action": "sendMessage", "room": "lobby", "message": "mid-storm"})).await;
            assert_eq!(sent["action"], "ack", "{sent}");
        }
    }
    partitions.reset();
    stack.pump().await;

    // Every user is present once, whatever tabs they joined and left with.
    let live = stack.live_set("acme", "lobby").await;
    assert_eq!(live.len(), USERS + 1);
    let mut who = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = stack.table.store.who("acme", "lobby", 100, after.as_deref()).await.unwrap();
        assert_eq!(page.total, USERS as u64 + 1, "the room's count");
        who.extend(page.users.iter().map(|(u, n)| (u.clone(), *n as u64)));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(who, live, "presence is the room's live memberships");
    // The room was past its limit of 20 when the batch was handled: no `joined` for anyone (not
    // the limit times the room in frames), no `left` for a tab that leaves while the user's
    // other tab stays; counts exact.
    for i in 0..USERS {
        let user = &tab(i, false)[..4];
        assert_eq!(stack.presence_events("ann", user), Vec::<String>::new(), "{user}");
    }
    let counts = stack.processor.counts();
    assert_eq!(counts.presence_joined, USERS as u64 + 1, "Ann and every user");
    assert_eq!(counts.presence_unannounced, USERS as u64);
    // The message reached every tab in the room when it was sent.
    for i in 0..=USERS / 2 {
        for second in [false, true] {
            let left_before = !second && i % 20 == 0 && i + 5 <= USERS / 2;
            if (second && i % 10 != 0) || left_before {
                continue;
            }
            let got = stack.recorder.received_action(&tab(i, second), "message");
            assert!(got.iter().any(|m| m["message"] == "mid-storm"), "{} missed the message", tab(i, second));
        }
    }
    assert!(counts.presence_ahead > USERS as u64 / 2, "records applied in runs: {counts:?}");
    // Record by record, presence takes two reads and a write per membership record (over 450
    // calls here); in runs, a few calls per 99 records (and a few for each join while the room
    // still announced by its count).
    let presence = partitions.stats("PRESENCE#acme#lobby");
    assert!(presence.calls < USERS as u64, "{presence:?}");
    // The room's own key holds the memberships; presence writes are not charged to it.
    let room = partitions.stats("ROOM#acme#lobby");
    assert_eq!(room.write_units, 0.0, "{room:?}");

    // One of the first users, whose `joined` the room was too big to tell, leaves: no `left`
    // either (a client never hears of someone leaving whom it never heard join).
    assert_eq!(stack.send("u001", json!({"action": "leave", "room": "lobby"})).await["action"], "ack");
    stack.pump().await;
    assert_eq!(stack.presence_events("ann", "u001"), Vec::<String>::new());
    assert_eq!(stack.table.store.room_presence("acme", "lobby").await.unwrap().unwrap().users, USERS as u64);
}

/// Presence written before it had a key of its own (under the room's key, by an older
/// processor) is copied to `PRESENCE#…` the first time the processor handles the room: a user
/// who joined just before the upgrade (too recently for seeding from memberships) is still in
/// `who` and the count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_from_under_the_room_key_is_carried_over() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let mut stack = Stack::dynamodb().await;
    let now = stack.clock_now();
    // What an older processor left: Old's connection, membership, presence and the room's count,
    // all under the room's key, their stream records handled.
    let old = roomcast_tests::test_connection("old-1", "acme", "old", &["lobby"], now);
    let mut presence = roomcast::model::Presence::new("acme", "lobby", "old", now);
    presence.connections.insert("old-1".into());
    presence.ver = 1;
    presence.pk = roomcast::model::room_pk("acme", "lobby");
    let mut count = roomcast::model::RoomPresence::new("acme", "lobby");
    count.users = 1;
    count.ver = 1;
    count.pk = roomcast::model::room_pk("acme", "lobby");
    let sdk = roomcast_tests::sdk_config().await;
    let moto = roomcast::config::dynamodb_client(&sdk, Some(&roomcast_tests::moto_endpoint()));
    let name = stack.table.dynamo.as_ref().unwrap().table().to_string();
    let items: Vec<serde_dynamo::Item> = vec![
        serde_dynamo::to_item(&old).unwrap(),
        serde_dynamo::to_item(old.membership("lobby", roomcast::model::JoinReason::Connect, now)).unwrap(),
        serde_dynamo::to_item(&presence).unwrap(),
        serde_dynamo::to_item(&count).unwrap(),
    ];
    for item in items {
        let item: std::collections::HashMap<String, AttributeValue> = item.into();
        moto.put_item().table_name(&name).set_item(Some(item)).send().await.unwrap();
    }
    stack.table.stream.drain().await;

    assert_eq!(stack.connect("bob", "acme", "bob", "lobby").await.status_code, 200);
    stack.pump().await;
    let page = stack.table.store.who("acme", "lobby", 10, None).await.unwrap();
    assert_eq!(page.users, [("bob".to_string(), 1), ("old".to_string(), 1)]);
    assert_eq!(page.total, 2);
    // Old leaves: her `left` is applied to the copied state.
    stack.disconnect("old-1").await;
    stack.pump().await;
    let page = stack.table.store.who("acme", "lobby", 10, None).await.unwrap();
    assert_eq!((page.users, page.total), (vec![("bob".to_string(), 1)], 1));
}

/// The same guarantees through `roomcast dev`, with real WebSocket clients: the gateway
/// emulator, the stream poller (the embedded store's, or moto's through the Streams API) and the
/// processor posting through the emulator's `@connections`.
mod over_websockets {
    use std::time::Duration;

    use roomcast::gateway::Fault;
    use roomcast_tests::ws::{self, connect, presence, take_all, who_settles_on};
    use serde_json::json;

    roomcast_tests::on_both_stores!(multi_thread:
        a_page_reload_and_a_second_tab_announce_once,
        a_redelivered_batch_is_shown_once,
        a_gone_tab_leaves_the_user_present,
    );

    async fn a_page_reload_and_a_second_tab_announce_once(kind: &str) {
        let stack = ws::dev(kind, |_| {}).await;
        let mut bob = connect(&stack, "acme", "bob", "general").await;
        bob.expect_action("welcome").await;
        let mut ann1 = connect(&stack, "acme", "ann", "general").await;
        ann1.expect_action("welcome").await;
        let joined = bob.expect("ann joined", presence("ann", "joined")).await;
        assert!(joined["id"].as_str().is_some_and(|id| !id.is_empty()), "{joined}");
        assert_eq!(joined["users"], 2);
        let mut ann2 = connect(&stack, "acme", "ann", "general").await;
        ann2.expect_action("welcome").await;

        // A reload of the first tab: it closes as the new one opens.
        ann1.close().await;
        let mut ann3 = connect(&stack, "acme", "ann", "general").await;
        ann3.expect_action("welcome").await;
        who_settles_on(&stack, &mut bob, "general", &[("ann", 2), ("bob", 1)]).await;
        // A marker after all of it: any second `joined` or a `left` of Ann would be before it.
        let mut cid = connect(&stack, "acme", "cid", "general").await;
        cid.expect_action("welcome").await;
        bob.expect("cid joined", presence("cid", "joined")).await;
        assert!(take_all(&mut bob, |f| f["action"] == "presence" && f["user_id"] == "ann").is_empty());

        ann2.close().await;
        ann3.close().await;
        let left = bob.expect("ann left", presence("ann", "left")).await;
        assert_eq!(left["reason"], "disconnect");
        who_settles_on(&stack, &mut bob, "general", &[("bob", 1), ("cid", 1)]).await;
        stack.shutdown().await;
    }

    async fn a_redelivered_batch_is_shown_once(kind: &str) {
        let stack = ws::dev(kind, |o| o.redeliver = true).await;
        let mut bob = connect(&stack, "acme", "bob", "general").await;
        bob.expect_action("welcome").await;
        let mut ann = connect(&stack, "acme", "ann", "general").await;
        ann.expect_action("welcome").await;
        let joined = bob.expect("ann joined", presence("ann", "joined")).await;
        ann.close().await;
        let left = bob.expect("ann left", presence("ann", "left")).await;
        let mut cid = connect(&stack, "acme", "cid", "general").await;
        cid.expect_action("welcome").await;
        bob.expect("cid joined", presence("cid", "joined")).await;
        // Every batch was delivered twice: a repeat carries the first delivery's id, and no
        // other `joined` or `left` of Ann came.
        for repeat in take_all(&mut bob, |f| f["action"] == "presence" && f["user_id"] == "ann") {
            let first = if repeat["event"] == "joined" { &joined } else { &left };
            assert_eq!(repeat, *first, "a repeat is the same frame");
        }
        who_settles_on(&stack, &mut bob, "general", &[("bob", 1), ("cid", 1)]).await;
        stack.shutdown().await;
    }

    async fn a_gone_tab_leaves_the_user_present(kind: &str) {
        let clock = roomcast::model::ManualClock::at(chrono::Utc::now());
        let stack = ws::dev(kind, |o| {
            o.delivery.young_connection = Duration::from_millis(1000);
            o.clock = clock.clone();
        })
        .await;
        let mut bob = connect(&stack, "acme", "bob", "general").await;
        bob.expect_action("welcome").await;
        let mut ann1 = connect(&stack, "acme", "ann", "general").await;
        ann1.expect_action("welcome").await;
        let mut ann2 = connect(&stack, "acme", "ann", "general").await;
        ann2.expect_action("welcome").await;
        bob.expect("ann joined", presence("ann", "joined")).await;
        clock.advance(chrono::Duration::seconds(10)); // nobody is young any more

        // API Gateway answers 410 for Ann's first tab: the processor deletes it.
        let first = ann1.ask(json!({"action":"info"}), "info").await["connection_id"].as_str().unwrap().to_string();
        stack.gateway.faults().inject(Some(&first), Fault::Status(410), 1);
        bob.ask(json!({"action":"sendMessage","room":"general","message":"anyone?"}), "ack").await;
        who_settles_on(&stack, &mut bob, "general", &[("ann", 1), ("bob", 1)]).await;
        assert_eq!(stack.metrics.snapshot().gone, 1);
        bob.ask(json!({"action":"sendMessage","room":"general","message":"marker"}), "ack").await;
        bob.expect_before("the marker", |f| f["message"] == "marker", presence("ann", "left")).await;

        ann2.close().await;
        assert_eq!(bob.expect("ann left", presence("ann", "left")).await["reason"], "disconnect");
        stack.shutdown().await;
    }

    /// Only the embedded store runs TTL: one of Ann's two tabs outlives its TTL on the stack's
    /// clock (the other pinged), and Ann stays present.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_tab_expiring_by_ttl_leaves_the_user_present() {
        let clock = roomcast::model::ManualClock::at(chrono::Utc::now());
        let stack = ws::dev("memory", |o| {
            o.connection_ttl_seconds = 60;
            o.ttl_sweep_every = Duration::from_millis(50);
            o.clock = clock.clone();
        })
        .await;
        let mut bob = connect(&stack, "acme", "bob", "general").await;
        bob.expect_action("welcome").await;
        let mut ann1 = connect(&stack, "acme", "ann", "general").await;
        ann1.expect_action("welcome").await;
        let mut ann2 = connect(&stack, "acme", "ann", "general").await;
        ann2.expect_action("welcome").await;
        bob.expect("ann joined", presence("ann", "joined")).await;
        clock.advance(chrono::Duration::seconds(40));
        bob.ask(json!({"action":"ping"}), "pong").await;
        ann2.ask(json!({"action":"ping"}), "pong").await;
        clock.advance(chrono::Duration::seconds(30)); // the first tab's TTL has passed
        who_settles_on(&stack, &mut bob, "general", &[("ann", 1), ("bob", 1)]).await;
        bob.ask(json!({"action":"sendMessage","room":"general","message":"marker"}), "ack").await;
        bob.expect_before("the marker", |f| f["message"] == "marker", presence("ann", "left")).await;
        drop(ann1);
        stack.shutdown().await;
    }
}
