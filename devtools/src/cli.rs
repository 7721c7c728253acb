//! The `roomcast` command.
//!
//! * `roomcast dev` — the whole system on loopback: gateway emulator, store, processor, page.
//! * `roomcast table create` — create the table as the deployment does.
//! * `roomcast capture` / `roomcast replay` — read a stream into JSON lines; replay records and
//!   print every decision.
//! * `roomcast poll` — run the stream processor over a real table's stream (DynamoDB Streams
//!   API), the way `roomcast dev --dynamodb-endpoint` does.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::model::SystemClock;
use crate::pipeline::run_from_stream;
use crate::plugins::WithPlugins;
use crate::store::dynamodb::{DynamoStore, create_table, wait_until_active};
use crate::stream::poller::{StartAt, StreamPoller};

mod bench;
mod plugins;
mod replay;
mod scaffold;

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
    Publish {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        room: String,
        /// The message.
        message: String,
        /// Who it is from (default: backend).
        #[arg(long)]
        user_id: Option<String>,
        /// A repeat with the same key within the window sends nothing new and answers the first id.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// The HS256 secret the dev stack checks tokens against.
        #[arg(long, env = "ROOMCAST_JWT_SECRET", default_value = "roomcast-dev-secret", hide_env_values = true)]
        jwt_secret: String,
        /// A deployed stack's endpoint: the `PublishUrl` output (the function URL; the request is
        /// SigV4-signed with your AWS credentials) or, with --token, `TenantPublishUrl`.
        #[arg(long, conflicts_with = "dev")]
        endpoint: Option<String>,
        /// A tenant's publish token (scope `publish`), for `TenantPublishUrl`.
        #[arg(long, env = "ROOMCAST_PUBLISH_TOKEN", hide_env_values = true, requires = "endpoint")]
        token: Option<String>,
        #[command(flatten)]
        target: PluginTargetArgs,
    },
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
        #[arg(long, env = "ROOMCAST_JWT_SECRET", hide_env_values = true)]
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
        Command::Plugin {
            command:
                PluginCommand::Upload {
                    tenant,
                    file,
                    policy,
                    fuel,
                    memory_mib,
                    deadline_ms,
                    max_extra_rooms,
                    max_only_users,
                    target,
                },
        } => {
            let bytes = crate::plugins::read_component(&file)?;
            let policy = if policy == "closed" {
                crate::model::FailurePolicy::Closed
            } else {
                crate::model::FailurePolicy::Open
            };
            let limits = crate::plugins::LimitOverrides {
                fuel,
                memory_mib,
                deadline_ms,
                max_extra_rooms,
                max_only_users,
                ..Default::default()
            };
            let meta = target
                .target()
                .await
                .upload(&tenant, bytes, policy, limits)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e:#}", file.display()))?;
            println!(
                "uploaded {tenant} version {} ({} bytes, {} chunks, sha256 {})",
                meta.version, meta.size, meta.chunks, meta.sha256
            );
            println!("the processor activates it; `roomcast plugin list --tenant {tenant}` shows the outcome");
            Ok(())
        }
        Command::Publish { tenant, room, message, user_id, idempotency_key, jwt_secret, endpoint, token, target } => {
            let body = serde_json::json!({
                "tenant": tenant, "room": room, "message": message,
                "user_id": user_id, "idempotency_key": idempotency_key,
            });
            let id = match (&endpoint, &target.dev) {
                (Some(endpoint), _) => {
                    publish_to_endpoint(endpoint, token.as_deref(), serde_json::to_vec(&body)?).await?
                }
                (None, Some(url)) => {
                    let exp = chrono::Utc::now().timestamp() + 300;
                    let claims = crate::auth::Claims {
                        tenant: tenant.clone(),
                        sub: "roomcast-cli".into(),
                        exp,
                        nbf: None,
                        scope: Some("publish".into()),
                        rooms: None,
                        extra: Default::default(),
                    };
                    let token = crate::auth::mint(&claims, jwt_secret.as_bytes());
                    let answer = crate::dev::api::request_as(
                        url,
                        http::Method::POST,
                        "/publish",
                        serde_json::to_vec(&body)?,
                        Some(&token),
                    )
                    .await?;
                    answer["id"].as_str().unwrap_or_default().to_string()
                }
                (None, None) => {
                    let deps = crate::publish::PublishDeps {
                        store: Arc::new(table_store(&target.table).await),
                        clock: Arc::new(crate::model::SystemClock),
                        history_ttl_seconds: std::env::var("HISTORY_TTL_SECONDS")
                            .ok()
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(7 * 86_400),
                        idempotency_window_seconds: crate::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
                        // The operator's publish: no tenant limit applies.
                        limits: Default::default(),
                    };
                    crate::publish::publish(&deps, &crate::publish::Caller::Operator, &serde_json::to_vec(&body)?)
                        .await
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                }
            };
            println!("published {id} into {tenant}/{room}");
            Ok(())
        }
        Command::Tenant { command: TenantCommand::Show { tenant, target } } => {
            let settings = target.target().await.settings(&tenant).await?;
            println!("{}", serde_json::to_string_pretty(&settings)?);
            Ok(())
        }
        Command::Tenant { command: TenantCommand::Set { tenant, presence_announce_max_users, limits, target } } => {
            // What is given changes; every other setting stays as it was.
            crate::model::Name::parse("tenant", &tenant).map_err(anyhow::Error::msg)?;
            let target = target.target().await;
            let mut settings = target.settings(&tenant).await?;
            if presence_announce_max_users.is_some() {
                settings.presence_announce_max_users = presence_announce_max_users;
            }
            settings.rate_limits.extend(limits);
            target.set_settings(&settings).await?;
            println!("{}", serde_json::to_string_pretty(&settings)?);
            Ok(())
        }
        Command::Tenant {
            command: TenantCommand::Identity { tenant, jwks_url, issuer, audience, hs256_secret_env, clear, target },
        } => {
            let target = target.target().await;
            let mut identity = target.identity(&tenant).await?;
            if clear {
                identity.hs256_secret = None;
                identity.jwks_url = None;
                identity.issuer = None;
                identity.audience = None;
            }
            if let Some(url) = jwks_url {
                identity.jwks_url = Some(url);
                identity.hs256_secret = None;
            }
            if let Some(var) = hs256_secret_env {
                let secret = std::env::var(&var).map_err(|_| anyhow::anyhow!("{var} is not set"))?;
                identity.hs256_secret = Some(secret);
                identity.jwks_url = None;
            }
            if issuer.is_some() {
                identity.issuer = issuer;
            }
            if audience.is_some() {
                identity.audience = audience;
            }
            target.set_identity(&identity).await?;
            identity.hs256_secret = identity.hs256_secret.map(|_| "(set)".into());
            println!("{}", serde_json::to_string_pretty(&identity)?);
            Ok(())
        }
        Command::Tenant { command: TenantCommand::Revoke { tenant, token_id, until, user, all, target } } => {
            anyhow::ensure!(
                token_id.is_some() || user.is_some() || all,
                "name what to revoke: --token-id, --user or --all"
            );
            let target = target.target().await;
            let mut identity = target.identity(&tenant).await?;
            anyhow::ensure!(
                identity.hs256_secret.is_some() || identity.jwks_url.is_some(),
                "{tenant} has no identity of its own: its tokens are the deployment's (rotate the shared secret, \
                 or give it one with `roomcast tenant identity`)"
            );
            let now = chrono::Utc::now().timestamp();
            if let (Some(id), Some(until)) = (&token_id, until) {
                identity.revoke_id(id, until, now);
            }
            if let Some(user) = &user {
                identity.users_revoked_before.insert(user.clone(), now);
            }
            if all {
                identity.revoked_before = Some(now);
            }
            target.set_identity(&identity).await?;
            println!("revoked; authorizers apply it within 30 s");
            Ok(())
        }
        Command::Plugin { command: PluginCommand::List { tenant, target } } => {
            let (active, versions) = target.target().await.list(&tenant).await?;
            plugins::print_list(active.as_ref().map(|(v, joins)| (v.as_str(), *joins)), &versions);
            Ok(())
        }
        Command::Plugin { command: PluginCommand::Activate { tenant, version, target } } => {
            target.target().await.set_active(&tenant, Some(&version)).await?;
            println!("{tenant} now runs version {version}");
            Ok(())
        }
        Command::Plugin { command: PluginCommand::Disable { tenant, target } } => {
            target.target().await.set_active(&tenant, None).await?;
            println!("{tenant} runs without a plugin");
            Ok(())
        }
        Command::Plugin { command: PluginCommand::Config { command } } => match command {
            ConfigCommand::Set { tenant, pairs, target } => {
                let target = target.target().await;
                let mut values = target.config(&tenant).await?;
                values.extend(plugins::parse_pairs(&pairs)?);
                println!("{}", serde_json::to_string_pretty(&target.set_config(&tenant, values).await?)?);
                Ok(())
            }
            ConfigCommand::Get { tenant, key, target } => {
                let values = target.target().await.config(&tenant).await?;
                match key {
                    Some(key) => match values.get(&key) {
                        Some(value) => println!("{value}"),
                        None => anyhow::bail!("{tenant} has no configuration key {key:?}"),
                    },
                    None => println!("{}", serde_json::to_string_pretty(&values)?),
                }
                Ok(())
            }
            ConfigCommand::Unset { tenant, keys, target } => {
                let target = target.target().await;
                let mut values = target.config(&tenant).await?;
                for key in &keys {
                    values.remove(key);
                }
                println!("{}", serde_json::to_string_pretty(&target.set_config(&tenant, values).await?)?);
                Ok(())
            }
        },
        Command::Plugin { command: PluginCommand::New { name, dir, sdk_path } } => {
            let written = crate::cli::scaffold::new_plugin(&name, &dir, sdk_path.as_deref())?;
            println!("wrote {}", written.display());
            Ok(())
        }
        Command::Plugin { command: PluginCommand::Test { file, event, config, fuel, deadline_ms, memory_mib } } => {
            let config = config.as_deref().map(plugins::read_config).transpose()?.unwrap_or_default();
            let limits = crate::plugins::Limits {
                fuel,
                deadline: Duration::from_millis(deadline_ms),
                memory_bytes: memory_mib << 20,
                ..crate::plugins::Limits::default()
            };
            // The plugin host blocks its caller's thread while guest code runs: not this
            // runtime's worker.
            let clean = tokio::task::spawn_blocking(move || plugins::test(&file, &event, &limits, config))
                .await
                .map_err(|e| anyhow::anyhow!("the plugin test did not complete: {e}"))??;
            if clean { Ok(()) } else { anyhow::bail!("the plugin faulted") }
        }
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
        Command::Admin { event, table, management_endpoint } => {
            let event: serde_json::Value =
                serde_json::from_str(&event).map_err(|e| anyhow::anyhow!("the event is not JSON: {e}"))?;
            let sdk = config::load_aws().await;
            let client = config::dynamodb_client(&sdk, table.dynamodb_endpoint.as_deref());
            let store = Arc::new(DynamoStore::new(client, &table.table));
            let clock: Arc<dyn crate::model::Clock> = Arc::new(SystemClock);
            let delivery = crate::deliver::DeliverySettings {
                endpoint_override: management_endpoint,
                ..crate::deliver::DeliverySettings::default()
            };
            let deliverer =
                crate::assembly::Assembly::new(sdk, store.clone(), clock.clone(), Arc::new(Metrics::default()))
                    .with_delivery(delivery)
                    .deliverer();
            let admin = crate::admin::Admin {
                store,
                deliverer: Arc::new(deliverer),
                clock,
                idle_limit: Duration::from_secs(600),
                presence_grace: Duration::from_secs(crate::presence::RECONCILE_GRACE_SECONDS as u64),
                connection_ttl: Duration::from_secs(
                    std::env::var("CONNECTION_TTL_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3600),
                ),
            };
            let answer = admin.handle(&event).await;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            if answer["statusCode"] == 200 {
                Ok(())
            } else {
                anyhow::bail!("the operation answered {}", answer["statusCode"])
            }
        }
        Command::Table { command: TableCommand::Create { table } } => {
            let sdk = config::load_aws().await;
            let client = config::dynamodb_client(&sdk, table.dynamodb_endpoint.as_deref());
            let info = create_table(&client, &table.table).await?;
            let verb = if info.created { "created" } else { "already exists:" };
            println!("table {verb} {} (stream {})", info.name, info.stream_arn);
            Ok(())
        }
        Command::Poll { table, management_endpoint, from_trim_horizon } => {
            let config = Config::from_lookup(|name| match name {
                "TABLE_NAME" => Some(table.table.clone()),
                "DYNAMODB_ENDPOINT_URL" => table.dynamodb_endpoint.clone(),
                "ROOMCAST_MANAGEMENT_ENDPOINT" => management_endpoint.clone(),
                other => std::env::var(other).ok(),
            })?;
            let sdk = config::load_aws().await;
            let client = config::dynamodb_client(&sdk, config.dynamodb_endpoint.as_deref());
            let stream_arn = wait_until_active(&client, &config.table_name).await?;
            let metrics = Arc::new(Metrics::default());
            let store = Arc::new(DynamoStore::new(client, &config.table_name).with_metrics(metrics.clone()));
            // Tenant plugins as in the Lambda: the deployment's limits, cache bound and artifacts.
            let registry = Arc::new(crate::plugins::registry::Registry::from_config(&config, metrics.clone())?);
            let processor =
                crate::assembly::Assembly::from_config(&config, sdk.clone(), store, Arc::new(SystemClock), metrics)
                    .processor()
                    .with_plugins(registry);
            let streams = config::streams_client(&sdk, config.dynamodb_endpoint.as_deref());
            let start = if from_trim_horizon { StartAt::TrimHorizon } else { StartAt::Latest };
            let mut poller = StreamPoller::new(streams, stream_arn.clone(), start);
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                let _ = stop.send(true);
            });
            eprintln!("processing stream {stream_arn}; Ctrl-C stops");
            run_from_stream(&processor, &mut poller, Duration::from_millis(250), None, false, stopped).await?;
            processor.counts().emit("roomcast.totals");
            Ok(())
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

