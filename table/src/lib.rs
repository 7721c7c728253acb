//! # Roomcast's table
//!
//! The records every Lambda reads and writes, the one DynamoDB table they live in, and what every
//! Lambda shares besides (its configuration, its `main`'s basics):
//!
//! | module | job |
//! |--------|-----|
//! | [`model`] | the records, their keys and [`model::ItemKind`] (which item a key names); validated names; the clock |
//! | [`protocol`] | the client's frames, both ways |
//! | [`presence`] | presence as state: the transitions the table applies, exactly one `joined`/`left` per user and room |
//! | [`limits`] | rate limits' settings: what is limited, per whom, how many a second (the write path counts against them) |
//! | [`store`] | the table behind small ports by concern, each with a DynamoDB adapter and an embedded one with a stream |
//! | [`metrics`] | the counters every part adds to |
//! | [`config`] | the environment every Lambda reads (`ROOMCAST_*`, `VARIABLES`), each taking its part |
//! | [`lambda`] | what every Lambda's `main` shares: JSON logs, the table's client, the deadline |
//!
//! The write path (`roomcast-handlers`, `handlers/`) and the processor (`roomcast-processor`,
//! `processor/`) build on it, re-exporting these modules under the same names; nothing here
//! knows of either.

pub mod config;
pub mod lambda;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod presence;
pub mod protocol;
pub mod store;
