//! The store contract: one suite, run against the embedded store and against a real DynamoDB API
//! (moto), including what each writes to its stream. An adapter that passes it can stand in for
//! the other. Per port of the table (`roomcast::store`):
//!
//! | port | its contract |
//! |---|---|
//! | `ConnectionStore` | `a_connection_round_trips…`, `delete_is_idempotent…`, `touch_refreshes…`, `a_connections_claims…`, `connections_by_user…` |
//! | `MembershipStore` | `join_and_leave…`, `join_or_touch_without_a_connection…`, `room_members_are_live…` |
//! | `HistoryStore` | `history_is_ordered…`, `an_idempotency_key_writes_once…` |
//! | `PresenceStore` | `presence_changes_atomically…`, `presence_redelivery_and_who_pages…` |
//! | `PluginStore` | `a_large_plugin_is_chunked…` |
//! | `TenantStore` | `a_tenants_settings_and_identity_round_trip…` |
//! | `UpkeepStore` | `the_sweep_lease_has_one_owner…`, `fan_out_progress_round_trips…` |
//! | the stream | `the_stream_carries_every_write…` (and each test's records where it checks them) |

use std::collections::BTreeSet;

use aws_lambda_events::dynamodb::EventRecord;
use chrono::{DateTime, Duration, Utc};
use roomcast::model::{Connection, JoinReason, LeftReason, Message, TenantSettings};
use roomcast::presence::{PresenceOp, PresenceUpdate};
use roomcast::protocol::PresenceEvent;
use roomcast::store::{HistoryFrom, StoreError};
use roomcast::stream::{Cause, Change, Record};
use roomcast_tests::Table;

roomcast_tests::on_both_stores!(tables:
    a_connection_round_trips_and_expires_on_read,
    delete_is_idempotent_and_marks_the_reason_in_the_remove_record,
    join_and_leave_keep_membership_and_rooms_in_step,
    join_or_touch_without_a_connection_writes_nothing,
    touch_refreshes_the_ttl_of_the_connection_and_its_memberships,
    a_connections_claims_are_replaced_in_place_and_only_if_it_exists,
    room_members_are_live_and_per_tenant,
    history_is_ordered_limited_and_paged,
    the_stream_carries_every_write_in_order_with_both_images,
    connections_by_user_scan_pages_and_status,
    a_large_plugin_is_chunked_under_the_item_limit_and_reassembled,
    presence_changes_atomically_under_concurrent_writers,
    presence_redelivery_and_who_pages_and_settings,
    an_idempotency_key_writes_once_within_its_window,
    fan_out_progress_round_trips_and_its_records_are_state,
    a_tenants_settings_and_identity_round_trip_and_stay_apart,
    the_sweep_lease_has_one_owner_at_a_time_and_counters_count_per_window,
    the_active_pointer_moves_conditionally_only_from_the_one_expected,
);

/// `set_active_plugin_if` (an upload's activation): from no pointer, from a pointer's revision,
/// from a pointer written before revisions (by the version it names) — and never from another.
async fn the_active_pointer_moves_conditionally_only_from_the_one_expected(table: Table) {
    use roomcast::model::{NO_POINTER, PluginActive};
    let store = &table.store;
    assert!(
        !store.set_active_plugin_if(&PluginActive::new("acme", "v1"), "some-revision").await.unwrap(),
        "there is none"
    );
    assert!(store.set_active_plugin_if(&PluginActive::new("acme", "v1"), NO_POINTER).await.unwrap());
    let first = store.active_plugin("acme").await.unwrap();
    assert_eq!(first.as_ref().map(|a| a.version.as_str()), Some("v1"));
    assert!(
        !store.set_active_plugin_if(&PluginActive::new("acme", "v2"), NO_POINTER).await.unwrap(),
        "there is one now"
    );
    store.set_active_plugin("acme", Some("v0")).await.unwrap();
    assert!(
        !store
            .set_active_plugin_if(&PluginActive::new("acme", "v2"), &PluginActive::token(first.as_ref()))
            .await
            .unwrap(),
        "moved on"
    );
    let now = store.active_plugin("acme").await.unwrap();
    assert!(
        store.set_active_plugin_if(&PluginActive::new("acme", "v2"), &PluginActive::token(now.as_ref())).await.unwrap()
    );
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, "v2");
    let unrevised = PluginActive { revision: None, ..PluginActive::new("acme", "v2") };
    assert_eq!(PluginActive::token(Some(&unrevised)), "version:v2");
    assert!(store.set_active_plugin_if(&PluginActive::new("globex", "v9"), NO_POINTER).await.unwrap(), "tenants apart");
    assert_eq!(store.active_plugin("acme").await.unwrap().unwrap().version, "v2");
}

