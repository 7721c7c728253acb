//! The stream as AWS delivers it: order per item only, a room's records on two shards handled by
//! two processors at once, batches delivered twice ([`roomcast::stream::shards::PerItemOrder`]).
//! A property over many seeds, on the embedded store and on moto: clients connect, join, leave,
//! close and send at random; after each round's records are applied,
//!
//! * every message reached exactly the connections in its room when it was sent (as a client
//!   sees it, one copy per id),
//! * `who` and the room's count equal its live memberships,
//! * every user's `joined`/`left`, as a watcher in the room is told them, alternate and end
//!   where the user is.

use std::collections::{BTreeMap, BTreeSet};

use aws_lambda_events::dynamodb::EventRecord;
use roomcast::stream::shards::PerItemOrder;
use roomcast_tests::Stack;
use serde_json::json;

roomcast_tests::on_both_stores!(multi_thread:
    presence_and_messages_hold_under_per_item_order,
    a_remove_redriven_from_the_dead_letter_queue_repairs_presence,
    a_remove_lost_for_good_is_taken_out_by_the_sweeper_within_the_bound,
    a_batchs_webhook_events_are_queued_once_it_is_done_and_again_by_its_retry_if_refused,
);

/// Seeds per store: moto answers a few hundred requests a second, the embedded store thousands.
/// `ROOMCAST_ORDER_SEED=N` runs that seed alone (to follow a failure with `RUST_LOG`).
fn seeds(kind: &str) -> std::ops::Range<u64> {
    if let Some(seed) = std::env::var("ROOMCAST_ORDER_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        return seed..seed + 1;
    }
    match kind {
        "memory" => 0..150,
        _ => 0..15,
    }
}

async fn presence_and_messages_hold_under_per_item_order(kind: &str) {
    for seed in seeds(kind) {
        one_seed(kind, seed).await;
    }
}

/// One client connection of the scenario.
struct Open {
    id: String,
    user: String,
    in_room: bool,
}

async fn one_seed(kind: &str, seed: u64) {
    const ROOM: &str = "r";
    let mut stack = Stack::on(kind).await;
    let (second, _) = stack.another_container().await;
    let mut order = PerItemOrder::new(seed);
    let mut rng = fastrand::Rng::with_seed(seed);
    stack.connect("watch", "acme", "watcher", ROOM).await;
    stack.pump().await;
    let mut open: Vec<Open> = Vec::new();
    let mut made = 0;
    for round in 0..5 {
        let mut texts = Vec::new();
        for step in 0..rng.usize(4..10) {
            let in_room: Vec<usize> = (0..open.len()).filter(|&i| open[i].in_room).collect();
            let out: Vec<usize> = (0..open.len()).filter(|&i| !open[i].in_room).collect();
            match rng.u8(0..6) {
                0 | 1 => {
                    let user = format!("u{}", rng.u8(0..4));
                    let id = format!("{user}-c{made}");
                    made += 1;
                    let joins = rng.u8(0..3) > 0;
                    let response = stack.connect(&id, "acme", &user, if joins { ROOM } else { "" }).await;
                    assert_eq!(response.status_code, 200, "seed {seed}");
                    open.push(Open { id, user, in_room: joins });
                }
                2 if !out.is_empty() => {
                    let i = out[rng.usize(0..out.len())];
                    let answer = stack.send(&open[i].id, json!({"action":"join","room":ROOM})).await;
                    assert_eq!(answer["action"], "ack", "seed {seed}: {answer}");
                    open[i].in_room = true;
                }
                3 if !in_room.is_empty() => {
                    let i = in_room[rng.usize(0..in_room.len())];
                    let answer = stack.send(&open[i].id, json!({"action":"leave","room":ROOM})).await;
                    assert_eq!(answer["action"], "ack", "seed {seed}: {answer}");
                    open[i].in_room = false;
                }
                4 if !open.is_empty() => {
                    let gone = open.swap_remove(rng.usize(0..open.len()));
                    stack.disconnect(&gone.id).await;
                    stack.recorder.close(&gone.id);
                }
                _ => {
                    let sender = match in_room.is_empty() {
                        true => "watch".to_string(),
                        false => open[in_room[rng.usize(0..in_room.len())]].id.clone(),
                    };
                    let text = format!("seed {seed} round {round} step {step}");
                    let answer = stack.send(&sender, json!({"action":"sendMessage","room":ROOM,"message":text})).await;
                    assert_ne!(answer["action"], "error", "seed {seed}: {answer}");
                    texts.push(text);
                }
            }
        }
        // Who a message of this round must reach: the room's members with open connections,
        // as the table holds them when the round's records are handled.
        let mut members: BTreeSet<String> = open.iter().filter(|o| o.in_room).map(|o| o.id.clone()).collect();
        members.insert("watch".into());
        // Past the age at which a 410 is a closed connection, not one whose `$connect` is still
        // under way (those are retried for a while): a closed one is dropped at once.
        stack.clock.advance(chrono::Duration::seconds(6));
        stack.pump_per_item(&mut order, &[&second]).await;
        for text in &texts {
            let reached: BTreeSet<String> = stack
                .recorder
                .calls()
                .into_iter()
                .filter(|c| c.status == 200 && c.body["action"] == "message" && c.body["message"] == *text)
                .map(|c| c.connection_id)
                .collect();
            assert_eq!(reached, members, "seed {seed}: who {text:?} reached");
        }
    }
    assert!(stack.failures.is_empty(), "seed {seed}: {:?}", stack.failures);

    // Presence is the live memberships.
    let (who, total) = stack.who("watch", ROOM, 3).await;
    let live = stack.live_set("acme", ROOM).await;
    assert_eq!(who, live, "seed {seed}: who against the live memberships");
    assert_eq!(total, live.len() as u64, "seed {seed}: the room's count");
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for o in open.iter().filter(|o| o.in_room) {
        *want.entry(o.user.clone()).or_default() += 1;
    }
    want.insert("watcher".into(), 1);
    assert_eq!(live, want.into_iter().collect::<Vec<_>>(), "seed {seed}: the memberships the clients made");

    // What the watcher was told alternates, and ends where each user is.
    for user in ["u0", "u1", "u2", "u3"] {
        let events = stack.presence_events("watch", user);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(event, if i % 2 == 0 { "joined" } else { "left" }, "seed {seed}: {user}: {events:?}");
        }
        let present = live.iter().any(|(u, _)| u == user);
        assert_eq!(events.len() % 2 == 1, present, "seed {seed}: {user}: {events:?}");
    }
}

