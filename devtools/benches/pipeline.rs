//! The processor's own work per stream batch, as ratios measured in one run
//! (`cargo bench -p roomcast --bench pipeline`):
//!
//! * `batch/decode_100` — a realistic batch of 100 stream records (20 connects with their
//!   memberships, 60 messages), as Lambda delivers it (JSON), read into typed changes;
//! * `batch/react_100` — the pure reaction to those 100 changes, rooms of 100 members;
//! * `batch/decode_react_100` — both: the processor's work per batch before any delivery.
//!
//! Delivering is measured by `roomcast bench` (docs/PERFORMANCE.md): these must stay a small
//! fraction of it.

use roomcast::store::{ConnectionStore, HistoryStore};
use std::collections::BTreeSet;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use roomcast::model::{Clock, Connection, JoinReason, ManualClock, Membership, Message, Name, NewConnection};
use roomcast::pipeline::{connection, membership, message};
use roomcast::react::{Decision, Route};
use roomcast::store::memory::MemoryStore;
use roomcast::stream::{Change, Record, decode_record};

/// 100 records from the embedded store's real stream, as JSON.
fn batch() -> (Vec<serde_json::Value>, Vec<Membership>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let clock = ManualClock::starting_now();
        let store = MemoryStore::new(clock.clone());
        let mut stream = store.subscribe();
        let tenant = Name::parse("tenant", "acme").unwrap();
        let mut connections = Vec::new();
        for i in 0..20 {
            let id = format!("conn-{i:03}");
            let conn = Connection::new(NewConnection {
                connection_id: &id,
                tenant: &tenant,
                user_id: &format!("user-{i}"),
                connection_type: None,
                deployment_id: None,
                rooms: BTreeSet::from(["general".to_string()]),
                endpoint: "https://abc123.execute-api.us-east-1.amazonaws.com/prod".into(),
                now: clock.now(),
                ttl_seconds: 3600,
            });
            let membership = conn.membership("general", JoinReason::Connect, clock.now());
            store.put_connection(&conn, &[membership]).await.unwrap();
            connections.push(conn);
        }
        for i in 0..60 {
            let body = format!("message {i}: the deploy went out at 9:40, dashboards look green; ping me if not");
            let message = Message::new(&connections[i % 20], "general", body, clock.now(), 86_400);
            store.put_message(&message).await.unwrap();
        }
        let mut raw = Vec::new();
        while let Ok(record) = stream.try_recv() {
            raw.push(serde_json::to_value(&record).unwrap());
        }
        assert_eq!(raw.len(), 100);
        let members: Vec<Membership> = (0..100)
            .map(|i| connections[i % 20].membership("general", JoinReason::Connect, clock.now()))
            .map(|mut m| {
                m.connection_id = format!("member-{}", m.user_id);
                m
            })
            .collect();
        (raw, members)
    })
}

fn decode(raw: &[serde_json::Value]) -> Vec<Change> {
    raw.iter().enumerate().map(|(i, r)| Change::from_record(&decode_record(i, r).unwrap())).collect()
}

/// The pure reaction of each record's kind, as the processor states it with nothing decided
/// (no tenant rules, no presence transition): the effects' count.
fn react(change: &Change, members: &[Membership]) -> usize {
    match change {
        Change::Inserted(Record::Connection(c)) => connection::welcome(c, &connection::Welcome::default()).len(),
        Change::Inserted(Record::Message(m)) => {
            message::react(m, members, &Decision::Deliver { rewritten: None }, &Route::default()).len()
        }
        _ => membership::react(membership::Kind::of(change), members, &membership::Decided::default()).len(),
    }
}

fn batches(c: &mut Criterion) {
    let (raw, members) = batch();
    let changes = decode(&raw);
    assert!(changes.iter().all(|c| !matches!(c, Change::Unknown { .. })));
    let mut group = c.benchmark_group("batch");
    group.bench_function("decode_100", |b| b.iter(|| decode(black_box(&raw))));
    group.bench_function("react_100", |b| {
        b.iter(|| changes.iter().map(|c| react(black_box(c), &members)).sum::<usize>())
    });
    group.bench_function("decode_react_100", |b| {
        b.iter(|| decode(black_box(&raw)).iter().map(|c| react(c, &members)).sum::<usize>())
    });
    group.finish();
}

criterion_group!(benches, batches);
criterion_main!(benches);