fn now() -> DateTime<Utc> {
    use roomcast::model::Clock;
    roomcast::model::SystemClock.now()
}

fn connection(id: &str, tenant: &str, user: &str, rooms: &[&str], at: DateTime<Utc>) -> Connection {
    roomcast_tests::test_connection(id, tenant, user, rooms, at)
}

async fn connect(table: &Table, c: &Connection, at: DateTime<Utc>) {
    roomcast_tests::put_test_connection(table, c, at).await
}

async fn a_connection_round_trips_and_expires_on_read(table: Table) {
    let t = now();
    let c = connection("c1=", "acme", "ann", &["general"], t);
    connect(&table, &c, t).await;
    assert_eq!(table.store.get_connection("c1=", t).await.unwrap(), Some(c.clone()));
    assert_eq!(table.store.get_connection("nobody", t).await.unwrap(), None);
    // `ttl <= now` is gone even though nothing deleted it yet.
    let at_ttl = t + Duration::seconds(600);
    assert_eq!(table.store.get_connection("c1=", at_ttl).await.unwrap(), None);
    assert!(table.store.room_members("acme", "general", at_ttl).await.unwrap().is_empty());
}

async fn delete_is_idempotent_and_marks_the_reason_in_the_remove_record(mut table: Table) {
    let t = now();
    let c = connection("c1", "acme", "ann", &[], t);
    connect(&table, &c, t).await;
    let deleted = table.store.delete_connection("c1", Some(LeftReason::Gone)).await.unwrap();
    assert_eq!(deleted.map(|d| d.close_reason), Some(Some("gone".to_string())));
    assert_eq!(table.store.delete_connection("c1", None).await.unwrap(), None);
    assert_eq!(table.store.delete_connection("never", Some(LeftReason::Gone)).await.unwrap(), None);

    let changes = changes(&mut table).await;
    let Some(Change::Removed { old: Record::Connection(old), cause: Cause::Client }) = changes.last() else {
        panic!("expected the connection's REMOVE last: {changes:?}")
    };
    assert_eq!(old.close_reason.as_deref(), Some("gone"));
}

async fn join_and_leave_keep_membership_and_rooms_in_step(table: Table) {
    let t = now();
    let c = connection("c1", "acme", "ann", &[], t);
    connect(&table, &c, t).await;
    table.store.join(&c.membership("ops", JoinReason::Join, t)).await.unwrap();
    let joined = table.store.get_connection("c1", t).await.unwrap().unwrap();
    assert_eq!(joined.rooms, BTreeSet::from(["ops".to_string()]));
    let members = table.store.room_members("acme", "ops", t).await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].join_reason, JoinReason::Join);

    table.store.leave("c1", "acme", "ops").await.unwrap();
    assert!(table.store.get_connection("c1", t).await.unwrap().unwrap().rooms.is_empty());
    assert!(table.store.room_members("acme", "ops", t).await.unwrap().is_empty());
}

async fn join_or_touch_without_a_connection_writes_nothing(table: Table) {
    let t = now();
    let ghost = connection("ghost", "acme", "ann", &["general"], t);
    let err = table.store.join(&ghost.membership("ops", JoinReason::Join, t)).await.unwrap_err();
    assert!(matches!(err, StoreError::NoConnection(ref id) if id == "ghost"), "{err}");
    assert!(!err.is_platform());
    assert!(table.store.room_members("acme", "ops", t).await.unwrap().is_empty(), "the transaction wrote nothing");
    assert!(matches!(table.store.leave("ghost", "acme", "ops").await, Err(StoreError::NoConnection(_))));
    assert!(matches!(table.store.touch(&ghost, t, 0).await, Err(StoreError::NoConnection(_))));
}

async fn touch_refreshes_the_ttl_of_the_connection_and_its_memberships(table: Table) {
    let t = now();
    let c = connection("c1", "acme", "ann", &["a", "b"], t);
    connect(&table, &c, t).await;
    let later = t + Duration::seconds(500);
    table.store.touch(&c, later, roomcast::model::expiry(later, 600)).await.unwrap();
    let past_first_ttl = t + Duration::seconds(700);
    let refreshed = table.store.get_connection("c1", past_first_ttl).await.unwrap().expect("still live");
    assert_eq!(refreshed.last_seen_at, later);
    for room in ["a", "b"] {
        assert_eq!(table.store.room_members("acme", room, past_first_ttl).await.unwrap().len(), 1, "{room}");
    }
}

