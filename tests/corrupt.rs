//! Items of the table that this processor cannot decode: a field value it does not know (a newer
//! handler wrote it during a rolling deployment), a wrong type (a console edit). Each is logged
//! with its key, counted (`corrupt_items`) and skipped; the rest of the room, the page, the
//! history is served, and no stream record fails for it. On both stores.

use chrono::{DateTime, Duration, Utc};
use roomcast::model::{
    Clock, Connection, FailurePolicy, JoinReason, LeftReason, Message, PluginActive, PluginMeta, SystemClock,
    plugin_chunks,
};
use roomcast_tests::{Stack, Table};
use serde_dynamo::{AttributeValue, Item};
use serde_json::json;

/// The store's own reads, as `store::memory::…` and `store::dynamodb::…`.
mod store {
    use super::*;

    roomcast_tests::on_both_stores!(tables:
        a_membership_from_a_newer_handler_is_served_unless_it_holds_a_value_unknown_here,
        an_item_of_the_wrong_type_is_skipped_by_every_read,
    );
}

roomcast_tests::on_both_stores!(a_room_is_served_past_a_membership_this_processor_cannot_read);

fn connection(id: &str, user: &str, rooms: &[&str], at: DateTime<Utc>) -> Connection {
    roomcast_tests::test_connection(id, "acme", user, rooms, at)
}

async fn connect(table: &Table, c: &Connection, at: DateTime<Utc>) {
    roomcast_tests::put_test_connection(table, c, at).await
}

/// A record's item with some attributes set as a newer handler, or a console edit, would.
fn rewritten<T: serde::Serialize>(record: &T, set: &[(&str, AttributeValue)]) -> Item {
    let mut item: Item = serde_dynamo::to_item(record).unwrap();
    for (name, value) in set {
        item.insert(name.to_string(), value.clone());
    }
    item
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn counted(table: &Table) -> u64 {
    table.metrics.snapshot().corrupt_items
}

fn ids(members: &[roomcast::model::Membership]) -> Vec<&str> {
    members.iter().map(|m| m.connection_id.as_str()).collect()
}

async fn a_membership_from_a_newer_handler_is_served_unless_it_holds_a_value_unknown_here(table: Table) {
    let t = SystemClock.now();
    let people = [connection("c1", "ann", &["general"], t), connection("c2", "bob", &["general"], t)];
    let cid = connection("c3", "cid", &["general"], t);
    for c in people.iter().chain([&cid]) {
        connect(&table, c, t).await;
    }

    // A field this processor does not know is no reason to drop the member.
    let bob = people[1].membership("general", JoinReason::Connect, t);
    table.put_raw(rewritten(&bob, &[("device", s("tablet"))])).await;
    let members = table.store.room_members("acme", "general", t).await.unwrap();
    assert_eq!(ids(&members), ["c1", "c2", "c3"]);
    assert_eq!(members[1], bob, "the unknown field is ignored");
    assert_eq!(counted(&table), 0);

    // A join reason it does not know: that membership alone is skipped, and counted.
    let newer = rewritten(
        &cid.membership("general", JoinReason::Connect, t),
        &[("device", s("tablet")), ("joinReason", s("teleported"))],
    );
    table.put_raw(newer).await;
    let members = table.store.room_members("acme", "general", t).await.unwrap();
    assert_eq!(ids(&members), ["c1", "c2"]);
    assert_eq!(counted(&table), 1);

    // The processor's cascade still removes it, so it is not skipped forever.
    table.store.remove_membership("acme", "general", "c3", LeftReason::Disconnect).await.unwrap();
    assert_eq!(ids(&table.store.room_members("acme", "general", t).await.unwrap()), ["c1", "c2"]);
    assert_eq!(counted(&table), 1, "the removed membership is read no more");
}

async fn an_item_of_the_wrong_type_is_skipped_by_every_read(table: Table) {
    let t = SystemClock.now();
    let number = AttributeValue::N("1700000000".into());
    let good = [connection("c1", "ann", &["general"], t), connection("c2", "ann", &["general"], t)];
    let bad = connection("c9", "ann", &["general"], t);
    for c in good.iter().chain([&bad]) {
        connect(&table, c, t).await;
    }
    table.put_raw(rewritten(&bad, &[("connectedAt", number.clone())])).await;
    table
        .put_raw(rewritten(&bad.membership("general", JoinReason::Connect, t), &[("connectedAt", number.clone())]))
        .await;

    let before = counted(&table);
    assert_eq!(ids(&table.store.room_members("acme", "general", t).await.unwrap()), ["c1", "c2"]);
    assert_eq!(counted(&table) - before, 1, "room_members");

    let before = counted(&table);
    assert_eq!(table.store.get_connection("c9", t).await.unwrap(), None, "as if absent");
    assert_eq!(counted(&table) - before, 1, "get_connection");

    let before = counted(&table);
    let mut ann: Vec<String> =
        table.store.user_connections("acme", "ann", t).await.unwrap().into_iter().map(|c| c.connection_id).collect();
    ann.sort();
    assert_eq!(ann, ["c1", "c2"]);
    assert_eq!(counted(&table) - before, 1, "user_connections");

    // Pages of one, resuming after the last id returned, see every other connection once.
    let before = counted(&table);
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = table.store.scan_connections(1, after.as_deref()).await.unwrap();
        seen.extend(page.iter().map(|c| c.connection_id.clone()));
        if page.is_empty() {
            break;
        }
        after = page.last().map(|c| c.connection_id.clone());
    }
    seen.sort();
    assert_eq!(seen, ["c1", "c2"]);
    assert_eq!(counted(&table) - before, 1, "scan_connections");

    // Messages: the one that does not decode takes no place in the limit.
    let mut sent = Vec::new();
    for i in 0..3 {
        let m = Message::new(&good[0], "general", format!("m{i}"), t + Duration::milliseconds(i), 60);
        table.store.put_message(&m).await.unwrap();
        sent.push(m);
    }
    table.put_raw(rewritten(&sent[1], &[("timestamp", number.clone())])).await;
    let before = counted(&table);
    let bodies: Vec<String> = table
        .store
        .history("acme", "general", &roomcast::store::HistoryFrom::Latest, 2, t, None)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.body)
        .collect();
    assert_eq!(bodies, ["m0", "m2"]);
    assert_eq!(counted(&table) - before, 1, "history");

    // Plugins: a version with a status this processor does not know, a chunk of the wrong type,
    // an active pointer of the wrong type.
    let bytes = vec![7u8; 100];
    let kept = PluginMeta::new("acme", &"ab".repeat(32), bytes.len(), FailurePolicy::Closed, t);
    let newer = PluginMeta::new("acme", &"cd".repeat(32), bytes.len(), FailurePolicy::Closed, t);
    table.store.put_plugin(&kept, &plugin_chunks("acme", &kept.version, &bytes)).await.unwrap();
    let chunks = plugin_chunks("acme", &newer.version, &bytes);
    table.store.put_plugin(&newer, &chunks).await.unwrap();
    table.put_raw(rewritten(&newer, &[("status", s("quarantined"))])).await;
    table.put_raw(rewritten(&chunks[0], &[("data", s("not bytes"))])).await;
    table.put_raw(rewritten(&PluginActive::new("acme", &kept.version), &[("version", number.clone())])).await;

    let before = counted(&table);
    assert_eq!(table.store.plugins("acme").await.unwrap(), vec![kept.clone()]);
    assert_eq!(counted(&table) - before, 1, "plugins");
    let before = counted(&table);
    assert_eq!(table.store.plugin_bytes("acme", &newer.version, 1).await.unwrap(), None, "as if missing");
    assert_eq!(table.store.plugin_bytes("acme", &kept.version, 1).await.unwrap(), Some(bytes));
    assert_eq!(counted(&table) - before, 1, "plugin_bytes");
    let before = counted(&table);
    assert_eq!(table.store.active_plugin("acme").await.unwrap(), None, "as if absent");
    assert_eq!(counted(&table) - before, 1, "active_plugin");

    // Writes reach such an item as DynamoDB's update expressions do; what they would answer
    // with it is `None`.
    assert_eq!(table.store.set_status("c9", "DISCONNECTED").await.unwrap(), None);
    assert_eq!(table.store.delete_connection("c9", Some(LeftReason::Gone)).await.unwrap(), None);
    let before = counted(&table);
    assert_eq!(table.store.scan_connections(10, None).await.unwrap().len(), 2);
    assert_eq!(counted(&table) - before, 0, "the connection record is deleted");
}

