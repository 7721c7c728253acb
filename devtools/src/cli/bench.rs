//! `roomcast bench`: the local stack under load (see [`crate::bench`] and docs/PERFORMANCE.md).

use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
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
    /// A hostile component (tests/hostile): adds a phase in which the plugin phase's traffic
    /// shares the stack with a tenant running it, whose users send loops, sleeps, memory bombs
    /// and routes to every room it can, at --hostile-rate.
    #[arg(long, value_name = "FILE.wasm", requires = "plugin")]
    hostile: Option<std::path::PathBuf>,
    /// The hostile tenant's messages per second.
    #[arg(long, default_value_t = 20.0)]
    hostile_rate: f64,
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

pub async fn bench_main(args: BenchArgs) -> anyhow::Result<()> {
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
