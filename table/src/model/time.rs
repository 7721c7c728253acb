//! Timestamps as the table stores them, TTLs, and the clocks (system, and manual for tests).

use super::*;

/// Timestamps are stored as fixed-width RFC 3339 UTC strings with milliseconds, so that they sort
/// as strings (message sort keys depend on it) and read well in the console.
pub fn format_ts(ts: &DateTime<Utc>) -> String {
    ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub fn parse_ts(value: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(value)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("invalid timestamp {value:?}: {e}"))
}

pub mod ts_format {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(ts: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_ts(ts))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        parse_ts(&raw).map_err(serde::de::Error::custom)
    }
}

pub fn expiry(now: DateTime<Utc>, ttl_seconds: i64) -> i64 {
    (now + Duration::seconds(ttl_seconds)).timestamp()
}

/// A record whose `ttl` has passed is gone, whether or not DynamoDB has deleted it yet (it
/// deletes lazily, up to about 48 hours later).
pub fn is_expired(ttl: i64, now: DateTime<Utc>) -> bool {
    ttl <= now.timestamp()
}

/// Where "now" comes from. Handlers, the processor and the local gateway's socket timers take
/// it from here so that tests can move time (TTL expiry, young connections, idle sockets)
/// without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    fn now(&self) -> DateTime<Utc>;

    /// Resolves once this clock shows `at` or later. The wall clock sleeps; a [`ManualClock`]
    /// waits for a test to move it there.
    fn sleep_until(&self, at: DateTime<Utc>) -> futures::future::BoxFuture<'static, ()> {
        let wait = (at - self.now()).to_std().unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }
}

#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        truncate_ms(Utc::now())
    }
}

/// A clock that only moves when told to; whoever waits on it ([`Clock::sleep_until`]) wakes
/// when it is moved past their time.
#[derive(Debug)]
pub struct ManualClock(tokio::sync::watch::Sender<DateTime<Utc>>);

impl ManualClock {
    pub fn at(t: DateTime<Utc>) -> Arc<ManualClock> {
        Arc::new(ManualClock(tokio::sync::watch::Sender::new(truncate_ms(t))))
    }

    pub fn starting_now() -> Arc<ManualClock> {
        Self::at(Utc::now())
    }

    pub fn advance(&self, by: Duration) {
        self.0.send_modify(|t| *t += by);
    }

    /// Sets the time (replay: each record's own time).
    pub fn set(&self, to: DateTime<Utc>) {
        self.0.send_replace(truncate_ms(to));
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.borrow()
    }

    fn sleep_until(&self, at: DateTime<Utc>) -> futures::future::BoxFuture<'static, ()> {
        let mut time = self.0.subscribe();
        Box::pin(async move {
            while *time.borrow_and_update() < at {
                if time.changed().await.is_err() {
                    // The clock is gone: it will never get there.
                    std::future::pending::<()>().await;
                }
            }
        })
    }
}

fn truncate_ms(t: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(t.timestamp_millis()).single().unwrap_or(t)
}