async fn a_room_is_served_past_a_membership_this_processor_cannot_read(kind: &str) {
    let mut stack = Stack::on(kind).await;
    for (id, user) in [("ann1", "ann"), ("bob1", "bob"), ("cid1", "cid")] {
        stack.connect(id, "acme", user, "general").await;
    }
    stack.pump().await;
    stack.recorder.clear();

    // cid's membership, as a newer handler writes it.
    let members = stack.table.store.room_members("acme", "general", stack.clock_now()).await.unwrap();
    let cid = members.iter().find(|m| m.connection_id == "cid1").expect("cid's membership");
    stack.table.put_raw(rewritten(cid, &[("device", s("tablet")), ("joinReason", s("teleported"))])).await;
    // Which, like every membership write, moves the room's roster version on.
    stack.table.store.bump_roster("acme", "general").await.unwrap();

    stack.send("ann1", json!({"action":"sendMessage","room":"general","message":"hello"})).await;
    stack.pump().await;
    assert!(stack.failures.is_empty(), "no record fails for an item that does not decode: {:?}", stack.failures);
    let bodies: Vec<_> =
        stack.recorder.received_action("bob1", "message").into_iter().map(|m| m["message"].clone()).collect();
    assert_eq!(bodies, [json!("hello")]);
    assert!(stack.recorder.received("cid1").is_empty(), "the member it cannot read is not served");
    let counts = stack.processor.counts();
    assert!(counts.corrupt_items >= 1, "{counts:?}");
    assert_eq!(counts.platform_failures, 0);
}
