//! Counts of what the processor did, for operators: one structured log line per batch
//! (`roomcast.batch`), and — in the Lambda — the same counts as CloudWatch metrics, in the
//! embedded metric format ([`Counts::emf`]): one JSON line on stdout that CloudWatch Logs turns
//! into metrics under namespace `Roomcast`, dimension `FunctionName`, with no API call and no
//! extra permission. `template.yaml`'s alarms watch them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters, shared by every task of a processor.
        #[derive(Debug, Default)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct Counts { $(pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> Counts {
                Counts { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl Counts {
            /// What happened between `earlier` and `self`.
            pub fn since(&self, earlier: &Counts) -> Counts {
                Counts { $($name: self.$name - earlier.$name,)* }
            }

            /// Every counter by name, in declaration order.
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Stream records seen.
    records,
    /// Records skipped: malformed, or of a kind this processor does not act on.
    skipped,
    /// Messages accepted by `@connections`.
    delivered,
    /// Recipients API Gateway answered 410 Gone for; their records were deleted.
    gone,
    /// 429 answers (each retried within the deadline).
    throttled,
    /// 429 answers while the account was throttling (429s for several connections at once):
    /// the deployment is at API Gateway's quota; retried, never held against the client.
    account_throttled,
    /// Recipients that kept answering 429 past the slow-consumer budget: given up for that record
    /// and, by default, closed.
    slow_consumers,
    /// Frames for one recipient still answered 429 past the budget: given up on, never closed
    /// (a lone 429 cannot tell a full client from a throttled account).
    lone_throttled,
    /// Connections closed because they kept sending over their rate limit after being told
    /// (the handlers refused each such frame with `rate_limited` and logged it).
    rate_limited_closed,
    /// Retries after 429, 5xx, timeouts and young connections' 410.
    retried,
    /// Recipients given up on: 413, other 4xx, or retries past the deadline.
    failed,
    /// Recipients a redelivered big fan-out skipped: served before it was cut off.
    resumed_skips,
    /// Big fan-outs' progress reads or writes that failed or took too long (the fan-out went on;
    /// a redelivery may serve some members again).
    progress_failures,
    /// Recipients of big frames handed to the fan-out stage (served by its workers).
    handed_off,
    /// The fan-out stage's worker: jobs it worked; jobs it left for the queue to deliver again
    /// (unfinished, too late in the invocation, or behind such a job of their group); messages
    /// that were not jobs, logged and dropped (a writer this worker does not understand).
    fanout_jobs,
    fanout_jobs_reported,
    fanout_jobs_dropped,
    /// Rooms' members served from the container's roster, the room's version unchanged (one
    /// small read instead of the room's memberships; see `roster`).
    roster_kept,
    /// Rooms' members read from the table: the version moved, the copy aged, a kept TTL ran
    /// out, the room has no version yet, or it is a plugin's extra room (never kept). Near
    /// `roster_kept + roster_reads`: rooms churn.
    roster_reads,
    /// Batches that reported a record in `batchItemFailures` because the table was unavailable.
    platform_failures,
    /// Batches that reported a record because the invocation's time ran out before it was done
    /// (not started, or a recipient still being retried): Lambda retries from it.
    out_of_time,
    /// Young connections still answering 410 when their batch ended: their frames from that
    /// batch were dropped (the client had most likely gone before its `$connect` returned).
    young_dropped,
    /// Users who became present in a room (`joined` transitions), announced or not.
    presence_joined,
    /// Users who stopped being present in a room (`left` transitions), announced or not.
    presence_left,
    /// Transitions not announced because the room has more users than its tenant's limit.
    presence_unannounced,
    /// Membership records at or below their connection's presence mark: redelivered, no change.
    presence_redelivered,
    /// Membership records applied together with an earlier record of their room, in its run's
    /// one write (`presence::plan_run`): a join storm shows here.
    presence_ahead,
    /// Items read from the table that did not decode, skipped; the key is logged.
    corrupt_items,
    /// Messages a tenant's plugin rejected.
    rejected,
    /// Joins a tenant's rules allowed, and denied (`join_denied`).
    joins_allowed,
    joins_denied,
    /// Plugin faults (trap, fuel, deadline, memory, bad output).
    plugin_faults,
    /// Plugin instances created: one per message, one per welcome.
    plugin_instances,
    /// Messages and welcomes decided by the failure policy without a call: the breaker was open.
    plugin_breaker_skips,
    /// Compiled plugins evicted from the bounded cache (reloaded on the tenant's next use).
    plugin_evictions,
    /// Plugin versions read and compiled (or loaded from the artifact directory): once per
    /// version however many partitions ask at the same time.
    plugin_compiles,
    /// Webhook events a tenant's settings asked for, queued for delivery; delivered (its
    /// endpoint answered 2xx); deliveries tried again; events given up on (dead letters, in
    /// `roomcast dev`; in AWS the dead-letter queue counts them); queued messages that are not
    /// events, dropped (logged with their id).
    webhook_events,
    webhook_delivered,
    webhook_retried,
    webhook_dead,
    webhook_dropped,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Counts {
    /// Writes the counts as one structured log line.
    pub fn emit(&self, what: &'static str) {
        tracing::info!(
            records = self.records,
            skipped = self.skipped,
            delivered = self.delivered,
            gone = self.gone,
            throttled = self.throttled,
            account_throttled = self.account_throttled,
            slow_consumers = self.slow_consumers,
            lone_throttled = self.lone_throttled,
            rate_limited_closed = self.rate_limited_closed,
            retried = self.retried,
            failed = self.failed,
            resumed_skips = self.resumed_skips,
            progress_failures = self.progress_failures,
            handed_off = self.handed_off,
            fanout_jobs = self.fanout_jobs,
            fanout_jobs_reported = self.fanout_jobs_reported,
            fanout_jobs_dropped = self.fanout_jobs_dropped,
            roster_kept = self.roster_kept,
            roster_reads = self.roster_reads,
            platform_failures = self.platform_failures,
            out_of_time = self.out_of_time,
            young_dropped = self.young_dropped,
            corrupt_items = self.corrupt_items,
            rejected = self.rejected,
            joins_allowed = self.joins_allowed,
            joins_denied = self.joins_denied,
            plugin_faults = self.plugin_faults,
            plugin_instances = self.plugin_instances,
            plugin_breaker_skips = self.plugin_breaker_skips,
            plugin_evictions = self.plugin_evictions,
            plugin_compiles = self.plugin_compiles,
            webhook_events = self.webhook_events,
            webhook_delivered = self.webhook_delivered,
            webhook_retried = self.webhook_retried,
            webhook_dead = self.webhook_dead,
            webhook_dropped = self.webhook_dropped,
            "{what}"
        );
    }
}

/// Where a process's counts go as CloudWatch metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emf {
    pub namespace: String,
    /// The `FunctionName` dimension's value: the Lambda function's name.
    pub function: String,
}

impl Counts {
    /// These counts as one line of CloudWatch's embedded metric format: every counter a metric
    /// (unit `Count`) of `emf.namespace`, dimension `FunctionName`, at `timestamp_ms`.
    pub fn emf(&self, emf: &Emf, timestamp_ms: i64) -> String {
        let named = self.named();
        let metrics: Vec<serde_json::Value> =
            named.iter().map(|(name, _)| serde_json::json!({"Name": name, "Unit": "Count"})).collect();
        let mut line = serde_json::json!({
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": emf.namespace,
                    "Dimensions": [["FunctionName"]],
                    "Metrics": metrics,
                }],
            },
            "FunctionName": emf.function,
        });
        for (name, value) in named {
            line[name] = serde_json::json!(value);
        }
        line.to_string()
    }
}

