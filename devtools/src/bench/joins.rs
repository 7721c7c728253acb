//! `roomcast bench joins`: a join storm into one room, as API Gateway admits it (500 new
//! connections a second), against one DynamoDB partition's write throughput.
//!
//! * **The table** is moto behind the partition layer ([`crate::partitions`], in the endpoint's
//!   child process): every call after the layer's latency, each partition key held to 1,000
//!   write and 3,000 read units a second, answered `ProvisionedThroughputExceededException`
//!   beyond. A room is one partition key: its memberships, its users' presence items and its
//!   count share the budget.
//! * **The storm**: `--joins` connections, each its own user, connect into the room at `--rate`
//!   a second, written as the `$connect` handler writes them (the connection, its membership
//!   and the roster version, in one transaction, through the layer). A member who was there
//!   before talks every `--message-every`.
//! * **The processor** runs in this process, fed as Lambda feeds it from one shard: a batch of
//!   up to `--batch-size` records, or what arrived within `--batch-window`, one batch at a time.
//!   Its `@connections` is the fan-out bench's endpoint (latency, quota); a message to 2,000
//!   members or more goes to the fan-out stage (in this process), as deployed.
//! * **Reported**: when every join was applied to presence (after the storm's last write), the
//!   room's count against the joins, `joined` announced against the room's limit, each
//!   message's wait from its write until its batch was done (delivered, or handed to the stage,
//!   which serves it at the quota's pace), and the room's keys' write units (its own, the
//!   memberships'; `PRESENCE#…`, presence's)
//!   per join and per second over one partition's 1,000. `--one-by-one` applies presence one
//!   record at a time (two reads and a write each), as before runs.

use crate::store::{ConnectionStore, HistoryStore};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::fanout::{Endpoint, sdk_config};
use crate::gateway::account::AccountSettings;
use crate::model::{Clock, Connection, JoinReason, Message, Name, NewConnection, SystemClock, TenantSettings};
use crate::store::Store;

