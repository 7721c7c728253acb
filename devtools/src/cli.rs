//! The `roomcast` command.
//!
//! * `roomcast dev` — the whole system on loopback: gateway emulator, store, processor, page.
//! * `roomcast table create` — create the table as the deployment does.
//! * `roomcast capture` / `roomcast replay` — read a stream into JSON lines; replay records and
//!   print every decision.
//! * `roomcast poll` — run the stream processor over a real table's stream (DynamoDB Streams
//!   API), the way `roomcast dev --dynamodb-endpoint` does.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config;
use crate::store::dynamodb::DynamoStore;

mod bench;
mod operate;
mod plugins;
mod publish;
mod replay;
mod scaffold;
mod tenant;

#[derive(Debug, Parser)]
#[command(
    name = "roomcast",
    version,
    about = "Real-time rooms, presence and tenant plugins for API Gateway WebSocket APIs"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system locally: an API Gateway WebSocket emulator, the handlers, a store with
    /// a stream, the processor and a browser page. No AWS account needed.
    Dev(DevArgs),
    /// Manage the DynamoDB table.
    Table {
        #[command(subcommand)]
        command: TableCommand,
    },
    /// Work with tenant plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Publish a message into a room as a backend does: into a running `roomcast dev` (its
    /// `POST /publish`, with a token minted from --jwt-secret) or straight into a table. A deployed
    /// stack's endpoints take any HTTP client (README, "Publishing from a backend").
    Publish(PublishArgs),
    /// A tenant's settings.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Mint an HS256 token for `$connect` (tenant and sub claims), e.g. to try a deployment.
    Token {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        /// The `$connect` secret (default: `roomcast dev`'s, so a dev token needs no setup).
        #[arg(long, env = "ROOMCAST_JWT_SECRET", default_value = "roomcast-dev-secret", hide_env_values = true)]
        secret: String,
        /// Lifetime, seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Scopes, space-separated: `publish` makes a tenant backend's publish token.
        #[arg(long)]
        scope: Option<String>,
        /// The rooms the token may join, comma-separated names or prefixes ending in `*`
        /// (`support-*,team-42`): the `rooms` claim. Without it, any room of the tenant.
        #[arg(long, value_delimiter = ',')]
        rooms: Option<Vec<String>>,
    },
    /// Run an admin operation against any table: the admin Lambda's event, as JSON, e.g.
    /// '{"action":"get_user_connections","tenant":"acme","userId":"ann"}'.
    Admin {
        /// The event: get_user_connections, get_all_connections, update_connection_status or
        /// cleanup_stale_connections (see the README).
        event: String,
        /// A running `roomcast dev`, e.g. http://127.0.0.1:8080: the operation runs there, against
        /// its table and its @connections (no AWS credentials needed).
        #[arg(long, env = "ROOMCAST_DEV_URL", conflicts_with_all = ["dynamodb_endpoint", "management_endpoint"])]
        dev: Option<String>,
        #[command(flatten)]
        table: TableArgs,
        /// Where GetConnection asks (cleanup); by default each connection's own endpoint.
        #[arg(long, env = "ROOMCAST_MANAGEMENT_ENDPOINT")]
        management_endpoint: Option<String>,
    },
    /// Read a table's stream (every shard, in order per shard) into JSON lines for `replay`.
    Capture(replay::CaptureArgs),
    /// Run stream records through the processor and print every decision: the decoded change,
    /// each plugin call, each effect. A dry run unless --execute. Exit status 2 when any record
    /// was skipped.
    Replay(replay::ReplayArgs),
    /// Load the local stack over real WebSockets: deliveries per second against the raw
    /// @connections rate, latency p50/p99, CPU per stream record and memory (docs/PERFORMANCE.md).
    Bench(bench::BenchArgs),
    /// Act on a user as a tenant's backend does: disconnect every connection of theirs, and keep
    /// them out for a while (`--refuse-for`). Through a running `roomcast dev`, a deployed stack's
    /// publish endpoint, or straight into a table.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Tenants' webhooks in a deployed stack.
    Webhooks {
        #[command(subcommand)]
        command: WebhooksCommand,
    },
    /// Run the stream processor over a table's stream until Ctrl-C.
    Poll {
        #[command(flatten)]
        table: TableArgs,
        /// Send every @connections call here instead of each connection's own endpoint.
        #[arg(long, env = "ROOMCAST_MANAGEMENT_ENDPOINT")]
        management_endpoint: Option<String>,
        /// Start with records already in the stream instead of only new ones.
        #[arg(long)]
        from_trim_horizon: bool,
    },
}