/// What one tenant's plugin calls cost over a batch: for the batch's log line and, in the
/// Lambda, as embedded metrics with the dimensions `FunctionName` and `Tenant`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PluginStats {
    pub tenant: String,
    pub version: String,
    pub calls: u64,
    /// Faults by kind (`out_of_fuel`, `deadline`, `memory`, `trap`, …).
    pub faults: std::collections::BTreeMap<String, u64>,
    pub fuel_p50: u64,
    pub fuel_p99: u64,
    pub micros_p50: u64,
    pub micros_p99: u64,
}

impl PluginStats {
    /// From one batch's samples of fuel and time, one per call.
    pub fn from_samples(
        tenant: &str,
        version: &str,
        mut fuel: Vec<u64>,
        mut micros: Vec<u64>,
        faults: std::collections::BTreeMap<String, u64>,
    ) -> PluginStats {
        fuel.sort_unstable();
        micros.sort_unstable();
        let at = |sorted: &[u64], q: f64| -> u64 {
            if sorted.is_empty() {
                return 0;
            }
            sorted[((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1]
        };
        PluginStats {
            tenant: tenant.to_string(),
            version: version.to_string(),
            calls: fuel.len() as u64,
            faults,
            fuel_p50: at(&fuel, 0.50),
            fuel_p99: at(&fuel, 0.99),
            micros_p50: at(&micros, 0.50),
            micros_p99: at(&micros, 0.99),
        }
    }

    /// All faults, whatever their kind.
    pub fn fault_count(&self) -> u64 {
        self.faults.values().sum()
    }

    /// One embedded-metric-format line: `PluginCalls`, `PluginFaults` (and one
    /// `PluginFaults_<kind>` per kind seen), fuel and microseconds at p50 and p99, per
    /// `FunctionName` and `Tenant`. The plugin version is a property (searchable, not a dimension).
    pub fn emf(&self, emf: &Emf, timestamp_ms: i64) -> String {
        let mut values: Vec<(String, u64, &str)> = vec![
            ("PluginCalls".into(), self.calls, "Count"),
            ("PluginFaults".into(), self.fault_count(), "Count"),
            ("PluginFuelP50".into(), self.fuel_p50, "None"),
            ("PluginFuelP99".into(), self.fuel_p99, "None"),
            ("PluginTimeP50".into(), self.micros_p50, "Microseconds"),
            ("PluginTimeP99".into(), self.micros_p99, "Microseconds"),
        ];
        for (kind, n) in &self.faults {
            values.push((format!("PluginFaults_{kind}"), *n, "Count"));
        }
        let metrics: Vec<serde_json::Value> =
            values.iter().map(|(name, _, unit)| serde_json::json!({"Name": name, "Unit": unit})).collect();
        let mut line = serde_json::json!({
            "_aws": {
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": emf.namespace,
                    "Dimensions": [["FunctionName", "Tenant"]],
                    "Metrics": metrics,
                }],
            },
            "FunctionName": emf.function,
            "Tenant": self.tenant,
            "PluginVersion": self.version,
        });
        for (name, value, _) in values {
            line[name] = serde_json::json!(value);
        }
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_stats_give_percentiles_and_one_emf_line_per_tenant() {
        let faults = [("deadline".to_string(), 1)].into_iter().collect();
        let stats = PluginStats::from_samples("acme", "abc", (1..=100).collect(), vec![5; 100], faults);
        assert_eq!((stats.calls, stats.fuel_p50, stats.fuel_p99, stats.micros_p99), (100, 50, 99, 5));
        let emf = Emf { namespace: "Roomcast".into(), function: "f".into() };
        let line: serde_json::Value = serde_json::from_str(&stats.emf(&emf, 1)).unwrap();
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["FunctionName", "Tenant"]]));
        assert_eq!((line["Tenant"].as_str(), line["PluginFaults"].as_u64()), (Some("acme"), Some(1)));
        assert_eq!(line["PluginFaults_deadline"].as_u64(), Some(1));
        assert_eq!(line["PluginFuelP99"].as_u64(), Some(99));
        assert_eq!(PluginStats::from_samples("t", "v", vec![], vec![], Default::default()).fuel_p99, 0);
    }

    #[test]
    fn counts_become_one_embedded_metric_format_line() {
        let counts = Counts { delivered: 7, plugin_faults: 2, ..Counts::default() };
        let emf = Emf { namespace: "Roomcast".into(), function: "stack-ProcessorFunction-1".into() };
        let line: serde_json::Value = serde_json::from_str(&counts.emf(&emf, 1_795_000_000_000)).unwrap();
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(line["_aws"]["Timestamp"], 1_795_000_000_000i64);
        assert_eq!(directive["Namespace"], "Roomcast");
        assert_eq!(directive["Dimensions"], serde_json::json!([["FunctionName"]]));
        assert_eq!(line["FunctionName"], "stack-ProcessorFunction-1");
        // Every counter is declared and present at the root, as EMF requires.
        let declared: Vec<&str> =
            directive["Metrics"].as_array().unwrap().iter().map(|m| m["Name"].as_str().unwrap()).collect();
        assert_eq!(declared.len(), counts.named().len());
        for name in declared {
            assert!(line[name].is_u64(), "{name} has no value");
        }
        assert_eq!(
            (line["delivered"].as_u64(), line["plugin_faults"].as_u64(), line["failed"].as_u64()),
            (Some(7), Some(2), Some(0))
        );
    }
}
