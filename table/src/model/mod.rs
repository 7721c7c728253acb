//! The single table's records and keys (docs/ARCHITECTURE.md, "The table").
//!
//! | record     | pk                      | sk                          |
//! |------------|-------------------------|-----------------------------|
//! | connection | `CONN#{connectionId}`   | `META`                      |
//! | membership | `ROOM#{tenant}#{room}`  | `CONN#{connectionId}`       |
//! | message    | `ROOM#{tenant}#{room}`  | `MSG#{timestamp}#{id}`      |
//! | signal     | `ROOM#{tenant}#{room}`  | `SIG#{id}`                  |
//! | presence   | `PRESENCE#{tenant}#{room}` | `USER#{userId}`          |
//! | room count | `PRESENCE#{tenant}#{room}` | `PRESENCE`               |
//! | roster     | `ROSTER#{tenant}#{room}`| `VERSION`                   |
//! | settings   | `TENANT#{tenant}`       | `SETTINGS`                  |
//!
//! The processor alone writes presence and room counts ([`crate::presence`]); handlers read them
//! for `who` and the `join` ack.
//!
//! Room keys carry the tenant, so two tenants' rooms of the same name never meet. Tenant and room
//! names are validated ([`Name`]) so that `#` can never appear inside a key component.
//! Attribute names are camelCase; every record also carries `type` for people reading the table.
//!
//! | file | holds |
//! |------|-------|
//! | `name.rs` | Validated tenant and room names: never a `#` inside a key component. |
//! | `keys.rs` | Every record's partition and sort keys, and the sweep index's keys. |
//! | `time.rs` | Timestamps as the table stores them, TTLs, and the clocks (system, and manual for tests). |
//! | `connection.rs` | Connections and their memberships, with why a connection or membership ended. |
//! | `message.rs` | Messages and signals, their ids and sort keys, and what a tenant's rules made of one. |
//! | `presence.rs` | Presence as state: one item per user and room, one count per room. |
//! | `tenant.rs` | A tenant's settings, its plugin configuration and its own identity provider or secret. |
//! | `plugin.rs` | Tenant plugins as records: each version's metadata, its chunks, the `ACTIVE` pointer. |
//! | `idempotency.rs` | Idempotent sends: which message a key wrote, until its TTL. |
//! | `fanout.rs` | A big fan-out's progress, so a redelivered record resumes where it stopped. |

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde::{Deserialize, Serialize};

mod connection;
mod fanout;
mod idempotency;
mod keys;
mod message;
mod name;
mod plugin;
mod presence;
mod tenant;
mod time;

pub use connection::*;
pub use fanout::*;
pub use idempotency::*;
pub use keys::*;
pub use message::*;
pub use name::*;
pub use plugin::*;
pub use presence::*;
pub use tenant::*;
pub use time::*;

#[cfg(test)]
mod tests;