#[derive(Clone, Debug)]
pub struct JoinsOptions {
    pub binary: std::path::PathBuf,
    pub joins: usize,
    /// Joins a second (API Gateway admits 500 new connections a second per account).
    pub rate: f64,
    /// The room's announce limit (the tenant's `presence_announce_max_users`).
    pub announce_max_users: u64,
    pub account: AccountSettings,
    /// moto (start it with tests/moto_server.py): the table, behind the partition layer.
    pub dynamodb_endpoint: String,
    pub batch_size: usize,
    pub batch_window: Duration,
    pub message_every: Duration,
    pub one_by_one: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct JoinsReport {
    pub joins: usize,
    pub rate: f64,
    /// Joins written a second: the storm as the table took it.
    pub written_per_second: f64,
    pub storm_s: f64,
    /// From the storm's first write until the batch holding its last join was done.
    pub applied_s: f64,
    /// `applied_s` after the storm's last write: the backlog the storm left.
    pub lag_s: f64,
    pub batches: usize,
    pub batch_failures: usize,
    pub one_by_one: bool,
    /// The room's count at the end, and what it must be (the joins and the member who talks).
    pub users: u64,
    pub expected_users: u64,
    /// `joined` transitions, and those announced (the room within its limit).
    pub joined: u64,
    pub announced: u64,
    pub announce_max_users: u64,
    /// Membership records applied in a run with an earlier one (one write for many).
    pub applied_in_runs: u64,
    pub messages: usize,
    pub message_wait_p50_s: f64,
    pub message_wait_max_s: f64,
    /// The room key's write units: every join's membership (the handler's).
    pub room_write_units: f64,
    pub write_units_per_join: f64,
    /// The room's presence key's (`PRESENCE#…`): the users' presence items and the count.
    pub presence_write_units_per_join: f64,
    /// The busier key's write units a second over `applied_s`, over one partition's 1,000.
    pub fraction_of_partition: f64,
    pub room_throttled: u64,
}

const TENANT: &str = "bench";
const ROOM: &str = "storm";

pub async fn run(options: &JoinsOptions) -> anyhow::Result<JoinsReport> {
    let endpoint = Endpoint::start(&options.binary, options.account, Some(&options.dynamodb_endpoint)).await?;
    let layer =
        endpoint.layer.clone().ok_or_else(|| anyhow::anyhow!("the bench endpoint started no partition layer"))?;
    let sdk = sdk_config();
    let direct = crate::config::dynamodb_client(&sdk, Some(&options.dynamodb_endpoint));
    let table = format!("bench-joins-{}", std::process::id());
    crate::store::dynamodb::create_table(&direct, &table).await?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let dynamo: Arc<dyn Store> = Arc::new(
        crate::store::dynamodb::DynamoStore::new(crate::config::dynamodb_client(&sdk, Some(&layer)), table)
            .with_metrics(metrics.clone()),
    );
    // The stream: the embedded store makes the records of what is written to the table.
    let records = crate::store::memory::MemoryStore::new(clock.clone());
    let mut stream = records.subscribe();
    let tenant = Name::parse("tenant", TENANT).map_err(anyhow::Error::msg)?;
    let settings =
        TenantSettings { presence_announce_max_users: Some(options.announce_max_users), ..TenantSettings::new(TENANT) };
    dynamo.put_tenant_settings(&settings).await?;

    let delivery =
        crate::deliver::DeliverySettings { endpoint_override: Some(endpoint.url.clone()), ..Default::default() };
    let assembly =
        crate::assembly::Assembly::new(sdk, dynamo.clone(), clock.clone(), metrics.clone()).with_delivery(delivery);
    // As deployed: a message to a room of 2,000 or more leaves the batch for the fan-out stage.
    let stage = crate::deliver::stage::LocalStage::new(assembly.deliverer());
    let mut processor = assembly.processor().with_hand_off(crate::deliver::stage::HandOff {
        stage: stage.clone(),
        recipients: crate::deliver::stage::HANDOFF_RECIPIENTS,
    });
    if options.one_by_one {
        processor = processor.without_presence_runs();
    }

    // The member who talks, in the room before the storm.
    let host = connection(&tenant, "host", &endpoint.url);
    connect(dynamo.as_ref(), &records, &host).await?;
    let raw: Vec<serde_json::Value> =
        std::iter::from_fn(|| stream.try_recv().ok()).map(serde_json::to_value).collect::<Result<_, _>>()?;
    processor.process_batch(&raw).await;
    endpoint.reset().await?;
    let before = metrics.snapshot();

    let written: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let started = Instant::now();
    let writer = {
        let (dynamo, records, written, url, options) =
            (dynamo.clone(), records.clone(), written.clone(), endpoint.url.clone(), options.clone());
        let (tenant, clock) = (tenant.clone(), clock.clone());
        tokio::spawn(async move {
            // Connects in flight at once: the handler's Lambdas run side by side.
            let permits = Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = tokio::task::JoinSet::new();
            let mut next_message = Duration::ZERO;
            let mut said = 0usize;
            for i in 0..options.joins {
                let at = started + Duration::from_secs_f64(i as f64 / options.rate);
                tokio::time::sleep_until(at.into()).await;
                if started.elapsed() >= next_message {
                    let text = format!("during the storm {said}");
                    written.lock().unwrap_or_else(|p| p.into_inner()).insert(text.clone(), Instant::now());
                    records.put_message(&Message::new(&host, ROOM, text, clock.now(), 3600)).await?;
                    said += 1;
                    next_message += options.message_every;
                }
                let permit = permits.clone().acquire_owned().await?;
                let (dynamo, records) = (dynamo.clone(), records.clone());
                let c = connection(&tenant, &format!("j{i:06}"), &url);
                tasks.spawn(async move {
                    let _permit = permit;
                    connect(dynamo.as_ref(), &records, &c).await
                });
            }
            while let Some(done) = tasks.join_next().await {
                done??;
            }
            anyhow::Ok((started.elapsed(), said))
        })
    };

    // Lambda's side of one shard: a batch at a time.
    let (mut batches, mut batch_failures) = (0, 0);
    let mut waits = Vec::new();
    let mut last_join_applied = started;
    let mut pending = Vec::new();
    loop {
        let window_ends = Instant::now() + options.batch_window;
        while pending.len() < options.batch_size {
            match tokio::time::timeout_at(window_ends.into(), stream.recv()).await {
                Ok(Some(record)) => pending.push(record),
                Ok(None) | Err(_) => break,
            }
        }
        if pending.is_empty() {
            if writer.is_finished() {
                break;
            }
            continue;
        }
        let raw: Vec<serde_json::Value> = pending.drain(..).map(serde_json::to_value).collect::<Result<_, _>>()?;
        // A batch that reports a failure is given again from the start, as Lambda retries it.
        for attempt in 1.. {
            let outcome = processor.process_batch(&raw).await;
            if outcome.failure.is_none() {
                break;
            }
            batch_failures += 1;
            anyhow::ensure!(attempt < 10, "a batch failed ten times: {:?}", outcome.failure);
        }
        batches += 1;
        let done = Instant::now();
        let written = written.lock().unwrap_or_else(|p| p.into_inner());
        for record in &raw {
            let sk = record.pointer("/dynamodb/Keys/sk/S").and_then(serde_json::Value::as_str).unwrap_or("");
            if sk.starts_with("CONN#") {
                last_join_applied = done;
            }
            if let Some(at) = record.pointer("/dynamodb/NewImage/body/S").and_then(|b| written.get(b.as_str()?)) {
                waits.push(done.duration_since(*at).as_secs_f64());
            }
        }
    }
    let (storm, messages) = writer.await??;
    stage.idle().await;
    let ran = metrics.snapshot().since(&before);
    let room = endpoint.partition(&crate::model::room_pk(TENANT, ROOM)).await?;
    let presence = endpoint.partition(&crate::model::presence_pk(TENANT, ROOM)).await?;
    let users = dynamo.room_presence(TENANT, ROOM).await?.map_or(0, |r| r.users);
    waits.sort_by(f64::total_cmp);
    let applied_s = last_join_applied.duration_since(started).as_secs_f64();
    Ok(JoinsReport {
        joins: options.joins,
        rate: options.rate,
        written_per_second: options.joins as f64 / storm.as_secs_f64(),
        storm_s: storm.as_secs_f64(),
        applied_s,
        lag_s: applied_s - storm.as_secs_f64(),
        batches,
        batch_failures,
        one_by_one: options.one_by_one,
        users,
        expected_users: options.joins as u64 + 1,
        joined: ran.presence_joined,
        announced: ran.presence_joined - ran.presence_unannounced,
        announce_max_users: options.announce_max_users,
        applied_in_runs: ran.presence_ahead,
        messages,
        message_wait_p50_s: waits.get(waits.len() / 2).copied().unwrap_or(f64::NAN),
        message_wait_max_s: waits.last().copied().unwrap_or(f64::NAN),
        room_write_units: room.write_units,
        write_units_per_join: room.write_units / options.joins.max(1) as f64,
        presence_write_units_per_join: presence.write_units / options.joins.max(1) as f64,
        fraction_of_partition: room.write_units.max(presence.write_units)
            / applied_s.max(f64::EPSILON)
            / crate::partitions::WRITE_UNITS_PER_SECOND,
        room_throttled: room.throttled + presence.throttled,
    })
}

fn connection(tenant: &Name, id: &str, endpoint: &str) -> Connection {
    Connection::new(NewConnection {
        connection_id: id,
        tenant,
        user_id: id,
        connection_type: None,
        deployment_id: None,
        rooms: BTreeSet::from([ROOM.to_string()]),
        endpoint: endpoint.to_string(),
        now: chrono::Utc::now(),
        ttl_seconds: 3600,
    })
}

/// What `$connect` writes: to the table (through the layer, charged), then its records.
async fn connect(table: &dyn Store, records: &crate::store::memory::MemoryStore, c: &Connection) -> anyhow::Result<()> {
    let membership = [c.membership(ROOM, JoinReason::Connect, c.connected_at)];
    table.put_connection(c, &membership).await?;
    records.put_connection(c, &membership).await?;
    Ok(())
}

impl JoinsReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} joins into one room at {:.0}/s (written at {:.0}/s over {:.1} s); presence {}; batches of up to the \
             stream's batch size, one at a time\n\n",
            self.joins,
            self.rate,
            self.written_per_second,
            self.storm_s,
            if self.one_by_one { "one record at a time (--one-by-one)" } else { "in runs" },
        );
        out.push_str("| applied after | lag after the storm | batches | users / expected | joined / announced (limit) | applied in runs | messages | message wait p50 / max | write units / join: room key, presence key | × one partition's 1,000 WCU/s (the busier key) | throttled |\n");
        out.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        out.push_str(&format!(
            "| {:.2} s | {:.2} s | {} | {} / {} | {} / {} ({}) | {} | {} | {:.2} / {:.2} s | {:.2}, {:.2} | {:.2} | {} |\n",
            self.applied_s,
            self.lag_s,
            self.batches,
            self.users,
            self.expected_users,
            self.joined,
            self.announced,
            self.announce_max_users,
            self.applied_in_runs,
            self.messages,
            self.message_wait_p50_s,
            self.message_wait_max_s,
            self.write_units_per_join,
            self.presence_write_units_per_join,
            self.fraction_of_partition,
            self.room_throttled,
        ));
        out
    }
}
