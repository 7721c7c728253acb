//! Configuration from the environment, for every Lambda binary and the CLI: the table, delivery,
//! plugins, presence, rate limits. (Here, below the write path and the processor, because both
//! read it; each takes its part.)
//!
//! The library never reads the environment itself: binaries call [`Config::from_env`] and hand
//! the parts on. A bad configuration is reported whole — every missing or invalid variable, by
//! name and value — not one at a time.

use std::fmt;
use std::time::Duration;

/// A frame for this many recipients or more leaves the batch, when a stage is configured
/// (`ROOMCAST_HANDOFF_RECIPIENTS`). At 20 ms a call and the account's 10,000 calls a second,
/// 2,000 members take about 0.2 s to serve in the batch itself: below that, queueing costs more
/// than it saves.
pub const HANDOFF_RECIPIENTS: usize = 2_000;

#[derive(Clone, Debug)]
pub struct DeliverySettings {
    /// The most `@connections` calls in flight at once, per process: the ceiling of the
    /// adaptive limit (the processor's `deliver::limit`).
    pub concurrency: usize,
    /// Where the adaptive limit starts.
    pub initial_concurrency: usize,
    /// One `PostToConnection` attempt.
    pub call_timeout: Duration,
    /// All attempts for one recipient.
    pub deadline: Duration,
    /// A connection this young that answers 410 is retried, not deleted.
    pub young_connection: Duration,
    /// First backoff; doubles per attempt, capped at one second.
    pub initial_backoff: Duration,
    /// Sends every message here instead of each connection's own endpoint (local stacks).
    pub endpoint_override: Option<String>,
    /// A connection answering 429 for this long is a slow consumer.
    pub slow_consumer: Duration,
    /// Close slow consumers (`DELETE @connections/{id}`); otherwise only skip them.
    pub close_slow_consumers: bool,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            concurrency: 512,
            initial_concurrency: 32,
            call_timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(20),
            young_connection: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(50),
            endpoint_override: None,
            slow_consumer: Duration::from_secs(2),
            close_slow_consumers: true,
        }
    }
}