async fn a_connections_claims_are_replaced_in_place_and_only_if_it_exists(table: Table) {
    let t = now();
    let mut c = connection("c1", "acme", "ann", &["a"], t);
    c.claims = [("exp".to_string(), "100".to_string()), ("plan".to_string(), "free".to_string())].into();
    connect(&table, &c, t).await;
    let new: std::collections::BTreeMap<String, String> = [("exp".to_string(), "900".to_string())].into();
    assert!(table.store.set_claims("c1", &new).await.unwrap());
    let read = table.store.get_connection("c1", t).await.unwrap().expect("live");
    assert_eq!(read.claims, new, "replaced, not merged");
    assert_eq!((read.rooms.len(), read.user_id.as_str()), (1, "ann"), "nothing else changed");
    assert!(table.store.set_claims("c1", &Default::default()).await.unwrap());
    assert!(table.store.get_connection("c1", t).await.unwrap().unwrap().claims.is_empty());
    assert!(!table.store.set_claims("nobody", &new).await.unwrap(), "no record, nothing written");
    assert!(table.store.get_connection("nobody", t).await.unwrap().is_none());
}

async fn room_members_are_live_and_per_tenant(table: Table) {
    let t = now();
    for (id, tenant, user) in [("c3", "acme", "cid"), ("c1", "acme", "ann"), ("c2", "globex", "bob")] {
        connect(&table, &connection(id, tenant, user, &["general"], t), t).await;
    }
    let members = table.store.room_members("acme", "general", t).await.unwrap();
    let ids: Vec<_> = members.iter().map(|m| m.connection_id.as_str()).collect();
    assert_eq!(ids, ["c1", "c3"], "ordered by connection id, and only this tenant's");
    assert_eq!(members[0].endpoint, "https://abc.execute-api.us-east-1.amazonaws.com/prod");
    table.store.remove_membership("acme", "general", "c1", LeftReason::Disconnect).await.unwrap();
    table.store.remove_membership("acme", "general", "c1", LeftReason::Disconnect).await.unwrap();
    assert_eq!(table.store.room_members("acme", "general", t).await.unwrap().len(), 1);
}

async fn history_is_ordered_limited_and_paged(table: Table) {
    let t = now();
    let c = connection("c1", "acme", "ann", &["general"], t);
    connect(&table, &c, t).await;
    let mut sent = Vec::new();
    for i in 0..5 {
        let m = Message::new(&c, "general", format!("m{i}"), t + Duration::milliseconds(i), 60);
        table.store.put_message(&m).await.unwrap();
        sent.push(m);
    }
    let other_tenant = connection("c2", "globex", "bob", &["general"], t);
    table.store.put_message(&Message::new(&other_tenant, "general", "theirs".into(), t, 60)).await.unwrap();

    let bodies = |ms: Vec<Message>| ms.into_iter().map(|m| m.body).collect::<Vec<_>>();
    assert_eq!(
        bodies(table.store.history("acme", "general", &HistoryFrom::Latest, 10, t, None).await.unwrap()),
        ["m0", "m1", "m2", "m3", "m4"]
    );
    assert_eq!(
        bodies(table.store.history("acme", "general", &HistoryFrom::Latest, 2, t, None).await.unwrap()),
        ["m3", "m4"]
    );
    let before = sent[3].sk.clone();
    assert_eq!(
        bodies(table.store.history("acme", "general", &HistoryFrom::Before(before), 2, t, None).await.unwrap()),
        ["m1", "m2"]
    );
    let after = sent[1].sk.clone();
    assert_eq!(
        bodies(table.store.history("acme", "general", &HistoryFrom::After(after), 2, t, None).await.unwrap()),
        ["m2", "m3"]
    );
    // One message by its key; and by its id, which gives the key.
    let key = roomcast::model::message_sk_of_id(&sent[2].id).unwrap();
    assert_eq!(key, sent[2].sk);
    assert_eq!(table.store.message("acme", "general", &key, t).await.unwrap().map(|m| m.body), Some("m2".into()));
    assert_eq!(table.store.message("globex", "general", &key, t).await.unwrap(), None);
    assert!(
        table
            .store
            .history("acme", "general", &HistoryFrom::Latest, 10, t + Duration::seconds(61), None)
            .await
            .unwrap()
            .is_empty(),
        "expired"
    );

    // Many messages in one millisecond keep the order they were sent in.
    let burst_at = t + Duration::seconds(1);
    for i in 0..20 {
        table.store.put_message(&Message::new(&c, "burst", format!("b{i:02}"), burst_at, 60)).await.unwrap();
    }
    let burst = bodies(table.store.history("acme", "burst", &HistoryFrom::Latest, 50, t, None).await.unwrap());
    assert_eq!(burst, (0..20).map(|i| format!("b{i:02}")).collect::<Vec<_>>());
    // Paged three at a time across the burst's one millisecond, forward and backward: nothing
    // skipped or repeated.
    let all = table.store.history("acme", "burst", &HistoryFrom::Latest, 50, t, None).await.unwrap();
    let mut forward = Vec::new();
    let mut from = HistoryFrom::After("MSG#".into());
    loop {
        let page = table.store.history("acme", "burst", &from, 3, t, None).await.unwrap();
        let Some(last) = page.last() else { break };
        from = HistoryFrom::After(last.sk.clone());
        forward.extend(page.into_iter().map(|m| m.body));
    }
    assert_eq!(forward, bodies(all.clone()));
    let mut backward = Vec::new();
    let mut from = HistoryFrom::Latest;
    loop {
        let page = table.store.history("acme", "burst", &from, 3, t, None).await.unwrap();
        let Some(first) = page.first() else { break };
        from = HistoryFrom::Before(first.sk.clone());
        backward.splice(0..0, page.into_iter().map(|m| m.body));
    }
    assert_eq!(backward, bodies(all));
}

