//! 200 distinct users joining one room at once, on the embedded store and on moto, and through
//! `roomcast dev` over real WebSockets: a watcher is told of each exactly once, and `who` pages
//! through all of them. Its own test binary: on moto, whose transactions copy the whole table,
//! it is slow enough to starve the other tests of one binary that share the server.

use roomcast::model::TenantSettings;
use roomcast_tests::Stack;

roomcast_tests::on_both_stores!(two_hundred_users_joining_at_once_are_each_announced_once);

/// The presence events `observer` was told about `user`, each id once (as a client dedupes).
fn events(stack: &Stack, observer: &str, user: &str) -> Vec<String> {
    stack.presence_events(observer, user)
}

async fn two_hundred_users_joining_at_once_are_each_announced_once(kind: &str) {
    let mut stack = Stack::on(kind).await;
    let settings = TenantSettings { presence_announce_max_users: Some(1000), ..TenantSettings::new("acme") };
    stack.table.store.put_tenant_settings(&settings).await.unwrap();
    stack.connect("watcher", "acme", "watcher", "general").await;
    stack.pump().await;
    let users: Vec<String> = (0..200).map(|i| format!("user{i:03}")).collect();
    for user in &users {
        assert_eq!(stack.connect(user, "acme", user, "general").await.status_code, 200);
    }
    stack.pump().await;
    for user in &users {
        assert_eq!(events(&stack, "watcher", user), ["joined"], "{user}");
    }
    let (who, total) = stack.who("watcher", "general", 64).await;
    assert_eq!(who, stack.live_set("acme", "general").await);
    assert_eq!(total, 201);
    assert_eq!(who.len(), 201);
    assert_eq!(stack.processor.counts().presence_unannounced, 0);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);
}

mod over_websockets {

    use roomcast_tests::ws::{self, connect, presence, take_all, who_settles_on};
    use serde_json::Value;

    /// 200 users connect at once, each on a WebSocket of their own; a watcher is told of each
    /// exactly once, and `who` pages through all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_hundred_users_at_once() {
        let stack = ws::dev("memory", |o| o.presence_announce_max_users = 1000).await;
        let mut watcher = connect(&stack, "acme", "watcher", "general").await;
        watcher.expect_action("welcome").await;
        watcher.expect("the watcher's own joined", presence("watcher", "joined")).await;
        let users: Vec<String> = (0..200).map(|i| format!("user{i:03}")).collect();
        let clients = futures::future::join_all(users.iter().map(|u| connect(&stack, "acme", u, "general"))).await;
        // Each user's `joined`, by id: a delivery may repeat (at least once), an id may not differ.
        let mut ids = std::collections::BTreeMap::<String, String>::new();
        fn note(ids: &mut std::collections::BTreeMap<String, String>, frame: Value) {
            let (user, id) =
                (frame["user_id"].as_str().unwrap().to_string(), frame["id"].as_str().unwrap().to_string());
            let first = ids.entry(user).or_insert_with(|| id.clone());
            assert_eq!(*first, id, "a second joined with another id: {frame}");
        }
        while ids.len() < users.len() {
            note(&mut ids, watcher.expect("a joined", |f| f["action"] == "presence" && f["event"] == "joined").await);
        }
        let mut want: Vec<(String, u64)> = users.iter().map(|u| (u.clone(), 1)).collect();
        want.push(("watcher".into(), 1));
        let want: Vec<(&str, u64)> = want.iter().map(|(u, n)| (u.as_str(), *n)).collect();
        who_settles_on(&stack, &mut watcher, "general", &want).await;
        // A marker: any other `joined` would be before it.
        let mut last = connect(&stack, "acme", "zed", "general").await;
        last.expect_action("welcome").await;
        watcher.expect("zed joined", presence("zed", "joined")).await;
        for frame in take_all(&mut watcher, |f| f["action"] == "presence") {
            assert_eq!(frame["event"], "joined", "{frame}");
            note(&mut ids, frame);
        }
        assert_eq!(ids.len(), 200);
        drop(clients);
        stack.shutdown().await;
    }
}