/// Every variable Roomcast reads, with its meaning, for error messages and the README.
pub const VARIABLES: &[(&str, &str, &str)] = &[
    ("TABLE_NAME", "(required)", "the DynamoDB table"),
    ("DYNAMODB_ENDPOINT_URL", "AWS", "a local DynamoDB API (moto, DynamoDB Local, LocalStack)"),
    ("ROOMCAST_MANAGEMENT_ENDPOINT", "per connection", "send every @connections call here"),
    ("CONNECTION_TTL_SECONDS", "3600", "connection and membership TTL; `ping` refreshes it"),
    ("HISTORY_TTL_SECONDS", "604800", "how long messages are kept for `history`"),
    (
        "ROOMCAST_IDEMPOTENCY_WINDOW_SECONDS",
        "300",
        "a repeated idempotency_key within this long answers the first message's id",
    ),
    (
        "ROOMCAST_DELIVERY_CONCURRENCY",
        "512",
        "the most @connections calls in flight per container; the limit adapts below it (429s cut it)",
    ),
    ("ROOMCAST_DELIVERY_TIMEOUT_MS", "3000", "one PostToConnection attempt"),
    ("ROOMCAST_DELIVERY_DEADLINE_MS", "20000", "all retries for one recipient"),
    ("ROOMCAST_YOUNG_CONNECTION_MS", "5000", "a 410 for a connection this young is retried"),
    ("ROOMCAST_SLOW_CONSUMER_MS", "2000", "a connection answering 429 this long is a slow consumer"),
    ("ROOMCAST_CLOSE_SLOW_CONSUMERS", "true", "close slow consumers (DELETE @connections); false only skips them"),
    ("ROOMCAST_PARTITIONS_AT_ONCE", "8", "rooms processed concurrently within a batch"),
    (
        "ROOMCAST_FANOUT_QUEUE_URL",
        "(none: every frame is served in its batch)",
        "the fan-out stage's SQS FIFO queue, worked by the fanout function",
    ),
    (
        "ROOMCAST_HANDOFF_RECIPIENTS",
        "2000",
        "with a fan-out queue, frames for this many recipients or more leave the batch for it",
    ),
    (
        "ROOMCAST_WEBHOOK_QUEUE_URL",
        "(none: no webhook events are made)",
        "the tenants' webhook events' SQS FIFO queue, worked by the webhook function",
    ),
    (
        "ROOMCAST_WEBHOOK_RETRY_SECONDS",
        "10",
        "the webhook function's first backoff after a refused delivery; each next one doubles, up to 300",
    ),
    (
        "ROOMCAST_WEBHOOK_ALLOW_PRIVATE",
        "false",
        "deliver webhooks to loopback, private and link-local addresses too (never in a shared deployment)",
    ),
    (
        "ROOMCAST_PRESENCE_ANNOUNCE_MAX_USERS",
        "100",
        "rooms with more users announce no joined/left (a tenant's setting overrides it)",
    ),
    ("ROOMCAST_IDLE_LIMIT_SECONDS", "600", "the sweeper checks connections silent this long"),
    (
        "ROOMCAST_SWEEP_SALT",
        "none",
        "salts the sweep index's key of present users' presence, so no tenant can choose rooms that share one key; the template sets the stack's id",
    ),
    ("ROOMCAST_PLUGIN_FUEL", "10000000", "fuel per plugin call"),
    ("ROOMCAST_PLUGIN_MEMORY_MIB", "16", "a plugin's memory cap"),
    ("ROOMCAST_PLUGIN_DEADLINE_MS", "100", "a plugin call's wall-clock deadline"),
    (
        "ROOMCAST_PLUGIN_CACHE_TENANTS",
        "256",
        "tenants whose compiled plugin is kept in memory (least recently used go)",
    ),
    (
        "ROOMCAST_PLUGIN_ARTIFACT_DIR",
        "(none)",
        "keep compiled plugins here, so reloads deserialize instead of compiling",
    ),
    (
        "ROOMCAST_PLUGIN_MEMORY_BUDGET_MIB",
        "half the function's memory, else 1024",
        "the memory all plugin instances of a process may hold at once",
    ),
    (
        "ROOMCAST_METRICS_NAMESPACE",
        "Roomcast",
        "the processor's counts as CloudWatch embedded metrics in this namespace (dimension FunctionName)",
    ),
    ("ROOMCAST_JWT_SECRET_PARAMETER", "(authorizer)", "SSM parameter (SecureString) holding the HS256 secret"),
    ("ROOMCAST_JWT_SECRET", "(authorizer)", "the HS256 secret itself, instead of the parameter"),
];

#[derive(Clone, Debug)]
pub struct Config {
    pub table_name: String,
    pub dynamodb_endpoint: Option<String>,
    pub connection_ttl_seconds: i64,
    pub history_ttl_seconds: i64,
    pub idempotency_window_seconds: i64,
    pub delivery: DeliverySettings,
    pub partitions_at_once: usize,
    pub idle_limit: Duration,
    /// The sweeper's grace before it takes a present connection without a membership out.
    pub presence_repair_grace: Duration,
    /// The limits tenant plugins run with, unless their upload overrides them.
    pub plugin_limits: crate::model::PluginLimits,
    /// How many tenants' compiled plugins are kept.
    pub plugin_cache_tenants: usize,
    /// Where compiled plugins are kept between activations, if anywhere.
    pub plugin_artifact_dir: Option<std::path::PathBuf>,
    /// The CloudWatch namespace of the processor's embedded metrics.
    pub metrics_namespace: String,
    /// The memory all plugin instances of a process may hold at once, in MiB.
    pub plugin_memory_budget_mib: usize,
    /// Rooms with more users announce no `joined`/`left`, unless the tenant's settings say otherwise.
    pub presence_announce_max_users: u64,
    /// The fan-out stage's SQS FIFO queue, if any (the processor's `deliver::stage::sqs`).
    pub fanout_queue_url: Option<String>,
    /// Frames for this many recipients or more go to the fan-out stage.
    pub handoff_recipients: usize,
    /// The tenants' webhook events' SQS FIFO queue, if any (the processor's `webhook::sqs`).
    pub webhook_queue_url: Option<String>,
    /// The webhook function's first backoff after a refused delivery.
    pub webhook_retry: Duration,
    /// Whether webhooks may be delivered to loopback, private and link-local addresses.
    pub webhook_allow_private: bool,
    /// The rate limits tenants get unless their settings say otherwise (`ROOMCAST_LIMIT_{NAME}`).
    pub rate_limits: crate::limits::RateLimits,
}