async fn an_idempotency_key_writes_once_within_its_window(mut table: Table) {
    let t = now();
    let c = connection("c1", "acme", "ann", &["general"], t);
    connect(&table, &c, t).await;
    drain(&mut table).await;
    let first = Message::new(&c, "general", "once".into(), t, 60);
    let record = roomcast::model::IdempotencyRecord::new(&first, "order-42", t, 300);
    assert_eq!(table.store.put_message_once(&first, &record, t).await.unwrap().id, first.id);
    // A repeat within the window: nothing written, the first id answered.
    let again = Message::new(&c, "general", "once".into(), t + Duration::seconds(10), 60);
    let repeat = roomcast::model::IdempotencyRecord::new(&again, "order-42", t + Duration::seconds(10), 300);
    assert_eq!(table.store.put_message_once(&again, &repeat, t + Duration::seconds(10)).await.unwrap().id, first.id);
    // Another user's same key is another key: it cannot claim or learn Ann's.
    let bob = connection("c3", "acme", "bob", &["general"], t);
    let bobs = Message::new(&bob, "general", "mine".into(), t, 60);
    let record = roomcast::model::IdempotencyRecord::new(&bobs, "order-42", t, 300);
    assert_eq!(table.store.put_message_once(&bobs, &record, t).await.unwrap().id, bobs.id);
    // The same key in another tenant is another key.
    let theirs = Message::new(&connection("c2", "globex", "bob", &["general"], t), "general", "x".into(), t, 60);
    let record = roomcast::model::IdempotencyRecord::new(&theirs, "order-42", t, 300);
    assert_eq!(table.store.put_message_once(&theirs, &record, t).await.unwrap().id, theirs.id);
    // After the window the key writes again.
    let later_at = t + Duration::seconds(301);
    let later = Message::new(&c, "general", "once more".into(), later_at, 60);
    let record = roomcast::model::IdempotencyRecord::new(&later, "order-42", later_at, 300);
    assert_eq!(table.store.put_message_once(&later, &record, later_at).await.unwrap().id, later.id);
    let messages: Vec<_> = changes(&mut table)
        .await
        .into_iter()
        .filter_map(|c| match c {
            Change::Inserted(Record::Message(m)) => Some(m.body),
            _ => None,
        })
        .collect();
    assert_eq!(messages, ["once", "mine", "x", "once more"], "the repeat wrote no message");
}

