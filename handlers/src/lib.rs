//! # Roomcast's write path
//!
//! The Lambdas that take requests and write records, and never push to a client: everything
//! that reaches other clients flows through the table's stream to the processor (`processor/`).
//!
//! ```text
//! client ─ws─▶ API Gateway ─▶ handlers ──write──▶ table ──stream──▶ processor
//! ```
//!
//! | module | job | binaries (`src/bin`) |
//! |--------|-----|----------------------|
//! | [`handlers`] | `$connect`, `$disconnect`, messages → records; route responses | `connect`, `disconnect`, `message` |
//! | [`auth`] | the `$connect` authorizer's rule: a token's claims, checked | `authorizer` |
//! | [`identity`] | each tenant's tokens checked with its own key: an HS256 secret or its identity provider's JWKS | |
//! | [`limits`] | rate limits per connection, user and tenant, counted in the table before a handler writes (the settings are `roomcast-table`'s) | |
//! | [`backend`] | the backends' endpoint: a publish, or an operation on a user | `publish`, `tenant_publish` |
//! | [`publish`] | a backend's message into a room | |
//! | [`users`] | a backend acting on a user: disconnect them everywhere (and refuse them for a while), put their connections into a room or take them out | (the same) |
//! | [`admin`] | the operator's operations, and the sweeper of stale connections | `admin`, `sweeper` |
//! | [`lambda`] | the entry point each binary's `main` calls | |
//!
//! The records, the protocol, the table and the configuration are `roomcast-table` (`table/`),
//! re-exported here under the same names; the deliverer the admin operations and the sweeper probe
//! and close connections with (and the assembly that builds it) come from `roomcast-processor`.
//! docs/ARCHITECTURE.md tells the whole design.

// The records, the protocol, presence and the table: crate `roomcast-table`.
pub use roomcast_table::{config, metrics, model, presence, protocol, store};

pub mod admin;
pub mod auth;
pub mod backend;
pub mod handlers;
pub mod identity;
pub mod lambda;
pub mod limits;
pub mod publish;
pub mod users;
