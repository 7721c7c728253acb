//! # Roomcast's stream processor
//!
//! What happens after a record is written: the table's stream decoded into typed changes, each
//! reacted to by its kind, and the effects delivered through the API Gateway Management API. This
//! crate links no wasmtime and no HTTP or WebSocket server: tenants' rules come through [`rules`],
//! which the plugin host (`plugins/host/`, `roomcast-plugin-host`) implements, and the
//! processor's Lambda (`lambda/`, `roomcast-processor-lambda`) joins the two. The fan-out stage's
//! Lambda is `src/bin/fanout.rs`. The write path is `handlers/` (`roomcast-handlers`), the
//! `roomcast` command and the local stack `devtools/` (`roomcast`). docs/ARCHITECTURE.md tells the
//! whole design.
//!
//! ```text
//! client ─ws─▶ API Gateway ─▶ handlers ──write──▶ table ──stream──▶ processor ──@connections──▶ clients
//! ```
//!
//! # Layout
//!
//! The write path only writes records. Everything that reaches other clients flows through the
//! stream, in this order — each step its own module:
//!
//! | step | module | job |
//! |------|--------|-----|
//! | records | [`model`] | the single table's records and keys; validated names; the clock (crate `roomcast-table`, `table/`) |
//! | table | [`store`] | (`roomcast-table`) small ports by concern (connections, memberships, history, presence, plugins, tenants, upkeep), each with a DynamoDB adapter and an embedded one with a stream |
//! | record → change | [`stream`] | decode stream records into typed [`stream::Change`]s; the batch runner; the Streams poller |
//! | tenant rules | [`rules`] | the interface the pipeline asks before reacting: a message's verdict and route, who may join a room, a greeting (the plugin host implements it) |
//! | presence | [`presence`] | (`roomcast-table`) who is in a room, as state: exactly one `joined`/`left` per user and room |
//! | who is in a room | [`roster`] | each container's copy of a room's members, trusted while the room's roster version stands |
//! | effects | [`react`] | the reaction's vocabulary: `Effect`, `Recipient`, a room's fan-out, recovery and presence frames |
//! | effects → delivery | [`deliver`] | `PostToConnection` with retries within the batch's window; 410 / 429 / 413 rules, slow consumers; big rooms' frames to the fan-out stage ([`deliver::stage`]) |
//! | change → effects | [`pipeline`] | one match on the record's kind, a module per kind (`connection`, `membership`, `message`, `signal`, `plugin`) that gathers and reacts purely; `perform`; whole batches within the Lambda deadline |
//! | the tenant's backend | [`webhook`] | rooms occupied and vacated, members, connections (and, opted in, messages) as signed, batched, retried deliveries |
//! | assembly | [`assembly`] | the one place a processor and its deliverers are built from configuration; a dry run set once |
//!
//! Around it: [`protocol`] (client frames), [`config`] (the environment every Lambda reads; the
//! table crate's), [`metrics`] (counts), [`lambda`] (the fan-out stage's entry point).

// The records, the protocol, presence, the table and the configuration: crate `roomcast-table`,
// under the same names.
pub use roomcast_table::{config, metrics, model, presence, protocol, store};

pub mod assembly;
pub mod deliver;
pub mod lambda;
pub mod pipeline;
pub mod react;
pub mod roster;
pub mod rules;
pub mod stream;
pub mod webhook;