async fn the_stream_carries_every_write_in_order_with_both_images(mut table: Table) {
    let t = now();
    let c = connection("c1", "acme", "ann", &["general"], t);
    connect(&table, &c, t).await;
    table.store.join(&c.membership("ops", JoinReason::Join, t)).await.unwrap();
    table.store.delete_connection("c1", None).await.unwrap();

    let all = drain(&mut table).await;
    // Each membership write is followed by a bump of its room's roster version, an item of its
    // own: on DynamoDB its own stream records (moto writes two INSERTs for an update that creates
    // an item, DynamoDB one); the embedded store keeps versions out of its stream.
    let key = |r: &EventRecord| roomcast::stream::partition_key(r).unwrap_or("").to_string();
    let versions: Vec<String> = all.iter().map(key).filter(|k| k.starts_with("ROSTER#")).collect();
    let mut rooms: Vec<String> = versions.clone();
    rooms.dedup();
    match table.kind {
        "memory" => assert!(versions.is_empty(), "{versions:?}"),
        _ => assert_eq!(
            rooms,
            ["ROSTER#acme#general", "ROSTER#acme#ops"],
            "one version a room, bumped on connect and join"
        ),
    }
    for room in ["general", "ops"] {
        let v = table.store.roster_version("acme", room).await.unwrap();
        assert_eq!(v, Some(1), "{} {room}: one membership write each, and the disconnect none", table.kind);
    }
    let records: Vec<EventRecord> = all.iter().filter(|r| !key(r).starts_with("ROSTER#")).cloned().collect();
    let names: Vec<(&str, String)> = records
        .iter()
        .map(|r| (r.event_name.as_str(), roomcast::stream::partition_key(r).unwrap_or("").to_string()))
        .collect();
    let expected = [
        ("INSERT", "CONN#c1"),
        ("INSERT", "ROOM#acme#general"),
        ("INSERT", "ROOM#acme#ops"),
        ("MODIFY", "CONN#c1"),
        ("REMOVE", "CONN#c1"),
    ];
    let expected: Vec<(&str, String)> = expected.iter().map(|(n, k)| (*n, k.to_string())).collect();
    assert_eq!(names, expected, "{} stream", table.kind);

    let sequences: Vec<&str> = all.iter().map(|r| r.change.sequence_number.as_deref().unwrap()).collect();
    assert!(
        sequences.windows(2).all(|w| w[0].len() < w[1].len() || (w[0].len() == w[1].len() && w[0] < w[1])),
        "{sequences:?}"
    );
    for r in &all {
        assert_eq!(r.event_source.as_deref(), Some("aws:dynamodb"));
        assert!(r.user_identity.is_none(), "client writes carry no service identity");
        assert_eq!(r.change.stream_view_type, Some(aws_lambda_events::dynamodb::StreamViewType::NewAndOldImages));
    }
    let modify = &records[3];
    assert!(!modify.change.old_image.is_empty() && !modify.change.new_image.is_empty());
    let Change::Modified { old: Record::Connection(old), new: Record::Connection(new) } = Change::from_record(modify)
    else {
        panic!("a connection MODIFY");
    };
    assert!(old.rooms.len() == 1 && new.rooms.len() == 2);
    // Each record survives the Lambda event's JSON and decodes the same.
    let json = serde_json::to_value(&records[4]).unwrap();
    let back: EventRecord = serde_json::from_value(json).unwrap();
    assert_eq!(Change::from_record(&back), Change::from_record(&records[4]));
}

async fn connections_by_user_scan_pages_and_status(table: Table) {
    let t = now();
    for (id, tenant, user) in
        [("c1", "acme", "ann"), ("c2", "acme", "ann"), ("c3", "acme", "bob"), ("c4", "globex", "ann")]
    {
        connect(&table, &connection(id, tenant, user, &["general"], t), t).await;
    }
    let mut ann: Vec<String> =
        table.store.user_connections("acme", "ann", t).await.unwrap().into_iter().map(|c| c.connection_id).collect();
    ann.sort();
    assert_eq!(ann, ["c1", "c2"], "by user, within the tenant");
    assert!(table.store.user_connections("acme", "ann", t + Duration::seconds(600)).await.unwrap().is_empty());

    // Pages of two, resuming after the last id, see every connection once (expired ones too).
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = table.store.scan_connections(2, after.as_deref()).await.unwrap();
        seen.extend(page.iter().map(|c| c.connection_id.clone()));
        if page.len() < 2 {
            break;
        }
        after = page.last().map(|c| c.connection_id.clone());
    }
    seen.sort();
    assert_eq!(seen, ["c1", "c2", "c3", "c4"]);

    let updated = table.store.set_status("c3", "DISCONNECTED").await.unwrap().expect("c3 exists");
    assert_eq!(updated.status, "DISCONNECTED");
    assert_eq!(table.store.get_connection("c3", t).await.unwrap().unwrap().status, "DISCONNECTED");
    assert_eq!(table.store.set_status("nobody", "DISCONNECTED").await.unwrap(), None);
    assert_eq!(table.store.get_connection("nobody", t).await.unwrap(), None, "set_status creates nothing");
}

