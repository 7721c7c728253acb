//! Counts of what the processor did, for operators: one structured log line per batch
//! (`roomcast.batch`), with the same names a dashboard would chart.

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
    /// Recipients that kept answering 429 past the slow-consumer budget: given up for that record
    /// and, by default, closed.
    slow_consumers,
    /// Retries after 429, 5xx, timeouts and young connections' 410.
    retried,
    /// Recipients given up on: 413, other 4xx, or retries past the deadline.
    failed,
    /// Batches that reported a record in `batchItemFailures` because the table was unavailable.
    platform_failures,
    /// Batches that reported a record because the invocation's time ran out before it was done
    /// (not started, or a recipient still being retried): Lambda retries from it.
    out_of_time,
    /// Young connections still answering 410 when their batch ended: their frames from that
    /// batch were dropped (the client had most likely gone before its `$connect` returned).
    young_dropped,
    /// Items read from the table that did not decode, skipped; the key is logged.
    corrupt_items,
    /// Messages a tenant's plugin rejected.
    rejected,
    /// Plugin faults (trap, fuel, deadline, memory, bad output).
    plugin_faults,
    /// Plugin instances created: one per message, one per welcome.
    plugin_instances,
    /// Messages and welcomes decided by the failure policy without a call: the breaker was open.
    plugin_breaker_skips,
    /// Compiled plugins evicted from the bounded cache (reloaded on the tenant's next use).
    plugin_evictions,
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
            slow_consumers = self.slow_consumers,
            retried = self.retried,
            failed = self.failed,
            platform_failures = self.platform_failures,
            out_of_time = self.out_of_time,
            young_dropped = self.young_dropped,
            corrupt_items = self.corrupt_items,
            rejected = self.rejected,
            plugin_faults = self.plugin_faults,
            plugin_instances = self.plugin_instances,
            plugin_breaker_skips = self.plugin_breaker_skips,
            plugin_evictions = self.plugin_evictions,
            "{what}"
        );
    }
}
