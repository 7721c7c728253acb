//! # Roomcast
//!
//! The `roomcast` command and the tools around the data path: the local API Gateway emulator
//! ([`gateway`]), `roomcast dev` ([`dev`]: the whole system in one process), `roomcast bench`
//! ([`bench`]), stream capture and replay ([`replay`]) and the command line ([`cli`]).
//!
//! The system itself is the write path `roomcast-handlers` (`handlers/`), the stream processor
//! `roomcast-processor` (`processor/`), the table `roomcast-table` (`table/`) and the tenant plugin
//! host `roomcast-plugin-host` (`plugins/host/`). They are re-exported here under one name —
//! `roomcast::handlers`, `roomcast::pipeline`, `roomcast::plugins` — for the tools, the tests and
//! the benchmarks.

pub use roomcast_handlers::{admin, auth, backend, handlers, identity, limits, publish, users};
/// The tenant plugin host (`roomcast-plugin-host`).
pub use roomcast_plugin_host as plugins;
pub use roomcast_processor::{
    assembly, config, deliver, lambda, metrics, model, pipeline, presence, protocol, react, roster, rules, store,
    stream, webhook,
};

pub mod bench;
pub mod cli;
pub mod dev;
pub mod gateway;
pub mod partitions;
pub mod replay;
