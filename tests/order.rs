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

use roomcast::stream::shards::PerItemOrder;
use roomcast_tests::Stack;
use serde_json::json;

roomcast_tests::on_both_stores!(multi_thread: presence_and_messages_hold_under_per_item_order);

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