/// Every problem found, one per line.
#[derive(PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

/// `main` prints an init error with `Debug`: make that the readable list too.
impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration ({} problem{}):", self.0.len(), if self.0.len() == 1 { "" } else { "s" })?;
        for problem in &self.0 {
            write!(f, "\n  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());

        let table_name = get("TABLE_NAME").unwrap_or_else(|| {
            problems.push("TABLE_NAME is not set: name the DynamoDB table".to_string());
            String::new()
        });
        let mut url = |name: &str| {
            let value = get(name)?;
            if value.starts_with("http://") || value.starts_with("https://") {
                Some(value)
            } else {
                problems.push(format!("{name}={value:?} is not an http:// or https:// URL"));
                None
            }
        };
        let dynamodb_endpoint = url("DYNAMODB_ENDPOINT_URL");
        let endpoint_override = url("ROOMCAST_MANAGEMENT_ENDPOINT");
        let fanout_queue_url = url("ROOMCAST_FANOUT_QUEUE_URL");
        let webhook_queue_url = url("ROOMCAST_WEBHOOK_QUEUE_URL");

        let mut flag = |name: &str, default: bool| match get(name).as_deref().map(str::trim) {
            None => default,
            Some("true") => true,
            Some("false") => false,
            Some(other) => {
                problems.push(format!("{name}={other:?} must be true or false"));
                default
            }
        };
        let close_slow_consumers = flag("ROOMCAST_CLOSE_SLOW_CONSUMERS", true);
        let webhook_allow_private = flag("ROOMCAST_WEBHOOK_ALLOW_PRIVATE", false);
        let mut number = |name: &str, default: u64, min: u64, max: u64| -> u64 {
            match get(name) {
                None => default,
                Some(raw) => match raw.trim().parse::<u64>() {
                    Ok(n) if (min..=max).contains(&n) => n,
                    _ => {
                        problems.push(format!("{name}={raw:?} must be a whole number from {min} to {max}"));
                        default
                    }
                },
            }
        };
        let connection_ttl_seconds = number("CONNECTION_TTL_SECONDS", 3600, 10, 7 * 86_400) as i64;
        let history_ttl_seconds = number("HISTORY_TTL_SECONDS", 7 * 86_400, 60, 365 * 86_400) as i64;
        let idempotency_window_seconds = number(
            "ROOMCAST_IDEMPOTENCY_WINDOW_SECONDS",
            crate::model::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS as u64,
            1,
            86_400,
        ) as i64;
        let delivery = DeliverySettings {
            concurrency: number("ROOMCAST_DELIVERY_CONCURRENCY", 512, 1, 600) as usize,
            call_timeout: Duration::from_millis(number("ROOMCAST_DELIVERY_TIMEOUT_MS", 3000, 10, 60_000)),
            deadline: Duration::from_millis(number("ROOMCAST_DELIVERY_DEADLINE_MS", 20_000, 10, 900_000)),
            young_connection: Duration::from_millis(number("ROOMCAST_YOUNG_CONNECTION_MS", 5000, 0, 60_000)),
            slow_consumer: Duration::from_millis(number("ROOMCAST_SLOW_CONSUMER_MS", 2000, 10, 60_000)),
            close_slow_consumers,
            endpoint_override,
            ..DeliverySettings::default()
        };
        let partitions_at_once = number("ROOMCAST_PARTITIONS_AT_ONCE", 8, 1, 256) as usize;
        let handoff_recipients =
            number("ROOMCAST_HANDOFF_RECIPIENTS", HANDOFF_RECIPIENTS as u64, 1, 10_000_000) as usize;
        let idle_limit = Duration::from_secs(number("ROOMCAST_IDLE_LIMIT_SECONDS", 600, 1, 86_400));
        let webhook_retry = Duration::from_secs(number("ROOMCAST_WEBHOOK_RETRY_SECONDS", 10, 1, 300));
        let presence_repair_grace = Duration::from_secs(number(
            "ROOMCAST_PRESENCE_REPAIR_GRACE_SECONDS",
            crate::presence::RECONCILE_GRACE_SECONDS as u64,
            0,
            7 * 86_400,
        ));
        let presence_announce_max_users =
            number("ROOMCAST_PRESENCE_ANNOUNCE_MAX_USERS", crate::presence::DEFAULT_ANNOUNCE_MAX_USERS, 0, 1_000_000);
        let plugin_limits = crate::model::PluginLimits {
            fuel: number("ROOMCAST_PLUGIN_FUEL", 10_000_000, 1_000, 10_000_000_000),
            memory_bytes: (number("ROOMCAST_PLUGIN_MEMORY_MIB", 16, 1, 512) as usize) << 20,
            deadline: Duration::from_millis(number("ROOMCAST_PLUGIN_DEADLINE_MS", 100, 1, 10_000)),
            ..crate::model::PluginLimits::default()
        };
        let plugin_cache_tenants = number("ROOMCAST_PLUGIN_CACHE_TENANTS", 256, 1, 100_000) as usize;
        let plugin_artifact_dir = get("ROOMCAST_PLUGIN_ARTIFACT_DIR").map(std::path::PathBuf::from);
        let metrics_namespace = get("ROOMCAST_METRICS_NAMESPACE").unwrap_or_else(|| "Roomcast".into());
        // In Lambda, half the function's memory: the rest is the process's own.
        let function_mib = get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").and_then(|v| v.trim().parse::<u64>().ok());
        let plugin_memory_budget_mib =
            number("ROOMCAST_PLUGIN_MEMORY_BUDGET_MIB", function_mib.map_or(1024, |m| (m / 2).max(1)), 1, 65_536)
                as usize;

        let mut rate_limits = crate::limits::RateLimits::default();
        for name in crate::limits::NAMES {
            let variable = format!("ROOMCAST_LIMIT_{}", name.to_uppercase());
            let default = u64::from(crate::limits::RateLimits::default().of_name(name));
            let value = number(&variable, default, 0, 1_000_000) as u32;
            let _ = rate_limits.set(name, value);
        }

        if problems.is_empty() {
            Ok(Config {
                table_name,
                dynamodb_endpoint,
                connection_ttl_seconds,
                history_ttl_seconds,
                idempotency_window_seconds,
                delivery,
                partitions_at_once,
                idle_limit,
                presence_repair_grace,
                plugin_limits,
                plugin_cache_tenants,
                plugin_artifact_dir,
                metrics_namespace,
                plugin_memory_budget_mib,
                presence_announce_max_users,
                fanout_queue_url,
                handoff_recipients,
                webhook_queue_url,
                webhook_retry,
                webhook_allow_private,
                rate_limits,
            })
        } else {
            Err(ConfigError(problems))
        }
    }
}