/// A room with a watcher, Ann and Bob; Ann leaves, and the stream loses her membership's
/// REMOVE (it went to the dead-letter queue): the rest of her records, and later ones, are
/// handled. Returns the lost record.
async fn ann_leaves_and_her_remove_is_lost(stack: &mut Stack) -> EventRecord {
    stack.connect("watch", "acme", "watcher", "r").await;
    stack.connect("ann1", "acme", "ann", "r").await;
    stack.connect("bob1", "acme", "bob", "r").await;
    stack.pump().await;
    assert_eq!(stack.send("ann1", json!({"action":"leave","room":"r"})).await["action"], "ack");
    let records = stack.table.stream.drain().await;
    let is_lost = |r: &EventRecord| {
        r.event_name == "REMOVE" && r.change.keys.get("sk").is_some_and(|sk| format!("{sk:?}").contains("CONN#ann1"))
    };
    let lost = records.iter().find(|r| is_lost(r)).cloned().expect("Ann's membership REMOVE");
    let rest: Vec<EventRecord> = records.into_iter().filter(|r| !is_lost(r)).collect();
    stack.deliver(&rest).await;
    // Later records: Bob's second tab, a message.
    stack.connect("bob2", "acme", "bob", "r").await;
    stack.send("bob1", json!({"action":"sendMessage","room":"r","message":"later"})).await;
    stack.pump().await;
    let (who, _) = stack.who("watch", "r", 10).await;
    assert!(who.iter().any(|(u, _)| u == "ann"), "the lost REMOVE leaves Ann in who: {who:?}");
    lost
}

