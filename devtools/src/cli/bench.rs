//! `roomcast bench`: the local stack under load (see [`crate::bench`] and docs/PERFORMANCE.md).

use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Option<Scenario>,
    /// A running `roomcast dev` (e.g. http://127.0.0.1:8080); by default the bench starts one.
    #[arg(long)]
    url: Option<String>,
    /// WebSocket connections per phase.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Members per room (the rooms are connections / room size).
    #[arg(long, default_value_t = 1000)]
    room_size: usize,
    /// Messages per phase.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Messages per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// A plugin component: adds a phase whose tenant runs it, and the memory measurement.
    #[arg(long, value_name = "FILE.wasm")]
    plugin: Option<std::path::PathBuf>,
    /// PostToConnection calls that measure the raw @connections rate.
    #[arg(long, default_value_t = 20_000)]
    raw_posts: usize,
    /// A hostile component (tests/guests/hostile): adds a phase in which the plugin phase's traffic
    /// shares the stack with a tenant running it, whose users send loops, sleeps, memory bombs
    /// and routes to every room it can, at --hostile-rate.
    #[arg(long, value_name = "FILE.wasm", requires = "plugin")]
    hostile: Option<std::path::PathBuf>,
    /// The hostile tenant's messages per second.
    #[arg(long, default_value_t = 20.0)]
    hostile_rate: f64,
    /// With --hostile, a phase beside a flooding tenant too: its frames per second (held by its
    /// rate limits, the defaults; the measured tenant has none).
    #[arg(long, default_value_t = 500.0)]
    flood_rate: f64,
    /// Run the started `roomcast dev` on this DynamoDB API (moto) instead of the embedded store,
    /// so that queries cost what they cost.
    #[arg(long)]
    dynamodb_endpoint: Option<String>,
    /// Tenants that run the plugin for the memory measurement.
    #[arg(long, default_value_t = 100)]
    plugin_tenants: usize,
    /// The secret the dev stack checks `$connect` tokens against.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", default_value = "roomcast-dev-secret", hide_env_values = true)]
    jwt_secret: String,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum Scenario {
    /// One processor's fan-out at AWS's latency and quota: rooms of the given sizes, against an
    /// `@connections` that answers after --latency and admits --quota calls a second.
    Fanout(FanoutArgs),
    /// A join storm into one room (API Gateway's 500 new connections a second), against one
    /// DynamoDB partition's 1,000 write units a second: how long presence takes to apply it,
    /// and how long a message sent during it waits.
    Joins(JoinsArgs),
    /// What the sweeper and a history page read, before and after their indexes and budgets,
    /// against a table holding far more than they serve (moto behind the partition layer).
    Costs(CostsArgs),
    /// The fan-out bench's `@connections` endpoint (started by `bench fanout`).
    #[command(hide = true)]
    Endpoint(EndpointArgs),
}

#[derive(Debug, clap::Args)]
struct FanoutArgs {
    /// Room sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    room_sizes: Vec<usize>,
    /// Messages into each room, in one stream batch.
    #[arg(long, default_value_t = 10)]
    messages: usize,
    /// Each `@connections` call's latency (API Gateway from a Lambda in its region: tens of ms).
    #[arg(long, default_value = "20ms", value_parser = crate::gateway::account::parse_duration)]
    latency: Duration,
    /// The most jitter added to a call (default: a quarter of --latency).
    #[arg(long, value_parser = crate::gateway::account::parse_duration)]
    jitter: Option<Duration>,
    /// The account's quota, calls a second (API Gateway's default: 10000).
    #[arg(long, default_value_t = crate::gateway::account::DEFAULT_QUOTA)]
    quota: f64,
    /// The deliverer's ceiling on calls in flight (ROOMCAST_DELIVERY_CONCURRENCY).
    #[arg(long, default_value_t = crate::deliver::DeliverySettings::default().concurrency)]
    concurrency: usize,
    /// Read the room from this DynamoDB API (moto) through a layer imposing one partition's
    /// latency and throughput, and report what each message read.
    #[arg(long)]
    dynamodb_endpoint: Option<String>,
    /// Read the whole room for every message, as before the processor kept rosters: the
    /// figure to compare the roster's against.
    #[arg(long)]
    no_roster: bool,
    /// Frames for this many recipients or more go to a fan-out stage in this process (a worker
    /// with a deliverer of its own, as the fanout function's container); 0: none does, every
    /// frame is served in its batch, as before the stage.
    #[arg(long, default_value_t = crate::deliver::stage::HANDOFF_RECIPIENTS)]
    handoff_recipients: usize,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct JoinsArgs {
    /// A DynamoDB API (moto; start it with tests/moto_server.py) for the table, which the bench
    /// reaches through a layer imposing one partition's latency and throughput.
    #[arg(long)]
    dynamodb_endpoint: String,
    /// Connections that join the room.
    #[arg(long, default_value_t = 5000)]
    joins: usize,
    /// Joins a second (API Gateway admits 500 new connections a second).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// The room announces `joined` up to this many users (the tenant's setting).
    #[arg(long, default_value_t = crate::presence::DEFAULT_ANNOUNCE_MAX_USERS)]
    announce_max_users: u64,
    /// A member who was in the room before sends a message this often during the storm.
    #[arg(long, default_value = "1s", value_parser = crate::gateway::account::parse_duration)]
    message_every: Duration,
    /// Records per stream batch (the template's BatchSize).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// How long a batch waits to fill (the template's MaximumBatchingWindowInSeconds).
    #[arg(long, default_value = "1s", value_parser = crate::gateway::account::parse_duration)]
    batch_window: Duration,
    /// Each `@connections` call's latency.
    #[arg(long, default_value = "20ms", value_parser = crate::gateway::account::parse_duration)]
    latency: Duration,
    /// The account's quota, calls a second.
    #[arg(long, default_value_t = crate::gateway::account::DEFAULT_QUOTA)]
    quota: f64,
    /// Apply presence one membership record at a time, as before runs: the figure to compare.
    #[arg(long)]
    one_by_one: bool,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CostsArgs {
    /// A DynamoDB API (moto; start it with tests/moto_server.py), reached through a layer that
    /// counts every item and byte read.
    #[arg(long)]
    dynamodb_endpoint: String,
    /// Messages in the table (about 200 bytes each, in rooms of 1,000).
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Connections in the table, each with its membership and its user's presence.
    #[arg(long, default_value_t = 20_000)]
    connections: usize,
    /// Of those, last seen an hour ago and gone at API Gateway.
    #[arg(long, default_value_t = 200)]
    stale: usize,
    /// Members per room.
    #[arg(long, default_value_t = 100)]
    room_size: usize,
    /// How long `GetConnection` takes to answer.
    #[arg(long, default_value = "20ms", value_parser = crate::gateway::account::parse_duration)]
    latency: Duration,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct EndpointArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, value_parser = crate::gateway::account::parse_duration)]
    latency: Duration,
    #[arg(long, value_parser = crate::gateway::account::parse_duration)]
    jitter: Duration,
    /// 0: no quota.
    #[arg(long)]
    quota: f64,
    #[arg(long)]
    dynamodb_upstream: Option<String>,
}