/// `roomcast publish`'s arguments.
#[derive(Debug, clap::Args)]
struct PublishArgs {
    #[arg(long)]
    pub(super) tenant: String,
    #[arg(long)]
    pub(super) room: String,
    /// The message.
    pub(super) message: String,
    /// Who it is from (default: backend).
    #[arg(long)]
    pub(super) user_id: Option<String>,
    /// A repeat with the same key within the window sends nothing new and answers the first id.
    #[arg(long)]
    pub(super) idempotency_key: Option<String>,
    /// The HS256 secret the dev stack checks tokens against.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", default_value = "roomcast-dev-secret", hide_env_values = true)]
    pub(super) jwt_secret: String,
    /// A deployed stack's endpoint: the `PublishUrl` output (the function URL; the request is
    /// SigV4-signed with your AWS credentials) or, with --token, `TenantPublishUrl`.
    #[arg(long, conflicts_with = "dev")]
    pub(super) endpoint: Option<String>,
    /// A tenant's publish token (scope `publish`), for `TenantPublishUrl`.
    #[arg(long, env = "ROOMCAST_PUBLISH_TOKEN", hide_env_values = true, requires = "endpoint")]
    pub(super) token: Option<String>,
    #[command(flatten)]
    pub(super) target: PluginTargetArgs,
}

