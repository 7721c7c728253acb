//! DynamoDB as one partition allows it: moto behind `roomcast::partitions`, which charges every
//! call's read and write units to its partition key and answers
//! `ProvisionedThroughputExceededException` once a key's budget is spent. A hot room shows up as
//! it would in AWS — throttled, then served by the SDK's retries — while other rooms are not.
//! The budgets here are small (30 read units a second) so that moto, which takes seconds to
//! read 10,000 items, can exceed them; the defaults are DynamoDB's 3,000 and 1,000.

use std::time::Duration;

use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
use roomcast::model::{Clock, JoinReason, SystemClock};
use roomcast::partitions::{PartitionLimits, Partitions};
use roomcast_tests::Table;

/// `size` memberships of tenant acme's `room`, written to moto directly (not charged).
async fn seed_room(table: &Table, room: &str, size: usize) {
    let now = SystemClock.now();
    let requests: Vec<WriteRequest> = (0..size)
        .map(|i| {
            let connection =
                roomcast_tests::test_connection(&format!("{room}-{i:05}"), "acme", &format!("u{i}"), &[room], now);
            let membership = connection.membership(room, JoinReason::Connect, now);
            let item: serde_dynamo::Item = serde_dynamo::to_item(&membership).unwrap();
            WriteRequest::builder()
                .put_request(PutRequest::builder().set_item(Some(item.into())).build().unwrap())
                .build()
        })
        .collect();
    let sdk = roomcast_tests::sdk_config().await;
    let moto = roomcast::config::dynamodb_client(&sdk, Some(&roomcast_tests::moto_endpoint()));
    let name = table.dynamo.as_ref().unwrap().table().to_string();
    for chunk in requests.chunks(25) {
        moto.batch_write_item().request_items(&name, chunk.to_vec()).send().await.expect("batch write to moto");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_room_is_throttled_and_served_while_a_quiet_room_is_not_throttled() {
    let moto = roomcast_tests::moto_endpoint();
    // 30 read units a second: one read of 1,000 memberships (~65 units) puts the key in debt
    // for two seconds.
    let limits = PartitionLimits { latency: Duration::from_millis(2), read_units: 30.0, write_units: 1000.0 };
    let partitions = Partitions::start(&moto, limits).await.unwrap();
    let table = Table::dynamodb_behind(&partitions).await;
    seed_room(&table, "hot", 1000).await;
    seed_room(&table, "quiet", 10).await;
    partitions.reset();

    let mut served = 0;
    let mut refused = Vec::new();
    while served < 3 {
        match table.store.room_members("acme", "hot", SystemClock.now()).await {
            Ok(members) => {
                assert_eq!(members.len(), 1000);
                served += 1;
            }
            // The SDK's own retries ran out: what the processor reports for Lambda to retry.
            Err(err) => refused.push(err.to_string()),
        }
        let quiet = table.store.room_members("acme", "quiet", SystemClock.now()).await.unwrap();
        assert_eq!(quiet.len(), 10);
        assert!(refused.len() < 10, "the hot room was never served again: {refused:?}");
    }
    let hot = partitions.stats("ROOM#acme#hot");
    let quiet = partitions.stats("ROOM#acme#quiet");
    assert!(hot.throttled > 0, "1,000 memberships read three times within 30 units a second: {hot:?}");
    for err in &refused {
        assert!(err.contains("ProvisionedThroughputExceeded"), "{err}");
    }
    assert_eq!(quiet.throttled, 0, "another room's key has its own budget: {quiet:?}");
    // What each read of the hot room cost, as DynamoDB counts it: its items' bytes / 4 KB.
    assert_eq!(hot.items_read, 3000);
    let per_read = hot.read_units / 3.0;
    let expected = hot.bytes_read as f64 / 3.0 / 4096.0;
    assert!((per_read - expected).abs() <= 1.0, "{per_read} units a read for {expected:.1} × 4 KB: {hot:?}");
    assert!(per_read > 50.0, "1,000 memberships are more than 200 KB: {hot:?}");
}

/// The layer passes everything else through: the table is made, written and its stream read as
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_the_layer_are_charged_to_their_keys() {
    let moto = roomcast_tests::moto_endpoint();
    let partitions = Partitions::start(&moto, PartitionLimits::default()).await.unwrap();
    let mut table = Table::dynamodb_behind(&partitions).await;
    let now = SystemClock.now();
    let connection = roomcast_tests::test_connection("c1", "acme", "ann", &["lobby"], now);
    let membership = connection.membership("lobby", JoinReason::Connect, now);
    table.store.put_connection(&connection, &[membership]).await.unwrap();
    let records = table.stream.drain().await;
    // moto writes two INSERT records for an update that creates an item (DynamoDB one), so the
    // keys are compared as a set.
    let keys: std::collections::BTreeSet<String> = records
        .iter()
        .filter_map(|r| match r.change.keys.get("pk") {
            Some(serde_dynamo::AttributeValue::S(pk)) => Some(format!("{} {pk}", r.event_name)),
            _ => None,
        })
        .collect();
    let want = ["INSERT CONN#c1", "INSERT ROOM#acme#lobby", "INSERT ROSTER#acme#lobby"];
    assert_eq!(keys, want.map(String::from).into(), "the connection, its membership and the room's roster version");
    let room = partitions.stats("ROOM#acme#lobby");
    let conn = partitions.stats("CONN#c1");
    assert_eq!((room.write_units, conn.write_units), (2.0, 2.0), "one unit each, doubled in a transaction");
    let version = partitions.stats("ROSTER#acme#lobby");
    assert_eq!(version.write_units, 1.0, "the version's bump: a plain update, on its own key");
    assert_eq!(room.throttled + conn.throttled, 0);
}

/// A history page of big messages reads about the one frame it can return, not the 51 messages a
/// page may hold: pages of 4, 8, 16, … items, stopped once their text passes a frame (128 KB).
/// Read through the layer, which counts items and bytes as DynamoDB does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_reads_about_what_one_frame_returns() {
    let moto = roomcast_tests::moto_endpoint();
    let partitions = Partitions::start(&moto, PartitionLimits::default()).await.unwrap();
    let table = Table::dynamodb_behind(&partitions).await;
    let now = SystemClock.now();
    for i in 0..60 {
        let at = now + chrono::Duration::milliseconds(i);
        let body = format!("{i:03} {}", "x".repeat(20_000));
        table
            .store
            .put_message(&roomcast::model::Message::published("acme", "big", "ann", body, at, 3600))
            .await
            .unwrap();
    }
    let frame = roomcast::protocol::MAX_OUTGOING_BYTES;
    let latest = roomcast::store::HistoryFrom::Latest;
    partitions.reset();
    let page = table.store.history_page("acme", "big", &latest, 51, now, None, frame).await.unwrap();
    let paged = partitions.stats("ROOM#acme#big");
    partitions.reset();
    let whole = table.store.history("acme", "big", &latest, 51, now, None).await.unwrap();
    let unbounded = partitions.stats("ROOM#acme#big");
    eprintln!("a history page: {paged:?}; without the frame's budget: {unbounded:?}");
    assert_eq!(page.len(), 7, "the newest 7 of 20 KB pass 128 KB: one more than fits says `next`");
    assert_eq!(page.last().unwrap().body[..3].to_string(), "059", "the newest last");
    assert_eq!(whole.len(), 51);
    assert!(paged.items_read <= 12, "pages of 4 and 8: {paged:?}");
    assert!(paged.bytes_read < 3 * frame as u64, "{paged:?}");
    assert!(unbounded.items_read >= 51, "{unbounded:?}");
}

/// The sweeper reads the stale connections and the present users through its sparse index, never
/// the table: 2,000 live connections and 12 silent for an hour cost it about 12 items, where a
/// Scan read all 2,012. One run at a time (the lease), and a run out of time leaves the shard it
/// stopped at for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_reads_only_what_is_stale_runs_once_at_a_time_and_goes_on_where_it_stopped() {
    let moto = roomcast_tests::moto_endpoint();
    let partitions = Partitions::start(&moto, PartitionLimits::default()).await.unwrap();
    let table = Table::dynamodb_behind(&partitions).await;
    let clock = roomcast::model::ManualClock::starting_now();
    let now = clock.now();
    let name = table.dynamo.as_ref().unwrap().table().to_string();
    let sdk = roomcast_tests::sdk_config().await;
    let direct = roomcast::config::dynamodb_client(&sdk, Some(&moto));
    let items: Vec<WriteRequest> = (0..2012)
        .map(|i| {
            let (id, at) = match i {
                0..12 => (format!("stale-{i}"), now - chrono::Duration::seconds(3600)),
                _ => (format!("live-{i}"), now),
            };
            let connection = roomcast_tests::test_connection(&id, "acme", &format!("u{i}"), &[], at);
            let item: serde_dynamo::Item = serde_dynamo::to_item(&connection).unwrap();
            WriteRequest::builder()
                .put_request(PutRequest::builder().set_item(Some(item.into())).build().unwrap())
                .build()
        })
        .collect();
    for chunk in items.chunks(25) {
        direct.batch_write_item().request_items(&name, chunk.to_vec()).send().await.expect("batch write to moto");
    }
    let stack = roomcast_tests::Stack::build(table, clock.clone(), Default::default()).await;
    for i in 0..12 {
        stack.recorder.mark_gone(&format!("stale-{i}"));
    }
    let admin = stack.admin().await;
    let idle = Duration::from_secs(600);
    let store = stack.table.store.clone();

    // Another run holds the lease: this one does nothing.
    assert_eq!(store.take_sweep_lease(now.timestamp(), now.timestamp() + 300, "other").await.unwrap(), Some(0));
    let skipped = admin.sweep(idle).await.unwrap();
    assert!(skipped.skipped && skipped.checked == 0, "{skipped:?}");
    // Only the holder records progress or gives the lease back.
    assert!(!store.sweep_progress("not-the-holder", 9, true).await.unwrap());
    // A run with no time left stops before its first shard, and leaves that shard for the next.
    assert!(store.sweep_progress("other", 5, true).await.unwrap());
    let short = admin.sweep_until(idle, Some(std::time::Instant::now() + Duration::from_secs(1))).await.unwrap();
    assert_eq!((short.shards, short.checked), (0, 0), "{short:?}");
    assert_eq!(store.take_sweep_lease(now.timestamp(), now.timestamp() + 1, "probe").await.unwrap(), Some(5));
    assert!(store.sweep_progress("probe", 5, true).await.unwrap());

    partitions.reset();
    let report = admin.sweep(idle).await.unwrap();
    assert_eq!((report.checked, report.cleaned, report.shards), (12, 12, 16), "{report:?}");
    let read: u64 = partitions.all().values().map(|s| s.items_read).sum();
    let bytes: u64 = partitions.all().values().map(|s| s.bytes_read).sum();
    eprintln!("a sweep of 2,012 connections, 12 of them stale: {read} items, {bytes} bytes read");
    assert!(read <= 40, "the stale connections (and the lease), not the table: {read} items");
    for i in 0..12 {
        assert!(store.get_connection(&format!("stale-{i}"), clock.now()).await.unwrap().is_none());
    }
    assert!(store.get_connection("live-20", clock.now()).await.unwrap().is_some());
}

