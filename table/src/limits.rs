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
//! Counters live under `LIMIT#…` keys: the template's stream filter keeps their writes from the
//! processor, which would ignore them anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::protocol::{ErrorCode, FrameError, Request};
use crate::store::{Store, StoreError};

/// What is limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `sendMessage` and `signal`.
    Message,
    /// `join` (a `leave` is never limited: a connection over its limit can always leave).
    Join,
    /// `$connect`.
    Connect,
    /// `history`, `recover`, `who`, `info` and `ping`: each a read of the table (and a `history`
    /// page up to 128 KB of the room's partition).
    Read,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Message => "message",
            Operation::Join => "join",
            Operation::Connect => "connect",
            Operation::Read => "read",
        }
    }
}

/// Whose count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Connection,
    User,
    Tenant,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Connection => "connection",
            Scope::User => "user",
            Scope::Tenant => "tenant",
        }
    }
}

/// Operations a second; 0: no limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimits {
    pub messages_per_connection: u32,
    pub messages_per_user: u32,
    pub messages_per_tenant: u32,
    pub joins_per_connection: u32,
    pub joins_per_user: u32,
    pub joins_per_tenant: u32,
    pub connects_per_user: u32,
    pub connects_per_tenant: u32,
    pub reads_per_connection: u32,
    pub reads_per_user: u32,
    pub reads_per_tenant: u32,
}

impl Default for RateLimits {
    /// Pusher allows a client 10 events a second; a user may have a few tabs; a tenant's 1,000
    /// messages a second is a tenth of the account's `@connections` quota fanned out to rooms of
    /// ten. Connects: API Gateway admits 500 new connections a second per account.
    fn default() -> Self {
        RateLimits {
            messages_per_connection: 10,
            messages_per_user: 20,
            messages_per_tenant: 1000,
            joins_per_connection: 5,
            joins_per_user: 10,
            joins_per_tenant: 200,
            connects_per_user: 5,
            connects_per_tenant: 200,
            reads_per_connection: 10,
            reads_per_user: 20,
            // A tenant's reads spread over its rooms' partitions: no tenant-wide default.
            reads_per_tenant: 0,
        }
    }
}

/// The names `roomcast tenant set --limit NAME=N` and `ROOMCAST_LIMIT_{NAME}` take.
pub const NAMES: [&str; 11] = [
    "messages_per_connection",
    "messages_per_user",
    "messages_per_tenant",
    "joins_per_connection",
    "joins_per_user",
    "joins_per_tenant",
    "connects_per_user",
    "connects_per_tenant",
    "reads_per_connection",
    "reads_per_user",
    "reads_per_tenant",
];

impl RateLimits {
    /// No limit at all (no counter is written): for benchmarks and tests of other things.
    pub fn unlimited() -> RateLimits {
        RateLimits {
            messages_per_connection: 0,
            messages_per_user: 0,
            messages_per_tenant: 0,
            joins_per_connection: 0,
            joins_per_user: 0,
            joins_per_tenant: 0,
            connects_per_user: 0,
            connects_per_tenant: 0,
            reads_per_connection: 0,
            reads_per_user: 0,
            reads_per_tenant: 0,
        }
    }

    /// The limit of `operation` for `scope` (0: none; connects have no connection scope).
    pub fn of(&self, operation: Operation, scope: Scope) -> u32 {
        match (operation, scope) {
            (Operation::Message, Scope::Connection) => self.messages_per_connection,
            (Operation::Message, Scope::User) => self.messages_per_user,
            (Operation::Message, Scope::Tenant) => self.messages_per_tenant,
            (Operation::Join, Scope::Connection) => self.joins_per_connection,
            (Operation::Join, Scope::User) => self.joins_per_user,
            (Operation::Join, Scope::Tenant) => self.joins_per_tenant,
            (Operation::Connect, Scope::Connection) => 0,
            (Operation::Connect, Scope::User) => self.connects_per_user,
            (Operation::Connect, Scope::Tenant) => self.connects_per_tenant,
            (Operation::Read, Scope::Connection) => self.reads_per_connection,
            (Operation::Read, Scope::User) => self.reads_per_user,
            (Operation::Read, Scope::Tenant) => self.reads_per_tenant,
        }
    }

    /// One limit by name (one of [`NAMES`]; 0 for another).
    pub fn of_name(mut self, name: &str) -> u32 {
        self.slot(name).map_or(0, |slot| *slot)
    }

    fn slot(&mut self, name: &str) -> Option<&mut u32> {
        Some(match name {
            "messages_per_connection" => &mut self.messages_per_connection,
            "messages_per_user" => &mut self.messages_per_user,
            "messages_per_tenant" => &mut self.messages_per_tenant,
            "joins_per_connection" => &mut self.joins_per_connection,
            "joins_per_user" => &mut self.joins_per_user,
            "joins_per_tenant" => &mut self.joins_per_tenant,
            "connects_per_user" => &mut self.connects_per_user,
            "connects_per_tenant" => &mut self.connects_per_tenant,
            "reads_per_connection" => &mut self.reads_per_connection,
            "reads_per_user" => &mut self.reads_per_user,
            "reads_per_tenant" => &mut self.reads_per_tenant,
            _ => return None,
        })
    }

    /// Sets one limit by name (one of [`NAMES`]).
    pub fn set(&mut self, name: &str, value: u32) -> Result<(), String> {
        match self.slot(name) {
            Some(slot) => {
                *slot = value;
                Ok(())
            }
            None => Err(format!("no limit is called {name:?}; the limits are {}", NAMES.join(", "))),
        }
    }

    /// These limits with a tenant's own settings over them.
    pub fn with(mut self, overrides: &std::collections::BTreeMap<String, u32>) -> RateLimits {
        for (name, value) in overrides {
            // Settings are checked when written; a name a newer version wrote is ignored here.
            let _ = self.set(name, *value);
        }
        self
    }
}

/// `NAME=N`, as `roomcast tenant set --limit` takes it.
pub fn parse_setting(text: &str) -> Result<(String, u32), String> {
    let (name, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not NAME=N"))?;
    let name = name.trim().replace('-', "_");
    RateLimits::default().set(&name, 0)?;
    let value =
        value.trim().parse::<u32>().map_err(|_| format!("{text:?}: the limit must be a whole number (0: none)"))?;
    Ok((name, value))
}

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
        Request::Ping | Request::Info | Request::History { .. } | Request::Recover { .. } | Request::Who { .. } => {
            Some(Operation::Read)
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_by_name_and_refuse_unknown_ones() {
        assert_eq!(parse_setting("messages-per-connection=3"), Ok(("messages_per_connection".into(), 3)));
        assert_eq!(parse_setting("joins_per_tenant = 0"), Ok(("joins_per_tenant".into(), 0)));
        assert!(parse_setting("messages_per_room=3").unwrap_err().contains("no limit is called"));
        assert!(parse_setting("messages_per_user=-1").unwrap_err().contains("whole number"));
        assert!(parse_setting("messages_per_user").unwrap_err().contains("NAME=N"));
        let overrides = [("messages_per_user".to_string(), 7), ("unknown".to_string(), 1)].into_iter().collect();
        let limits = RateLimits::default().with(&overrides);
        assert_eq!(limits.of(Operation::Message, Scope::User), 7);
        assert_eq!(limits.of(Operation::Message, Scope::Connection), 10);
        assert_eq!(limits.of(Operation::Connect, Scope::Connection), 0, "a connect has no connection yet");
    }
}