async fn a_large_plugin_is_chunked_under_the_item_limit_and_reassembled(table: Table) {
    use roomcast::model::{FailurePolicy, PluginMeta, PluginStatus, plugin_chunks};
    let bytes: Vec<u8> = (0..900_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let meta = PluginMeta::new("acme", &"ab".repeat(32), bytes.len(), FailurePolicy::Closed, now());
    let chunks = plugin_chunks("acme", &meta.version, &bytes);
    assert_eq!((meta.chunks, chunks.len()), (3, 3));
    table.store.put_plugin(&meta, &chunks).await.unwrap();
    assert_eq!(table.store.plugin_bytes("acme", &meta.version, meta.chunks).await.unwrap(), Some(bytes));
    assert_eq!(
        table.store.plugin_bytes("acme", &meta.version, meta.chunks + 1).await.unwrap(),
        None,
        "a missing chunk"
    );
    assert_eq!(table.store.plugins("acme").await.unwrap(), vec![meta.clone()]);
    assert!(table.store.plugins("globex").await.unwrap().is_empty());
    table.store.set_plugin_status("acme", &meta.version, PluginStatus::Rejected, Some("nope")).await.unwrap();
    let stored = &table.store.plugins("acme").await.unwrap()[0];
    assert_eq!((stored.status, stored.reason.as_deref()), (PluginStatus::Rejected, Some("nope")));
    assert_eq!(table.store.active_plugin("acme").await.unwrap(), None);
    table.store.set_active_plugin("acme", Some(&meta.version)).await.unwrap();
    assert_eq!(table.store.active_plugin("acme").await.unwrap().unwrap().version, meta.version);
    table.store.set_active_plugin("acme", None).await.unwrap();
    assert_eq!(table.store.active_plugin("acme").await.unwrap(), None);

    // One version's metadata by key; chunks have their own prefix, so listing reads none.
    assert_eq!(table.store.plugin("acme", &meta.version).await.unwrap().map(|m| m.version), Some(meta.version.clone()));
    assert_eq!(table.store.plugin("acme", "0000000000000000").await.unwrap(), None);
    assert!(
        chunks.iter().all(|c| c.sk.starts_with("CHUNK#")),
        "{:?}",
        chunks.iter().map(|c| &c.sk).collect::<Vec<_>>()
    );

    // A version uploaded before chunks had their own prefix is still read.
    let old_bytes: Vec<u8> = (0..1000u32).map(|i| (i % 7) as u8).collect();
    let old = PluginMeta::new("acme", &"b".repeat(64), old_bytes.len(), FailurePolicy::Open, chrono::Utc::now());
    let mut legacy = plugin_chunks("acme", &old.version, &old_bytes);
    for (index, chunk) in legacy.iter_mut().enumerate() {
        chunk.sk = roomcast::model::legacy_plugin_chunk_sk(&old.version, index);
    }
    table.store.put_plugin(&old, &legacy).await.unwrap();
    assert_eq!(table.store.plugin_bytes("acme", &old.version, old.chunks).await.unwrap(), Some(old_bytes));
}

fn presence_update(user: &str, connection: &str, op: PresenceOp, seq: Option<u64>) -> PresenceUpdate {
    PresenceUpdate {
        tenant: "acme".into(),
        room: "general".into(),
        user_id: user.into(),
        connection_id: connection.into(),
        op,
        event_id: format!("ev-{user}-{connection}-{op:?}"),
        seq: seq.map(|n| roomcast::model::sequence_key(&n.to_string())),
        at: now(),
        now: now(),
        time: now(),
        announce_max_users: 100,
    }
}

/// Twelve writers add (then remove) connections of one user at the same time: exactly one of
/// them makes the user present (absent), none is lost, and the room's count agrees. On DynamoDB
/// this is the versioned conditional writes losing races and planning again.
async fn presence_changes_atomically_under_concurrent_writers(table: Table) {
    let store = table.store.clone();
    let run = |op: PresenceOp| {
        let store = store.clone();
        async move {
            let writes = (0..12).map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.apply_presence(&presence_update("ann", &format!("c{i:02}"), op, None)).await
                })
            });
            let outcomes: Vec<_> =
                futures::future::join_all(writes).await.into_iter().map(|o| o.unwrap().unwrap()).collect();
            outcomes.iter().filter(|o| o.transition.is_some()).count()
        }
    };
    assert_eq!(run(PresenceOp::Add).await, 1, "exactly one joined");
    let page = store.who("acme", "general", 10, None).await.unwrap();
    assert_eq!(page.users, [("ann".to_string(), 12)]);
    assert_eq!(page.total, 1);
    assert_eq!(run(PresenceOp::Remove).await, 1, "exactly one left");
    let page = store.who("acme", "general", 10, None).await.unwrap();
    assert!(page.users.is_empty());
    assert_eq!((page.total, store.presence("acme", "general", "ann").await.unwrap()), (0, None));
}

