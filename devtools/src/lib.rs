//! # Roomcast
//!
//! The `roomcast` command and the tools around the data path: the local API Gateway emulator
//! ([`gateway`]), `roomcast dev` ([`dev`]: the whole system in one process), `roomcast bench`
//! ([`bench`]), stream capture and replay ([`replay`]) and the command line ([`cli`]).
//!
//! The data path itself is `roomcast-core` (`processor/`), and the tenant plugin host is
//! `roomcast-plugin-host` (`plugins/host/`). Both are re-exported here under one name —
//! `roomcast::pipeline`, `roomcast::plugins` — for the tools, the tests and the benchmarks.

pub use roomcast_core::{
    admin, assembly, auth, config, deliver, handlers, identity, lambda, limits, metrics, model, pipeline, presence,
    protocol, publish, react, roster, rules, store, stream,
};
/// The tenant plugin host (`roomcast-plugin-host`).
pub use roomcast_plugin_host as plugins;

pub mod bench;
pub mod cli;
pub mod dev;
pub mod gateway;
pub mod partitions;
pub mod replay;