/// POSTs a publish to a deployed endpoint over HTTPS: with a tenant's bearer token, or signed
/// with SigV4 (service `lambda`) for the IAM-authorized function URL. Answers the message id.
async fn publish_to_endpoint(endpoint: &str, token: Option<&str>, body: Vec<u8>) -> anyhow::Result<String> {
    use aws_credential_types::provider::ProvideCredentials;
    use http_body_util::BodyExt;
    let uri: http::Uri = endpoint.parse().map_err(|e| anyhow::anyhow!("--endpoint {endpoint:?}: {e}"))?;
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(&uri)
        .header("content-type", "application/json")
        .header("host", uri.authority().map(|a| a.as_str()).unwrap_or_default())
        .body(body.clone())?;
    match token {
        Some(token) => {
            let value = format!("Bearer {}", token.trim_start_matches("Bearer "));
            request.headers_mut().insert("authorization", value.parse()?);
        }
        None => {
            let sdk = config::load_aws().await;
            let credentials = sdk
                .credentials_provider()
                .ok_or_else(|| anyhow::anyhow!("no AWS credentials to sign the request with (or pass --token)"))?
                .provide_credentials()
                .await?;
            // A function URL names its region (`{id}.lambda-url.{region}.on.aws`); else the SDK's.
            let host = uri.host().unwrap_or_default();
            let region = host
                .split('.')
                .skip_while(|part| *part != "lambda-url")
                .nth(1)
                .map(str::to_string)
                .or_else(|| sdk.region().map(|r| r.to_string()))
                .unwrap_or_else(|| "us-east-1".into());
            let identity = aws_smithy_runtime_api::client::identity::Identity::from(credentials);
            let params = aws_sigv4::sign::v4::SigningParams::builder()
                .identity(&identity)
                .region(&region)
                .name("lambda")
                .time(std::time::SystemTime::now())
                .settings(aws_sigv4::http_request::SigningSettings::default())
                .build()?
                .into();
            let headers: Vec<(String, String)> = request
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                .collect();
            let signable = aws_sigv4::http_request::SignableRequest::new(
                "POST",
                endpoint,
                headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                aws_sigv4::http_request::SignableBody::Bytes(&body),
            )?;
            let (instructions, _) = aws_sigv4::http_request::sign(signable, &params)?.into_parts();
            instructions.apply_to_request_http1x(&mut request);
        }
    }
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_native_roots()?.https_or_http().enable_http1().build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build::<_, http_body_util::Full<bytes::Bytes>>(https);
    let (parts, body) = request.into_parts();
    let request = http::Request::from_parts(parts, http_body_util::Full::new(bytes::Bytes::from(body)));
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| anyhow::anyhow!("{endpoint}: no answer within 30 s"))??;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!(
            "{endpoint} answered {status}: {}",
            answer["error"].as_str().unwrap_or(&String::from_utf8_lossy(&bytes))
        );
    }
    answer["id"].as_str().map(str::to_string).ok_or_else(|| anyhow::anyhow!("{endpoint} answered without an id"))
}

async fn table_store(table: &TableArgs) -> DynamoStore {
    let sdk = config::load_aws().await;
    DynamoStore::new(config::dynamodb_client(&sdk, table.dynamodb_endpoint.as_deref()), &table.table)
}