/// What each client operation costs in DynamoDB units, as the partition layer charges it: the
/// handler's calls, then the processor's for the stream records they made. Printed as the
/// README's table (`cargo test -p roomcast-tests --test partitions -- what_each_operation
/// --nocapture`), and held against it: a change in what an operation costs fails here until the
/// README says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_each_operation_costs_in_dynamodb_units() {
    use serde_json::json;
    let moto = roomcast_tests::moto_endpoint();
    let partitions =
        Partitions::start(&moto, PartitionLimits { latency: Duration::ZERO, ..PartitionLimits::default() })
            .await
            .unwrap();
    let table = Table::dynamodb_behind(&partitions).await;
    let clock = roomcast::model::ManualClock::starting_now();
    let mut stack = roomcast_tests::Stack::build(table, clock.clone(), Default::default()).await;
    // The defaults' rate limits, as deployed: their counters are part of the cost.
    stack.deps.limits = roomcast::limits::Limiter::new(roomcast::limits::RateLimits::default());
    for i in 0..9 {
        stack.connect(&format!("m{i}"), "acme", &format!("m{i}"), "lobby").await;
    }
    stack.pump().await;
    let units = |p: &Partitions| {
        let all = p.all();
        // (+ 0.0: an empty sum is -0.0.)
        (all.values().map(|s| s.read_units).sum::<f64>() + 0.0, all.values().map(|s| s.write_units).sum::<f64>() + 0.0)
    };
    // (operation, the handler's read and write units, the processor's)
    type Units = (f64, f64);
    let mut rows: Vec<(&str, Units, Units)> = Vec::new();
    macro_rules! measure {
        ($name:expr, $op:expr) => {{
            partitions.reset();
            let answer = $op;
            let handler = units(&partitions);
            partitions.reset();
            stack.pump().await;
            rows.push(($name, handler, units(&partitions)));
            clock.advance(chrono::Duration::seconds(1));
            answer
        }};
    }
    let connected = measure!("$connect into 1 room", stack.connect("ann", "acme", "ann", "lobby").await);
    assert_eq!(connected.status_code, 200);
    let sent = measure!(
        "a message to a room of 10",
        stack.send("ann", json!({"action": "sendMessage", "room": "lobby", "message": "hello"})).await
    );
    assert_eq!(sent["action"], "ack", "{sent}");
    measure!(
        "a second message (the room's roster kept)",
        stack.send("ann", json!({"action": "sendMessage", "room": "lobby", "message": "again"})).await
    );
    measure!("join a room", stack.send("ann", json!({"action": "join", "room": "side"})).await);
    measure!("ping (in 2 rooms)", stack.send("ann", json!({"action": "ping"})).await);
    measure!("history (2 messages)", stack.send("ann", json!({"action": "history", "room": "lobby"})).await);
    measure!("who (10 present)", stack.send("ann", json!({"action": "who", "room": "lobby"})).await);
    measure!("leave a room", stack.send("ann", json!({"action": "leave", "room": "side"})).await);
    measure!("$disconnect (in 1 room)", stack.disconnect("ann").await);
    assert!(stack.failures.is_empty(), "{:?}", stack.failures);

    eprintln!("| operation | handler: read / write units | processor: read / write units |");
    eprintln!("|---|---|---|");
    for (name, (hr, hw), (pr, pw)) in &rows {
        eprintln!("| {name} | {hr} / {hw} | {pr} / {pw} |");
    }
    // The README's table is this test's: a change that costs more (or less) fails here until
    // the table says so.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("### What each operation costs").nth(1).expect("the README's cost table");
    for (name, (hr, hw), (pr, pw)) in &rows {
        assert!(hr + hw + pr + pw > 0.0, "{name} cost nothing: not measured");
        let row = format!("| {name} | {hr} / {hw} | {pr} / {pw} |");
        assert!(
            section.lines().any(|line| line == row),
            "README.md's cost table lacks `{row}`: regenerate it with this test's output (--nocapture)"
        );
    }
}
