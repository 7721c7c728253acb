//! The cost of one join in a room of 1,000 users, with the room announcing joins and without
//! (`cargo bench -p roomcast --bench presence`): the processor handling the new membership's
//! stream record, from its presence write to the last `PostToConnection` accepted by a local
//! `@connections` endpoint, through the real SDK client.
//!
//! * `join_in_1000/announced` — presence write, the room's members read, 1,000 posts;
//! * `join_in_1000/unannounced` — presence write only: the room is over its tenant's limit.
//!
//! docs/PERFORMANCE.md reports the two as a ratio measured in one run.

use roomcast::store::{ConnectionStore, PresenceStore};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use roomcast::deliver::DeliverySettings;
use roomcast::metrics::Metrics;
use roomcast::model::{Clock, Connection, JoinReason, ManualClock, Name, NewConnection};
use roomcast::pipeline::Processor;
use roomcast::presence::{PresenceOp, PresenceUpdate};
use roomcast::store::memory::MemoryStore;
use roomcast::stream::{Change, Record};

const ROOM_USERS: usize = 1000;

/// An `@connections` endpoint on loopback that accepts every post.
async fn endpoint() -> String {
    let app = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/bench")
}

fn sdk() -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::provider::SharedCredentialsProvider::new(
            aws_credential_types::Credentials::new("bench", "bench", None, None, "bench"),
        ))
        .behavior_version(aws_config::BehaviorVersion::latest())
        .build()
}

fn connection(i: usize, clock: &ManualClock) -> Connection {
    Connection::new(NewConnection {
        connection_id: &format!("conn-{i:06}"),
        tenant: &Name::parse("tenant", "acme").unwrap(),
        user_id: &format!("user-{i:06}"),
        connection_type: None,
        deployment_id: None,
        rooms: BTreeSet::from(["big".to_string()]),
        endpoint: "https://abc123.execute-api.us-east-1.amazonaws.com/prod".into(),
        now: clock.now(),
        ttl_seconds: 3600,
    })
}

struct Room {
    processor: Processor,
    store: Arc<MemoryStore>,
    clock: Arc<ManualClock>,
    stream: tokio::sync::mpsc::UnboundedReceiver<aws_lambda_events::dynamodb::EventRecord>,
    next: usize,
}

/// A room of [`ROOM_USERS`] present users, whose processor announces joins up to `max` users.
async fn room(max: u64, endpoint: &str) -> Room {
    let clock = ManualClock::starting_now();
    let store = MemoryStore::new(clock.clone());
    let stream = store.subscribe();
    for i in 0..ROOM_USERS {
        let conn = connection(i, &clock);
        let membership = conn.membership("big", JoinReason::Connect, clock.now());
        store.put_connection(&conn, &[membership]).await.unwrap();
        let update = PresenceUpdate {
            tenant: "acme".into(),
            room: "big".into(),
            user_id: conn.user_id.clone(),
            connection_id: conn.connection_id.clone(),
            op: PresenceOp::Add,
            event_id: format!("setup-{i}"),
            seq: None,
            at: clock.now(),
            now: clock.now(),
            time: clock.now(),
            announce_max_users: 1_000_000,
        };
        store.apply_presence(&update).await.unwrap();
    }
    // Nobody is young: a 410 would be final (none comes).
    clock.advance(chrono::Duration::minutes(5));
    let metrics = Arc::new(Metrics::default());
    let delivery = DeliverySettings { endpoint_override: Some(endpoint.to_string()), ..DeliverySettings::default() };
    let processor = roomcast::assembly::Assembly {
        announce_max_users: max,
        ..roomcast::assembly::Assembly::new(sdk(), store.clone(), clock.clone(), metrics).with_delivery(delivery)
    }
    .processor();
    let mut room = Room { processor, store, clock, stream, next: ROOM_USERS };
    while room.stream.try_recv().is_ok() {}
    room
}

impl Room {
    /// One new user joins; the time the processor takes over the membership's record.
    async fn join(&mut self) -> Duration {
        let conn = connection(self.next, &self.clock);
        self.next += 1;
        let membership = conn.membership("big", JoinReason::Connect, self.clock.now());
        self.store.put_connection(&conn, &[membership]).await.unwrap();
        let mut record = None;
        while let Ok(r) = self.stream.try_recv() {
            if matches!(Change::from_record(&r), Change::Inserted(Record::Membership(_))) {
                record = Some(r);
            }
        }
        let record = record.expect("the membership's INSERT");
        let started = Instant::now();
        let report = self.processor.process_record(&record).await.unwrap();
        let elapsed = started.elapsed();
        assert!(report.presence.as_ref().is_some_and(|p| p.event.is_some()), "a joined transition");
        elapsed
    }
}

fn joins(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let url = runtime.block_on(endpoint());
    let mut group = c.benchmark_group("join_in_1000");
    group.sample_size(10).measurement_time(Duration::from_secs(15));
    for (name, max) in [("announced", 1_000_000), ("unannounced", 100)] {
        let mut room = runtime.block_on(room(max, &url));
        let posts = |room: &Room| room.processor.counts().delivered;
        let before = posts(&room);
        runtime.block_on(room.join());
        let per_join = posts(&room) - before;
        assert_eq!(per_join, if max > 100 { ROOM_USERS as u64 + 1 } else { 0 }, "{name}: posts per join");
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += room.join().await;
                    }
                    total
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, joins);
criterion_main!(benches);
