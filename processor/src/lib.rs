//! # Roomcast
//!
//! Real-time rooms, presence and tenant plugins for AWS API Gateway WebSocket APIs.
//!
//! ```text
//! client ─ws─▶ API Gateway ─▶ handlers ──write──▶ table ──stream──▶ processor ──@connections──▶ clients
//! ```
//!
//! # Layout
//!
//! The write path (handlers) only writes records. Everything that reaches other clients flows
//! through the stream, in this order — each step its own module:
//!
//! | step | module | job |
//! |------|--------|-----|
//! | records | [`model`] | the single table's records and keys; validated names; the clock |
//! | write path | [`handlers`] | `$connect`, `$disconnect`, messages → records; route responses |
//! | table | [`store`] | one trait, a DynamoDB adapter and an embedded one with a stream |
//! | record → change | [`stream`] | decode stream records into typed [`stream::Change`]s; the batch runner; the Streams poller |
//! | change → effects | [`react`] | pure: welcome, room fan-out, presence, cascades |
//! | effects → delivery | [`deliver`] | `PostToConnection` with retries within the batch's window; 410 / 429 / 413 rules, slow consumers |
//! | the processor | [`pipeline`] | the path above for one record and for a batch, within the Lambda deadline; following each tenant's `ACTIVE` plugin pointer |
//! | tenant rules | [`plugins`] | the wasmtime host; the registry [`pipeline`] asks before [`react`] |
//! | debugging | [`replay`] | capture a stream; replay records through [`pipeline`], printing every decision |
//!
//! Around it: [`protocol`] (client frames), [`admin`] (operator operations and the sweeper), [`auth`] (the `$connect` authorizer's rule),
//! [`config`] (the environment), [`metrics`] (counts), [`lambda`] (the Lambda entry points),
//! [`gateway`] (the local API Gateway emulator), [`dev`] (`roomcast dev`: everything in one
//! process), [`bench`] (`roomcast bench`: the local stack under load), [`cli`] (the `roomcast`
//! command).

pub mod admin;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod deliver;
pub mod dev;
pub mod gateway;
pub mod handlers;
pub mod lambda;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod plugins;
pub mod protocol;
pub mod react;
pub mod replay;
pub mod store;
pub mod stream;