/// The AWS SDK configuration from the standard environment (credentials, region, profile).
/// Without a region anywhere, `us-east-1`, which local endpoints accept.
pub async fn load_aws() -> aws_config::SdkConfig {
    let region = aws_config::meta::region::RegionProviderChain::default_provider().or_else("us-east-1");
    aws_config::defaults(aws_config::BehaviorVersion::latest()).region(region).load().await
}

pub fn dynamodb_client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_dynamodb::Client {
    let mut builder = aws_sdk_dynamodb::config::Builder::from(sdk);
    // An empty endpoint (`DYNAMODB_ENDPOINT_URL=`) means none, not an invalid URL.
    if let Some(url) = endpoint.filter(|url| !url.is_empty()) {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_dynamodb::Client::from_conf(builder.build())
}

pub fn streams_client(sdk: &aws_config::SdkConfig, endpoint: Option<&str>) -> aws_sdk_dynamodbstreams::Client {
    let mut builder = aws_sdk_dynamodbstreams::config::Builder::from(sdk);
    if let Some(url) = endpoint.filter(|url| !url.is_empty()) {
        builder = builder.endpoint_url(url);
    }
    aws_sdk_dynamodbstreams::Client::from_conf(builder.build())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_need_only_the_table() {
        let c = config(&[("TABLE_NAME", "roomcast")]).unwrap();
        assert_eq!(c.table_name, "roomcast");
        assert_eq!(c.connection_ttl_seconds, 3600);
        assert_eq!(c.delivery.concurrency, 512);
        assert_eq!(c.dynamodb_endpoint, None);
        assert_eq!(c.plugin_limits, crate::model::PluginLimits::default());
        assert_eq!((c.plugin_cache_tenants, c.plugin_artifact_dir), (256, None));
        assert_eq!((c.fanout_queue_url, c.handoff_recipients), (None, 2000));
        let staged = config(&[
            ("TABLE_NAME", "t"),
            ("ROOMCAST_FANOUT_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/roomcast-fanout.fifo"),
            ("ROOMCAST_HANDOFF_RECIPIENTS", "5000"),
        ])
        .unwrap();
        assert_eq!(staged.handoff_recipients, 5000);
        assert!(config(&[("TABLE_NAME", "t"), ("ROOMCAST_FANOUT_QUEUE_URL", "roomcast-fanout")]).is_err());
        let hooks = config(&[
            ("TABLE_NAME", "t"),
            ("ROOMCAST_WEBHOOK_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/1/roomcast-webhooks.fifo"),
            ("ROOMCAST_WEBHOOK_RETRY_SECONDS", "2"),
        ])
        .unwrap();
        assert_eq!((hooks.webhook_retry, hooks.webhook_allow_private), (Duration::from_secs(2), false));
        let problems = config(&[("TABLE_NAME", "t"), ("ROOMCAST_WEBHOOK_ALLOW_PRIVATE", "yes")]).unwrap_err();
        assert!(problems.to_string().contains("ROOMCAST_WEBHOOK_ALLOW_PRIVATE=\"yes\" must be true or false"));
        let tuned =
            config(&[("TABLE_NAME", "t"), ("ROOMCAST_PLUGIN_FUEL", "5000"), ("ROOMCAST_PLUGIN_MEMORY_MIB", "32")])
                .unwrap();
        assert_eq!((tuned.plugin_limits.fuel, tuned.plugin_limits.memory_bytes), (5000, 32 << 20));
        assert!(config(&[("TABLE_NAME", "t"), ("ROOMCAST_PLUGIN_MEMORY_MIB", "4096")]).is_err());
    }

    #[test]
    fn slow_consumers_are_closed_unless_configured_not_to() {
        let on = config(&[("TABLE_NAME", "t")]).unwrap();
        assert_eq!((on.delivery.close_slow_consumers, on.delivery.slow_consumer), (true, Duration::from_secs(2)));
        let off = config(&[
            ("TABLE_NAME", "t"),
            ("ROOMCAST_CLOSE_SLOW_CONSUMERS", "false"),
            ("ROOMCAST_SLOW_CONSUMER_MS", "500"),
        ])
        .unwrap();
        assert_eq!(
            (off.delivery.close_slow_consumers, off.delivery.slow_consumer),
            (false, Duration::from_millis(500))
        );
        let err = config(&[("TABLE_NAME", "t"), ("ROOMCAST_CLOSE_SLOW_CONSUMERS", "maybe")]).unwrap_err();
        assert!(err.to_string().contains("ROOMCAST_CLOSE_SLOW_CONSUMERS=\"maybe\" must be true or false"), "{err}");
    }

    #[test]
    fn reports_every_problem_at_once_by_name() {
        let err = config(&[
            ("DYNAMODB_ENDPOINT_URL", "localhost:8000"),
            ("CONNECTION_TTL_SECONDS", "soon"),
            ("ROOMCAST_DELIVERY_CONCURRENCY", "0"),
        ])
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err}");
        let text = err.to_string();
        for name in ["TABLE_NAME", "DYNAMODB_ENDPOINT_URL", "CONNECTION_TTL_SECONDS", "ROOMCAST_DELIVERY_CONCURRENCY"] {
            assert!(text.contains(name), "{name} missing from: {text}");
        }
        assert!(text.contains("\"soon\""), "{text}");
    }
}