async fn presence_redelivery_and_who_pages_and_settings(table: Table) {
    let store = &table.store;
    let add = |user: &str, seq| presence_update(user, &format!("{user}-1"), PresenceOp::Add, Some(seq));
    for (i, user) in ["cid", "ann", "eve", "bob", "dan"].iter().enumerate() {
        let outcome = store.apply_presence(&add(user, 10 + i as u64)).await.unwrap();
        assert_eq!(
            (outcome.transition, outcome.users, outcome.redelivered),
            (Some(PresenceEvent::Joined), Some(i as u64 + 1), false)
        );
    }
    // The last record again: the same transition, announced again, nothing written.
    let again = store.apply_presence(&add("dan", 14)).await.unwrap();
    assert_eq!((again.transition, again.users, again.redelivered), (Some(PresenceEvent::Joined), Some(5), true));
    // A record that made no transition (Ann's second tab), again: nothing at all.
    let tab = presence_update("ann", "ann-2", PresenceOp::Add, Some(20));
    assert_eq!(store.apply_presence(&tab).await.unwrap().transition, None);
    let old = store.apply_presence(&tab).await.unwrap();
    assert_eq!((old.transition, old.redelivered), (None, true));
    // A leave handled after later joins (it came from another shard): applied, by its own
    // connection's mark, not lost as a repeat.
    let cid_left = store.apply_presence(&presence_update("cid", "cid-1", PresenceOp::Remove, Some(12))).await.unwrap();
    assert_eq!((cid_left.transition, cid_left.redelivered), (Some(PresenceEvent::Left), false));
    let cid_back = store.apply_presence(&presence_update("cid", "cid-2", PresenceOp::Add, Some(21))).await.unwrap();
    assert_eq!(cid_back.transition, Some(PresenceEvent::Joined));
    assert_eq!(store.room_presence("acme", "general").await.unwrap().unwrap().users, 5);

    // Users who left keep a tombstone (their marks): `who` passes over them.
    for user in ["bea", "cal", "fay"] {
        store.apply_presence(&presence_update(user, &format!("{user}-1"), PresenceOp::Add, Some(40))).await.unwrap();
        store.apply_presence(&presence_update(user, &format!("{user}-1"), PresenceOp::Remove, Some(41))).await.unwrap();
        assert!(store.presence("acme", "general", user).await.unwrap().is_some_and(|p| !p.present()));
    }
    // Pages in user order, each user once; the total on every page.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.who("acme", "general", 2, after.as_deref()).await.unwrap();
        assert_eq!(page.total, 5);
        assert!(page.users.len() <= 2);
        seen.extend(page.users.iter().map(|(u, n)| (u.clone(), *n)));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let users: Vec<&str> = seen.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(users, ["ann", "bob", "cid", "dan", "eve"]);
    // Another tenant's room of the same name is another room.
    assert_eq!(store.who("globex", "general", 10, None).await.unwrap(), roomcast::presence::WhoPage::default());
    // A presence item that does not decode is left out, and counted.
    table
        .put_raw(
            serde_dynamo::to_item(
                serde_json::json!({"pk":"PRESENCE#acme#general","sk":"USER#bad","type":"presence","connections":["x"]}),
            )
            .unwrap(),
        )
        .await;
    let before = table.metrics.snapshot().corrupt_items;
    assert_eq!(store.who("acme", "general", 10, None).await.unwrap().users.len(), 5);
    assert_eq!(table.metrics.snapshot().corrupt_items, before + 1);

    // Nor does one stop the user's presence from changing: it is replaced, and counted.
    table
        .put_raw(
            serde_dynamo::to_item(
                serde_json::json!({"pk":"PRESENCE#acme#general","sk":"USER#zed","type":"presence","ver":"x"}),
            )
            .unwrap(),
        )
        .await;
    let zed = store.apply_presence(&presence_update("zed", "zed-1", PresenceOp::Add, Some(30))).await.unwrap();
    assert_eq!(zed.transition, Some(PresenceEvent::Joined));
    assert!(store.presence("acme", "general", "zed").await.unwrap().is_some());

    assert_eq!(store.tenant_settings("acme").await.unwrap(), None);
    let settings = TenantSettings { presence_announce_max_users: Some(7), ..TenantSettings::new("acme") };
    store.put_tenant_settings(&settings).await.unwrap();
    assert_eq!(store.tenant_settings("acme").await.unwrap(), Some(settings));
}

/// A big fan-out's progress: read back as written (the pending list included), replaced by the
/// next write, and its stream records are state the processor does not react to.
async fn fan_out_progress_round_trips_and_its_records_are_state(mut table: Table) {
    use roomcast::model::FanoutProgress;
    drain(&mut table).await;
    assert_eq!(table.store.fanout_progress("ev-1#0").await.unwrap(), None);
    let cut = FanoutProgress::new("ev-1#0", "c0500".into(), vec!["c0017".into(), "c0499".into()], false, now());
    table.store.put_fanout_progress(&cut).await.unwrap();
    let read = table.store.fanout_progress("ev-1#0").await.unwrap().expect("written");
    assert_eq!(read, cut);
    assert!(read.settled("c0001") && read.settled("c0500"));
    assert!(!read.settled("c0017") && !read.settled("c0501"), "pending, and not started");
    let done = FanoutProgress::new("ev-1#0", "c1199".into(), Vec::new(), true, now());
    table.store.put_fanout_progress(&done).await.unwrap();
    assert!(table.store.fanout_progress("ev-1#0").await.unwrap().expect("written").settled("c9999"));
    assert_eq!(table.store.fanout_progress("ev-2#0").await.unwrap(), None, "per record and frame");
    let changes = changes(&mut table).await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    for change in changes {
        assert!(
            matches!(
                change,
                Change::Inserted(Record::State { kind: "fanout", .. })
                    | Change::Modified { new: Record::State { kind: "fanout", .. }, .. }
            ),
            "{change:?}"
        );
    }
}

