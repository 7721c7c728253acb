//! Rate limits' settings: what is limited ([`Operation`]), per whom ([`Scope`]), and how many
//! a second ([`RateLimits`]: the deployment's defaults, `ROOMCAST_LIMIT_*`, and each tenant's own,
//! `roomcast tenant set --limit NAME=N`). The configuration every Lambda reads holds them; the
//! write path's limiter (`roomcast_handlers::limits`) counts operations against them in the
//! table, under the `LIMIT#…` keys of [`crate::model`].

use serde::{Deserialize, Serialize};

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
