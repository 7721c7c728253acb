//! Rate limits: how many messages, joins and connects one connection, one user and one tenant
//! may make a second, held across every handler container by counters in the table.
//!
//! * A check counts the operation in the current one-second window of each scope in turn —
//!   connection, then user, then tenant — with one `UpdateItem ADD` each (1 write unit; no read).
//!   It stops at the first scope over its limit, so a flooding connection spends its own counter
//!   only: the frames it is refused never count against its user or its tenant.
//! * Exact across containers within a window (the counter is one atomic item); a fixed window
//!   lets up to twice a limit through across one window's edge. A tenant's counter is spread
//!   over `ceil(limit / 400)` keys, picked at random per check, so that no key takes more than
//!   400 writes a second (a partition takes 1,000): within a few percent of the limit for any
//!   real flow.
//! * Refused: `rate_limited`, with `retry_after_ms` (the window's end); no record is written. A
//!   container that found a key over its limit refuses that key's operations without writing
//!   until the window ends. A connection whose count in one window reaches [`CLOSE_AT`] × its
//!   limit (as one container counts it) — it kept sending after being told — is closed: its record
//!   is deleted with `closeReason: rate_limited` and the processor closes the socket after telling
//!   it why.
//! * Limits come from the deployment's defaults (`ROOMCAST_LIMIT_*`) and each tenant's settings
//!   (`roomcast tenant set --limit NAME=N`), read at most every [`Limiter::FRESH`] per container.
//!   0 means no limit (and no write).
//!
//! The settings — [`Operation`], [`Scope`], [`RateLimits`], [`NAMES`] — are the table crate's
//! (`roomcast_table::limits`), re-exported here: the configuration every Lambda reads holds them.
//!
//! Counters live under `LIMIT#…` keys: the template's stream filter keeps their writes from the
//! processor, which would ignore them anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::protocol::{ErrorCode, FrameError, Request};
use crate::store::{Store, StoreError};

pub use roomcast_table::limits::*;

/// A connection counted this many times its limit in one window is closed.
pub const CLOSE_AT: u64 = 3;

/// The most writes a second one tenant counter key takes (a partition takes 1,000).
pub const TENANT_KEY_WRITES: u32 = 400;

/// The window every count is in.
pub const WINDOW_MS: i64 = 1000;

/// Refused: which limit, and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limited {
    pub operation: Operation,
    pub scope: Scope,
    pub limit: u32,
    pub retry_after_ms: u64,
    /// The connection kept sending after it was told: close it.
    pub close: bool,
}

/// The rate limit a request counts against, if any.
pub fn operation_of(request: &Request) -> Option<Operation> {
    match request {
        Request::SendMessage { .. } | Request::Signal { .. } => Some(Operation::Message),
        Request::Join { .. } => Some(Operation::Join),
        // A connection over its limit can always leave.
        Request::Leave { .. } => None,
        Request::Ping
        | Request::Info
        | Request::History { .. }
        | Request::Recover { .. }
        | Request::Who { .. }
        | Request::Refresh { .. }
        | Request::Echo { .. } => Some(Operation::Read),
    }
}

impl Limited {
    /// The error frame that tells the client (`rate_limited`, with when to try again).
    pub fn frame_error(&self) -> FrameError {
        FrameError { code: ErrorCode::RateLimited, message: self.message(), retry_after_ms: Some(self.retry_after_ms) }
    }

    pub fn message(&self) -> String {
        format!(
            "rate limited: at most {} {}s a second per {}; retry after {} ms",
            self.limit,
            self.operation.as_str(),
            self.scope.as_str(),
            self.retry_after_ms
        )
    }
}

/// Checks operations against the limits, per container: the defaults, and each tenant's settings
/// read at most every [`Limiter::FRESH`].
#[derive(Clone)]
pub struct Limiter {
    defaults: RateLimits,
    tenants: Arc<Mutex<HashMap<String, (RateLimits, Instant)>>>,
    /// Keys this container found over their limit, with the window and the count it last saw:
    /// until the window ends their operations are refused here, counted here, and written no
    /// more — a flood costs the table about its limit in writes per container, not one per frame.
    over: Arc<Mutex<HashMap<String, (i64, u64)>>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new(RateLimits::default())
    }
}

impl Limiter {
    /// How long a tenant's settings stand in a container.
    pub const FRESH: Duration = Duration::from_secs(5);

    pub fn new(defaults: RateLimits) -> Limiter {
        Limiter { defaults, tenants: Arc::default(), over: Arc::default() }
    }

    pub fn defaults(&self) -> RateLimits {
        self.defaults
    }

    /// The tenant's limits: the defaults with its settings over them.
    pub async fn of(&self, store: &dyn Store, tenant: &str) -> Result<RateLimits, StoreError> {
        if let Some((limits, at)) = self.tenants.lock().unwrap_or_else(|p| p.into_inner()).get(tenant)
            && at.elapsed() < Self::FRESH
        {
            return Ok(*limits);
        }
        let settings = store.tenant_settings(tenant).await?;
        let limits = settings.map_or(self.defaults, |s| self.defaults.with(&s.rate_limits));
        let mut cache = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(tenant.to_string(), (limits, Instant::now()));
        Ok(limits)
    }

    /// Counts one `operation` by `connection` (none for a connect) of `user` in `tenant`, scope
    /// by scope, and says whether it is over a limit.
    pub async fn check(
        &self,
        store: &dyn Store,
        operation: Operation,
        tenant: &str,
        user: &str,
        connection: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Option<Limited>, StoreError> {
        let limits = self.of(store, tenant).await?;
        let ms = now.timestamp_millis();
        let window = ms.div_euclid(WINDOW_MS);
        let retry_after_ms = (WINDOW_MS - ms.rem_euclid(WINDOW_MS)) as u64;
        let op = operation.as_str();
        for scope in [Scope::Connection, Scope::User, Scope::Tenant] {
            let limit = limits.of(operation, scope);
            if limit == 0 {
                continue;
            }
            let (key, allowed) = match scope {
                Scope::Connection => match connection {
                    Some(id) => (format!("{tenant}#{op}#c#{id}"), limit),
                    None => continue,
                },
                Scope::User => (format!("{tenant}#{op}#u#{user}"), limit),
                Scope::Tenant => {
                    let keys = limit.div_ceil(TENANT_KEY_WRITES);
                    (format!("{tenant}#{op}#t#{}", fastrand::u32(0..keys)), limit.div_ceil(keys))
                }
            };
            let known = {
                let mut over = self.over.lock().unwrap_or_else(|p| p.into_inner());
                match over.get_mut(&key) {
                    Some((seen, count)) if *seen == window => {
                        *count += 1;
                        Some(*count)
                    }
                    _ => None,
                }
            };
            let count = match known {
                Some(count) => count,
                None => store.count_in_window(&key, window).await?,
            };
            if count > u64::from(allowed) {
                if known.is_none() {
                    let mut over = self.over.lock().unwrap_or_else(|p| p.into_inner());
                    if over.len() > 100_000 {
                        over.retain(|_, (seen, _)| *seen >= window);
                    }
                    over.insert(key, (window, count));
                }
                let close = scope == Scope::Connection && count >= CLOSE_AT * u64::from(allowed);
                return Ok(Some(Limited { operation, scope, limit, retry_after_ms, close }));
            }
        }
        Ok(None)
    }
}