async fn drain(table: &mut Table) -> Vec<EventRecord> {
    table.stream.drain().await
}

async fn changes(table: &mut Table) -> Vec<Change> {
    drain(table).await.iter().map(Change::from_record).collect()
}

/// Only the embedded store runs TTL itself (moto does not): its expiry emits REMOVE records with
/// DynamoDB's service identity, which the decoder reads as a TTL deletion.
#[tokio::test]
async fn the_embedded_store_expires_ttl_items_as_the_dynamodb_service() {
    let mut table = Table::memory(roomcast::model::ManualClock::starting_now()).await;
    let t = now();
    let c = connection("c1", "acme", "ann", &["general"], t);
    connect(&table, &c, t).await;
    drain(&mut table).await;
    let memory = table.memory.clone().unwrap();
    assert_eq!(memory.expire_due(t + Duration::seconds(599)), 0);
    assert_eq!(memory.expire_due(t + Duration::seconds(600)), 2);
    let records = drain(&mut table).await;
    assert_eq!(records.len(), 2);
    for r in &records {
        let identity = r.user_identity.as_ref().expect("service identity");
        assert_eq!((identity.type_.as_str(), identity.principal_id.as_str()), ("Service", "dynamodb.amazonaws.com"));
        assert!(matches!(Change::from_record(r), Change::Removed { cause: Cause::TtlExpired, .. }));
    }
    assert_eq!(memory.item_count(), 0);
}

async fn a_tenants_settings_and_identity_round_trip_and_stay_apart(table: Table) {
    let store = &table.store;
    assert_eq!(store.tenant_settings("acme").await.unwrap(), None);
    assert_eq!(store.tenant_identity("acme").await.unwrap(), None);
    let settings = TenantSettings { presence_announce_max_users: Some(7), ..TenantSettings::new("acme") };
    store.put_tenant_settings(&settings).await.unwrap();
    let identity = roomcast::identity::TenantIdentity {
        hs256_secret: Some("a-secret-of-at-least-thirty-two-bytes".into()),
        revoked_before: Some(1_700_000_000),
        ..roomcast::identity::TenantIdentity::new("acme")
    };
    store.put_tenant_identity(&identity).await.unwrap();
    assert_eq!(store.tenant_settings("acme").await.unwrap(), Some(settings));
    assert_eq!(store.tenant_identity("acme").await.unwrap(), Some(identity));
    // Another tenant's are its own.
    assert_eq!(store.tenant_settings("globex").await.unwrap(), None);
    assert_eq!(store.tenant_identity("globex").await.unwrap(), None);
}

async fn the_sweep_lease_has_one_owner_at_a_time_and_counters_count_per_window(table: Table) {
    let store = &table.store;
    // The first sweeper takes the lease and starts at shard 0; a second is refused while it holds.
    assert_eq!(store.take_sweep_lease(100, 160, "first").await.unwrap(), Some(0));
    assert_eq!(store.take_sweep_lease(120, 180, "second").await.unwrap(), None);
    // Only the owner records progress.
    assert!(!store.sweep_progress("second", 9, false).await.unwrap());
    assert!(store.sweep_progress("first", 5, false).await.unwrap());
    // Past its end, another takes it over and goes on from the shard recorded.
    assert_eq!(store.take_sweep_lease(161, 220, "second").await.unwrap(), Some(5));
    assert!(!store.sweep_progress("first", 6, true).await.unwrap(), "the first lost it");
    // Released: taken at once, shards wrapping past the last.
    assert!(store.sweep_progress("second", roomcast::model::SWEEP_SHARDS + 2, true).await.unwrap());
    assert_eq!(store.take_sweep_lease(162, 222, "third").await.unwrap(), Some(2));

    for expected in 1..=3 {
        assert_eq!(store.count_in_window("conn#c1", 1_000).await.unwrap(), expected);
    }
    assert_eq!(store.count_in_window("conn#c1", 1_001).await.unwrap(), 1, "a new window starts at one");
    assert_eq!(store.count_in_window("conn#c2", 1_000).await.unwrap(), 1, "keys count apart");
}