pub async fn bench_main(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Some(Scenario::Fanout(fanout)) => return fanout_main(fanout).await,
        Some(Scenario::Joins(joins)) => return joins_main(joins).await,
        Some(Scenario::Costs(costs)) => return costs_main(costs).await,
        Some(Scenario::Endpoint(e)) => {
            let account = crate::gateway::account::AccountSettings {
                latency: e.latency,
                jitter: e.jitter,
                quota: (e.quota > 0.0).then_some(e.quota),
                burst: e.quota.max(1.0),
            };
            return crate::bench::fanout::serve_endpoint(e.port, account, e.dynamodb_upstream).await;
        }
        None => {}
    }
    let options = crate::bench::Options {
        url: args.url,
        binary: std::env::current_exe()?,
        connections: args.connections,
        room_size: args.room_size,
        messages: args.messages,
        rate: args.rate,
        plugin: args.plugin.as_deref().map(crate::plugins::read_component).transpose()?,
        raw_posts: args.raw_posts,
        plugin_tenants: args.plugin_tenants,
        hostile: args.hostile.as_deref().map(crate::plugins::read_component).transpose()?,
        hostile_rate: args.hostile_rate,
        flood_rate: args.flood_rate,
        dynamodb_endpoint: args.dynamodb_endpoint,
        secret: args.jwt_secret.into_bytes(),
        patience: Duration::from_secs(30),
    };
    let report = crate::bench::run(&options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn fanout_main(args: FanoutArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.quota > 0.0, "--quota must be above 0: it is the limit the figures are measured against");
    anyhow::ensure!(args.room_sizes.iter().all(|&n| n > 0), "--room-sizes must all be above 0");
    let options = crate::bench::fanout::FanoutOptions {
        binary: std::env::current_exe()?,
        room_sizes: args.room_sizes,
        messages: args.messages.max(1),
        account: crate::gateway::account::AccountSettings {
            latency: args.latency,
            jitter: args.jitter.unwrap_or(args.latency / 4),
            quota: Some(args.quota),
            burst: args.quota,
        },
        concurrency: args.concurrency.clamp(1, 600),
        dynamodb_endpoint: args.dynamodb_endpoint,
        roster: !args.no_roster,
        handoff_recipients: args.handoff_recipients,
    };
    let report = crate::bench::fanout::run(&options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn joins_main(args: JoinsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.joins > 0 && args.rate > 0.0, "--joins and --rate must be above 0");
    anyhow::ensure!(args.quota > 0.0, "--quota must be above 0");
    let options = crate::bench::joins::JoinsOptions {
        binary: std::env::current_exe()?,
        joins: args.joins,
        rate: args.rate,
        announce_max_users: args.announce_max_users,
        account: crate::gateway::account::AccountSettings {
            latency: args.latency,
            jitter: args.latency / 4,
            quota: Some(args.quota),
            burst: args.quota,
        },
        dynamodb_endpoint: args.dynamodb_endpoint,
        batch_size: args.batch_size.clamp(1, 10_000),
        batch_window: args.batch_window,
        message_every: args.message_every.max(Duration::from_millis(10)),
        one_by_one: args.one_by_one,
    };
    let report = crate::bench::joins::run(&options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

async fn costs_main(args: CostsArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.stale <= args.connections, "--stale must be at most --connections");
    let options = crate::bench::costs::CostsOptions {
        dynamodb_endpoint: args.dynamodb_endpoint,
        messages: args.messages,
        connections: args.connections,
        stale: args.stale,
        room_size: args.room_size.max(1),
        latency: args.latency,
    };
    let report = crate::bench::costs::run(&options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