/// `roomcast replay --execute` re-drives a record from the dead-letter queue with its original
/// sequence number, after later records of the room were applied: presence is repaired, and the
/// watcher is told Ann left.
async fn a_remove_redriven_from_the_dead_letter_queue_repairs_presence(kind: &str) {
    let mut stack = Stack::on(kind).await;
    let lost = ann_leaves_and_her_remove_is_lost(&mut stack).await;
    stack.deliver(std::slice::from_ref(&lost)).await;
    stack.pump().await;
    let (who, total) = stack.who("watch", "r", 10).await;
    assert_eq!(who, stack.live_set("acme", "r").await);
    assert_eq!((who, total), (vec![("bob".to_string(), 2), ("watcher".to_string(), 1)], 2));
    assert_eq!(stack.presence_events("watch", "ann"), ["joined", "left"]);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// A REMOVE never re-driven: the sweeper notes Ann's connection as suspect, and takes it out
/// once it has been suspect for the grace (docs/ARCHITECTURE.md: presence outlives a lost
/// membership by at most the grace plus one sweep). The lost record, re-driven after the
/// repair, changes nothing.
async fn a_remove_lost_for_good_is_taken_out_by_the_sweeper_within_the_bound(kind: &str) {
    let mut stack = Stack::on(kind).await;
    let lost = ann_leaves_and_her_remove_is_lost(&mut stack).await;
    let admin = stack.admin().await;
    let first = admin.sweep(std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!((first.presence_suspected, first.presence_repaired), (1, 0), "{first:?}");
    // The clients keep their connections (and memberships) fresh meanwhile, as clients do,
    // pinging within their TTL; the sweep runs every five minutes.
    let mut waited = 0;
    while waited < roomcast::presence::RECONCILE_GRACE_SECONDS - 1 {
        let step = 300.min(roomcast::presence::RECONCILE_GRACE_SECONDS - 1 - waited);
        stack.clock.advance(chrono::Duration::seconds(step));
        waited += step;
        keep_fresh(&stack).await;
        let report = admin.sweep(std::time::Duration::from_secs(3600)).await.unwrap();
        assert_eq!(report.presence_repaired, 0, "not before the grace: {report:?}");
    }
    let early = admin.sweep(std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!(early.presence_repaired, 0, "not before the grace: {early:?}");
    stack.clock.advance(chrono::Duration::seconds(1));
    keep_fresh(&stack).await;
    let second = admin.sweep(std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!((second.presence_suspected, second.presence_repaired), (1, 1), "{second:?}");
    let (who, total) = stack.who("watch", "r", 10).await;
    assert_eq!(who, stack.live_set("acme", "r").await);
    assert_eq!(total, 2);
    // Nothing left to repair.
    let third = admin.sweep(std::time::Duration::from_secs(3600)).await.unwrap();
    assert_eq!((third.presence_suspected, third.presence_repaired), (0, 0), "{third:?}");

    // The lost record turns up after all: no change, nothing announced. (The marker: a message
    // sent after it reaches the watcher.)
    let told = stack.recorder.presence("watch").len();
    stack.deliver(std::slice::from_ref(&lost)).await;
    stack.send("bob1", json!({"action":"sendMessage","room":"r","message":"marker"})).await;
    stack.pump().await;
    assert!(stack.recorder.received_action("watch", "message").iter().any(|m| m["message"] == "marker"));
    assert_eq!(stack.recorder.presence("watch").len(), told, "the repaired REMOVE announced nothing");
    assert_eq!(stack.who("watch", "r", 10).await, (who, 2));
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

/// Pings from every open connection of [`ann_leaves_and_her_remove_is_lost`]: their connections
/// and memberships stay within their TTL while the clock moves on.
async fn keep_fresh(stack: &Stack) {
    for id in ["watch", "ann1", "bob1", "bob2"] {
        assert_eq!(stack.send(id, json!({"action":"ping"})).await["action"], "pong");
    }
}

/// `roomcast dev --per-item-order SEED`: the local stack delivers its stream as AWS may, and a
/// room of real WebSocket clients still settles on the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roomcast_dev_with_per_item_order_settles_presence_over_websockets() {
    use roomcast_tests::ws;
    for seed in 0..3 {
        let stack = ws::dev("memory", |o| o.per_item_order = Some(seed)).await;
        let mut watch = ws::connect(&stack, "acme", "watcher", "r").await;
        let mut tabs = Vec::new();
        for (user, n) in [("ann", 2), ("bob", 1), ("cid", 2)] {
            for _ in 0..n {
                tabs.push((user, ws::connect(&stack, "acme", user, "r").await));
            }
        }
        // Ann closes both tabs, Cid one of two; Bob leaves by frame.
        let mut kept = Vec::new();
        for (i, (user, mut tab)) in tabs.into_iter().enumerate() {
            match (user, i) {
                ("ann", _) | ("cid", 3) => tab.close().await,
                ("bob", _) => {
                    tab.send(json!({"action":"leave","room":"r"})).await;
                    kept.push(tab);
                }
                _ => kept.push(tab),
            }
        }
        ws::who_settles_on(&stack, &mut watch, "r", &[("cid", 1), ("watcher", 1)]).await;
        drop(kept);
        stack.shutdown().await;
    }
}

/// A webhook sink that refuses its first `refuse` batches and keeps the others.
#[derive(Default)]
struct Sink {
    refuse: std::sync::atomic::AtomicUsize,
    got: std::sync::Mutex<Vec<roomcast::webhook::Queued>>,
}

#[async_trait::async_trait]
impl roomcast::webhook::WebhookSink for Sink {
    async fn enqueue(&self, batch: Vec<roomcast::webhook::Queued>) -> Result<(), roomcast::store::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.refuse.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(roomcast::store::StoreError::Unavailable("the queue refused".into()));
        }
        self.got.lock().unwrap().extend(batch);
        Ok(())
    }
}

/// Webhook events (issue 26) are queued once a batch is done, each tenant's together in the
/// batch's order. A queue that refuses a few times is tried again within the batch; one that
/// keeps refusing gets the batch reported from the first record that made events, and Lambda's
/// retry from there queues every member's and connection's event (a retried transition makes no
/// room event: README, "Webhooks").
async fn a_batchs_webhook_events_are_queued_once_it_is_done_and_again_by_its_retry_if_refused(kind: &str) {
    let mut stack = Stack::on(kind).await;
    for tenant in ["acme", "globex"] {
        let webhook = roomcast::model::WebhookSettings {
            url: "https://hooks.example.com/roomcast".into(),
            secret: "a-webhook-secret-of-16".into(),
            events: Vec::new(),
        };
        let settings =
            roomcast::model::TenantSettings { webhook: Some(webhook), ..roomcast::model::TenantSettings::new(tenant) };
        stack.table.store.put_tenant_settings(&settings).await.unwrap();
    }
    let sink = std::sync::Arc::new(Sink::default());
    sink.refuse.store(2, std::sync::atomic::Ordering::SeqCst);
    stack.processor = stack.assembly(stack.table.metrics.clone()).await.processor().with_webhooks(sink.clone());
    stack.pump().await;
    stack.connect("c-ann", "acme", "ann", "lobby").await;
    stack.connect("c-eve", "globex", "eve", "lobby").await;
    stack.connect("c-bob", "acme", "bob", "lobby").await;
    stack.pump().await;
    // Two refusals: tried again within the batch, nothing reported, everything queued once.
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
    let events = |tenant: &str| -> Vec<(String, String)> {
        sink.got
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.tenant == tenant)
            .flat_map(|q| q.events.iter().map(|e| (e.kind.clone(), e.user_id.clone().unwrap_or_default())))
            .collect()
    };
    let acme = events("acme");
    let mut kinds: Vec<&str> = acme.iter().map(|(k, _)| k.as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec!["connection.opened", "connection.opened", "member.joined", "member.joined", "room.occupied"],
        "{acme:?}"
    );
    // In the batch's order: ann's join (the room's first) before bob's.
    let joined: Vec<&str> = acme.iter().filter(|(k, _)| k == "member.joined").map(|(_, u)| u.as_str()).collect();
    assert_eq!(joined, vec!["ann", "bob"]);
    assert_eq!(events("globex").len(), 3, "{:?}", events("globex"));

    // A queue that keeps refusing: the batch is reported from the first record that made events
    // (a connection's or a membership's, not a rate-limit counter's), and nothing is queued.
    sink.got.lock().unwrap().clear();
    sink.refuse.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    stack.connect("c-cat", "acme", "cat", "lobby").await;
    let records = stack.pump_once().await;
    assert_eq!(stack.failures.len(), 1, "{:?}", stack.failures);
    let pk = |r: &EventRecord| match r.change.keys.get("pk") {
        Some(serde_dynamo::AttributeValue::S(pk)) => pk.clone(),
        _ => String::new(),
    };
    let first = records
        .iter()
        .find(|r| pk(r).starts_with("CONN#") || pk(r).starts_with("ROOM#"))
        .and_then(|r| r.change.sequence_number.clone())
        .expect("a connection's record");
    assert_eq!(stack.failures[0]["batchItemFailures"][0]["itemIdentifier"], first.as_str());
    assert!(sink.got.lock().unwrap().is_empty());
    // Lambda's retry from that record, the queue back: cat's events, once.
    sink.refuse.store(0, std::sync::atomic::Ordering::SeqCst);
    stack.deliver(&records).await;
    assert_eq!(stack.failures.len(), 1, "the retry succeeded: {:?}", stack.failures);
    let mut cat: Vec<(String, String)> = events("acme");
    cat.sort();
    assert_eq!(
        cat,
        vec![("connection.opened".to_string(), "cat".to_string()), ("member.joined".to_string(), "cat".to_string())]
    );
}