#[derive(Debug, clap::Args)]
struct DevArgs {
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Use this DynamoDB API (moto, DynamoDB Local, LocalStack, AWS) instead of the embedded
    /// store; the table is created when missing and its stream is polled.
    #[arg(long, env = "DYNAMODB_ENDPOINT_URL")]
    dynamodb_endpoint: Option<String>,
    #[arg(long, env = "TABLE_NAME", default_value = "roomcast")]
    table: String,
    /// Append every stream record processed to FILE, one JSON line each (DynamoDB's format).
    #[arg(long, value_name = "FILE")]
    stream_log: Option<std::path::PathBuf>,
    /// The HS256 secret that `$connect` tokens are checked against.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", default_value = "roomcast-dev-secret", hide_env_values = true)]
    jwt_secret: String,
    /// Also accept unsigned `?tenant=…&user_id=…` at connect. Never in production.
    #[arg(long)]
    insecure_dev_auth: bool,
    /// Deliver every stream batch twice, as Lambda's event source may after a failure or a
    /// timeout: a client sees each message twice with the same id and must show it once.
    #[arg(long)]
    redeliver: bool,
    /// Deliver the stream as AWS may, with interleavings this seed picks: order kept per item
    /// only (a room's records on two shards, their batches at once, one batch in four twice), as
    /// after a partition split or with ParallelizationFactor above 1. The embedded store only.
    #[arg(long, value_name = "SEED", conflicts_with = "dynamodb_endpoint")]
    per_item_order: Option<u64>,
    /// A frame for this many recipients or more leaves the stream batch for the fan-out stage
    /// (worker tasks here, an SQS queue and the `fanout` function in AWS), so that a big room
    /// holds up no other; 0 serves every frame in its batch.
    #[arg(long, default_value_t = crate::deliver::stage::HANDOFF_RECIPIENTS)]
    handoff_recipients: usize,
    /// A rate limit for every tenant whose settings do not set it, as NAME=N a second (0: none);
    /// repeatable. Names: messages_per_connection (10), messages_per_user (20),
    /// messages_per_tenant (1000), joins_per_connection (5), joins_per_user (10),
    /// joins_per_tenant (200), connects_per_user (5), connects_per_tenant (200),
    /// reads_per_connection (10), reads_per_user (20), reads_per_tenant (0).
    #[arg(long = "limit", value_name = "NAME=N", value_parser = crate::limits::parse_setting)]
    limits: Vec<(String, u32)>,
    /// Connection and membership TTL, seconds.
    #[arg(long, env = "CONNECTION_TTL_SECONDS", default_value_t = 3600)]
    connection_ttl: i64,
    /// Close connections idle this long, seconds (API Gateway: 600).
    #[arg(long, default_value_t = 600)]
    idle_timeout: u64,
    /// Close connections open this long, seconds (API Gateway: 7200).
    #[arg(long, default_value_t = 7200)]
    max_connection: u64,
    /// Load DIR/<tenant>.wasm as each tenant's plugin at start.
    #[arg(long, value_name = "DIR")]
    plugins: Option<std::path::PathBuf>,
    /// Answer every `@connections` call after this long (e.g. 20ms, what API Gateway takes from
    /// a Lambda in its region), plus up to a quarter of it as jitter; also turns on the
    /// account's quota (--management-quota). Default: loopback, no latency.
    #[arg(long, value_name = "DURATION", value_parser = crate::gateway::account::parse_duration)]
    management_latency: Option<Duration>,
    /// The jitter added to --management-latency, at most (default: a quarter of it).
    #[arg(long, value_name = "DURATION", value_parser = crate::gateway::account::parse_duration)]
    management_jitter: Option<Duration>,
    /// The account's `@connections` quota, calls a second, past which calls answer
    /// `429 LimitExceededException` (default 10000 with --management-latency, else none; 0: none).
    #[arg(long, value_name = "CALLS_PER_SECOND")]
    management_quota: Option<f64>,
    /// The quota's burst, calls (API Gateway's default: 5000).
    #[arg(long, default_value_t = crate::gateway::account::DEFAULT_BURST)]
    management_burst: f64,
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Check a component and upload it for a tenant; the processor activates it.
    Upload {
        #[arg(long)]
        tenant: String,
        file: std::path::PathBuf,
        /// When the plugin faults: deliver by the default rules (open) or reject (closed).
        #[arg(long, value_parser = ["open", "closed"], default_value = "open")]
        policy: String,
        /// Fuel per call for this tenant (default: the deployment's ROOMCAST_PLUGIN_FUEL).
        #[arg(long)]
        fuel: Option<u64>,
        /// Memory cap for this tenant, MiB (default: ROOMCAST_PLUGIN_MEMORY_MIB).
        #[arg(long)]
        memory_mib: Option<usize>,
        /// Wall-clock deadline per call for this tenant, ms (default: ROOMCAST_PLUGIN_DEADLINE_MS).
        #[arg(long)]
        deadline_ms: Option<u64>,
        /// Rooms this tenant's `route` may add to a message (default 8, at most 64).
        #[arg(long)]
        max_extra_rooms: Option<usize>,
        /// Users this tenant's `route` may narrow a message to (default 100, at most 1000).
        #[arg(long)]
        max_only_users: Option<usize>,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// A tenant's uploaded versions and their status.
    List {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Make an uploaded version the tenant's plugin (rollback).
    Activate {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        version: String,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Run the tenant without a plugin.
    Disable {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Run a component's hook on an event, under the same limits as the processor, and print
    /// its answer with the fuel, time and log. EVENT.json is {"message": {...}} (on-message),
    /// {"join": {..., "claims": {...}}} (authorize-join) or {"welcome": {...}}, with an optional
    /// "time" in epoch milliseconds.
    Test {
        file: std::path::PathBuf,
        #[arg(long, value_name = "EVENT.json")]
        event: std::path::PathBuf,
        /// The tenant's configuration, as the plugin reads it: a JSON object of strings.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        /// Fuel per call.
        #[arg(long, default_value_t = 10_000_000)]
        fuel: u64,
        /// Wall-clock deadline per call, milliseconds.
        #[arg(long, default_value_t = 100)]
        deadline_ms: u64,
        /// Memory cap, MiB.
        #[arg(long, default_value_t = 16)]
        memory_mib: usize,
    },
    /// A tenant's plugin configuration: key/value pairs its plugin reads (`host.config`), up to
    /// 16 KB. A change reaches every processor from its next batch on; no re-upload.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write a ready plugin crate in NAME/: the SDK, a plugin with a unit test, and how to build,
    /// test and upload it.
    New {
        name: String,
        /// Where the crate's directory goes (default: here).
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Where the roomcast-plugin-sdk crate is, as a path dependency (default: its version on
        /// crates.io).
        #[arg(long)]
        sdk_path: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Set KEY=VALUE pairs (other keys are kept).
    Set {
        #[arg(long)]
        tenant: String,
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Print the configuration, or one key's value.
    Get {
        #[arg(long)]
        tenant: String,
        key: Option<String>,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Remove keys.
    Unset {
        #[arg(long)]
        tenant: String,
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Print the tenant's settings (unset ones take the deployment's defaults).
    Show {
        tenant: String,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Change the tenant's settings; the processor reads them from its next batch on, the
    /// handlers within 5 s. A setting left out keeps its value.
    Set {
        tenant: String,
        /// Rooms with more users announce no joined/left and offer counts and `who` only
        /// (default: ROOMCAST_PRESENCE_ANNOUNCE_MAX_USERS, 100).
        #[arg(long)]
        presence_announce_max_users: Option<u64>,
        /// A rate limit of the tenant's own, as NAME=N a second (0: none); repeatable. Names:
        /// messages_per_connection, messages_per_user, messages_per_tenant, joins_per_connection,
        /// joins_per_user, joins_per_tenant, connects_per_user, connects_per_tenant,
        /// reads_per_connection, reads_per_user, reads_per_tenant. Unset ones
        /// take the deployment's (ROOMCAST_LIMIT_{NAME}). Handlers read it within 5 s.
        #[arg(long = "limit", value_name = "NAME=N", value_parser = crate::limits::parse_setting)]
        limits: Vec<(String, u32)>,
        /// Rooms that keep their latest message, as room names or prefixes ending in `*` (`*`:
        /// every room); repeatable, added to those set before. Joining one delivers its newest
        /// message first.
        #[arg(long = "latest-on-join", value_name = "PATTERN", value_parser = crate::model::parse_room_pattern)]
        latest_on_join: Vec<String>,
        /// Forget the rooms that keep their latest message (before adding any --latest-on-join).
        #[arg(long)]
        no_latest_on_join: bool,
        /// Where the tenant's backend hears what happens in its rooms: signed, batched POSTs (the
        /// README's "Webhooks"). Needs --webhook-secret-env the first time.
        #[arg(long, value_name = "URL")]
        webhook_url: Option<String>,
        /// The environment variable holding the webhook's signing secret (at least 16 bytes).
        #[arg(long, value_name = "VAR")]
        webhook_secret_env: Option<String>,
        /// An event type the webhook gets (repeatable; replaces the list; none named: all but
        /// message.sent and message.rejected).
        #[arg(long = "webhook-event", value_name = "TYPE")]
        webhook_events: Vec<String>,
        /// Remove the tenant's webhook.
        #[arg(long, conflicts_with_all = ["webhook_url", "webhook_secret_env", "webhook_events"])]
        no_webhook: bool,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Set how the tenant's $connect tokens are checked: its identity provider's JWKS (RS256 or
    /// ES256, with --issuer and optionally --audience), or an HS256 secret of its own (read from
    /// the environment variable --hs256-secret-env names). Its tokens then carry no `tenant`
    /// claim if they like: clients connect with ?tenant=NAME. The deployment's shared secret no
    /// longer admits anyone to it. --clear goes back to the shared secret. Authorizers read it
    /// within 30 s. Prints the identity, secret left out.
    Identity {
        tenant: String,
        #[arg(long, conflicts_with_all = ["hs256_secret_env", "clear"], requires_all = ["issuer", "audience"])]
        jwks_url: Option<String>,
        /// The `iss` its tokens carry (required with --jwks-url).
        #[arg(long)]
        issuer: Option<String>,
        /// The `aud` its tokens must carry (required with --jwks-url: tenants sharing an identity
        /// provider are told apart by it).
        #[arg(long)]
        audience: Option<String>,
        #[arg(long, value_name = "VAR", conflicts_with = "clear")]
        hs256_secret_env: Option<String>,
        #[arg(long)]
        clear: bool,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
    /// Revoke tokens of a tenant with its own identity: one token by its id (`jti`, kept until
    /// its expiry), every token of one user issued until now, or every token issued until now.
    Revoke {
        tenant: String,
        /// A token id, with --until (its `exp`, epoch seconds).
        #[arg(long, requires = "until")]
        token_id: Option<String>,
        #[arg(long)]
        until: Option<i64>,
        /// Every token of this user issued until now.
        #[arg(long)]
        user: Option<String>,
        /// Every token of the tenant issued until now.
        #[arg(long, conflicts_with_all = ["token_id", "user"])]
        all: bool,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Close every connection of the user (each is told `terminated`, its rooms see it leave).
    Disconnect(UserDisconnectArgs),
    /// Put every connection of the user into a room, under the rules of a client's own join.
    Join(UserRoomArgs),
    /// Take every connection of the user out of a room.
    Leave(UserRoomArgs),
    /// Send a message to every connection of the user, in any room (a `user_message` frame).
    Send(UserSendArgs),
}

#[derive(Debug, clap::Args)]
struct UserSendArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    user: String,
    /// The message's text (JSON text if the client expects it).
    #[arg(long)]
    message: String,
    /// Who it says it is from (default `backend`).
    #[arg(long)]
    from: Option<String>,
    #[command(flatten)]
    via: BackendArgs,
}

#[derive(Debug, clap::Args)]
struct UserRoomArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    room: String,
    #[command(flatten)]
    via: BackendArgs,
}

#[derive(Debug, clap::Args)]
struct UserDisconnectArgs {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    user: String,
    /// Refuse the user's tokens (at `$connect` and `refresh`) for this long, e.g. 15m or 24h.
    #[arg(long, value_name = "DURATION", value_parser = parse_refusal)]
    refuse_for: Option<Duration>,
    #[command(flatten)]
    via: BackendArgs,
}

/// A refusal's length: a whole number of seconds, minutes, hours or days (`90s`, `15m`, `24h`,
/// `7d`).
fn parse_refusal(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?} is not a length such as 15m, 24h or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit is s, m, h or d")),
    };
    Ok(Duration::from_secs(n * seconds))
}

/// Where `roomcast user` sends a tenant backend's request.
#[derive(Debug, clap::Args)]
struct BackendArgs {
    /// The HS256 secret a running `roomcast dev` checks tokens against.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", default_value = "roomcast-dev-secret", hide_env_values = true)]
    jwt_secret: String,
    /// A deployed stack's `PublishUrl` (SigV4-signed) or, with --token, `TenantPublishUrl`.
    #[arg(long, conflicts_with = "dev")]
    endpoint: Option<String>,
    /// A tenant's token with the `users` scope, for `TenantPublishUrl`.
    #[arg(long, env = "ROOMCAST_USERS_TOKEN", hide_env_values = true, requires = "endpoint")]
    token: Option<String>,
    #[command(flatten)]
    target: PluginTargetArgs,
}

#[derive(Debug, Subcommand)]
enum WebhooksCommand {
    /// Move the webhook events given up on (the stack's WebhookDeadLetterQueueUrl) back to the
    /// webhook queue (WebhookQueueUrl), each in its tenant's order: the webhook function delivers
    /// them again to each tenant's URL as it is now. (`roomcast dev` re-drives with
    /// `POST /_dev/webhooks/redrive`.)
    Redrive {
        /// The dead-letter queue's URL (output WebhookDeadLetterQueueUrl).
        #[arg(long)]
        dead_letter_queue: String,
        /// The webhook queue's URL (output WebhookQueueUrl).
        #[arg(long)]
        queue: String,
    },
}

#[derive(Debug, Subcommand)]
enum TableCommand {
    /// Create the table (stream NEW_AND_OLD_IMAGES, TTL on `ttl`, the `gsi1` index); an existing
    /// table is left as it is.
    Create {
        #[command(flatten)]
        table: TableArgs,
    },
}

/// A table, or a running `roomcast dev` (whose embedded store lives in its process).
#[derive(Debug, clap::Args)]
struct PluginTargetArgs {
    /// A running `roomcast dev`, e.g. http://127.0.0.1:8080, instead of a table.
    #[arg(long, env = "ROOMCAST_DEV_URL", conflicts_with = "dynamodb_endpoint")]
    dev: Option<String>,
    #[command(flatten)]
    table: TableArgs,
}

impl PluginTargetArgs {
    async fn target(&self) -> plugins::Target {
        match &self.dev {
            Some(url) => plugins::Target::Dev(url.clone()),
            None => plugins::Target::Table(table_store(&self.table).await),
        }
    }
}

#[derive(Debug, clap::Args)]
struct TableArgs {
    /// A DynamoDB API other than AWS's (moto, DynamoDB Local, LocalStack).
    #[arg(long, env = "DYNAMODB_ENDPOINT_URL")]
    dynamodb_endpoint: Option<String>,
    #[arg(long, env = "TABLE_NAME", default_value = "roomcast")]
    table: String,
}

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let result = match cli.command {
        Command::Replay(args) => replay::replay_main(args).await,
        command => run(Cli { command }).await.map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Dev(args) => dev(args).await,
        Command::Capture(args) => replay::capture_main(args).await,
        Command::Bench(args) => bench::bench_main(args).await,
        Command::Replay(_) => unreachable!("main runs replay itself, for its exit status"),
        Command::Plugin { command } => plugins::run(command).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Tenant { command } => tenant::run(command).await,
        Command::Token { tenant, user, secret, ttl, scope, rooms } => {
            crate::model::Name::parse("tenant", &tenant).map_err(|e| anyhow::anyhow!(e))?;
            let exp = chrono::Utc::now().timestamp() + ttl;
            println!(
                "{}",
                crate::auth::mint(
                    &crate::auth::Claims { tenant, sub: user, exp, nbf: None, scope, rooms, extra: Default::default() },
                    secret.as_bytes()
                )
            );
            Ok(())
        }
        Command::Admin { event, dev: Some(url), .. } => operate::admin_on_dev(&url, event).await,
        Command::Admin { event, dev: None, table, management_endpoint } => {
            operate::admin(event, table, management_endpoint).await
        }
        Command::Table { command: TableCommand::Create { table } } => operate::create(table).await,
        Command::User { command: UserCommand::Disconnect(args) } => publish::disconnect_user(args).await,
        Command::User { command: UserCommand::Join(args) } => publish::user_room("join_user", args).await,
        Command::User { command: UserCommand::Leave(args) } => publish::user_room("leave_user", args).await,
        Command::User { command: UserCommand::Send(args) } => publish::send_to_user(args).await,
        Command::Webhooks { command: WebhooksCommand::Redrive { dead_letter_queue, queue } } => {
            let client = aws_sdk_sqs::Client::new(&crate::config::load_aws().await);
            let moved = crate::webhook::sqs::redrive(&client, &dead_letter_queue, &queue)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            println!("re-drove {moved} message(s) of webhook events to {queue}");
            Ok(())
        }
        Command::Poll { table, management_endpoint, from_trim_horizon } => {
            operate::poll(table, management_endpoint, from_trim_horizon).await
        }
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    use crate::gateway::{AuthMode, Limits};
    let account = account_settings(&args);
    let secret = args.jwt_secret.into_bytes();
    let auth = if args.insecure_dev_auth { AuthMode::InsecureDev { secret } } else { AuthMode::Jwt { secret } };
    let options = crate::dev::DevOptions {
        port: args.port,
        dynamodb_endpoint: args.dynamodb_endpoint,
        table: args.table,
        stream_log: args.stream_log,
        auth: auth.clone(),
        limits: Limits {
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_connection: Duration::from_secs(args.max_connection),
            account,
            ..Limits::default()
        },
        connection_ttl_seconds: args.connection_ttl,
        plugins: args.plugins,
        redeliver: args.redeliver,
        per_item_order: args.per_item_order,
        handoff_recipients: args.handoff_recipients,
        rate_limits: {
            let mut limits = crate::limits::RateLimits::default();
            for (name, value) in &args.limits {
                limits.set(name, *value).map_err(anyhow::Error::msg)?;
            }
            limits
        },
        ..crate::dev::DevOptions::default()
    };
    let store_name =
        options.dynamodb_endpoint.clone().map_or("embedded store".to_string(), |e| format!("DynamoDB at {e}"));
    let stack = crate::dev::start(options).await?;
    let claims = crate::auth::Claims {
        tenant: "demo".into(),
        sub: "alice".into(),
        exp: chrono::Utc::now().timestamp() + 12 * 3600,
        nbf: None,
        scope: None,
        rooms: None,
        extra: Default::default(),
    };
    let token = crate::auth::mint(&claims, auth.secret());
    println!("Roomcast dev stack ({store_name})");
    println!("  page       {}", stack.page_url());
    println!("  operator   http://{}/_dev/ops", stack.addr);
    println!("  websocket  {}?token=<jwt>&rooms=general", stack.ws_url());
    println!("  @connections  http://{}/local/@connections/{{id}}", stack.addr);
    if account != crate::gateway::account::AccountSettings::default() {
        let quota = account.quota.map_or("no quota".to_string(), |q| format!("quota {q}/s, burst {}", account.burst));
        println!("  @connections answers after {:?} (+ up to {:?}), {quota}", account.latency, account.jitter);
    }
    if !stack.plugin_tenants.is_empty() {
        println!("  plugins    {}", stack.plugin_tenants.join(", "));
    }
    println!("  upload a plugin: roomcast plugin upload --dev http://{} --tenant demo FILE.wasm", stack.addr);
    println!("  dev token (tenant demo, user alice, 12 h):");
    println!("    {token}");
    println!("  try: websocat '{}?token={token}&rooms=general'", stack.ws_url());
    println!(
        "  more tokens: roomcast token --tenant T --user U   (or GET http://{}/_dev/token?tenant=T&user=U)",
        stack.addr
    );
    if args.insecure_dev_auth {
        println!();
        println!(
            "  WARNING: --insecure-dev-auth accepts UNSIGNED ?tenant=&user_id= identities. Never expose this port."
        );
    }
    println!("Ctrl-C stops.");
    tokio::signal::ctrl_c().await?;
    eprintln!("stopping: closing connections");
    let metrics = stack.metrics.clone();
    stack.shutdown().await;
    metrics.snapshot().emit("roomcast.totals");
    Ok(())
}

/// `@connections` as `roomcast dev`'s flags describe it: loopback unless a latency or a quota is given.
fn account_settings(args: &DevArgs) -> crate::gateway::account::AccountSettings {
    use crate::gateway::account::{AccountSettings, DEFAULT_QUOTA};
    let latency = args.management_latency.unwrap_or_default();
    let quota = match (args.management_quota, args.management_latency) {
        (Some(q), _) if q > 0.0 => Some(q),
        (Some(_), _) => None,
        (None, Some(_)) => Some(DEFAULT_QUOTA),
        (None, None) => None,
    };
    AccountSettings {
        latency,
        jitter: args.management_jitter.unwrap_or(latency / 4),
        quota,
        burst: args.management_burst,
    }
}

async fn table_store(table: &TableArgs) -> DynamoStore {
    let sdk = config::load_aws().await;
    DynamoStore::new(config::dynamodb_client(&sdk, table.dynamodb_endpoint.as_deref()), &table.table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_is_seconds_minutes_hours_or_days() {
        assert_eq!(parse_refusal("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_refusal("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_refusal("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_refusal("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_refusal("10").unwrap_err().contains("unit"));
        assert!(parse_refusal("m").is_err() && parse_refusal("1.5h").is_err());
    }
}
