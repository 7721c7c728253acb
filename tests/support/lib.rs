//! Test support for Roomcast's end-to-end tests: real parts wherever a real one runs here.
//!
//! * [`moto_endpoint`] — a moto server (the DynamoDB and DynamoDB Streams APIs) from the
//!   project's `.venv`, started once per test binary and killed with it; or the one named by
//!   `ROOMCAST_TEST_DYNAMODB_ENDPOINT`. Never skipped: without moto, the test fails and says how
//!   to get it.
//! * [`Recorder`] — a local HTTP server speaking the `@connections` management API to the
//!   processor's real `aws-sdk-apigatewaymanagement` client; it records every call and answers
//!   with scripted faults (410, 429, 413, 500), and — [`Recorder::start_as_aws`] — after API
//!   Gateway's latency and within an account's quota (`roomcast::gateway::account`).
//! * [`Stack`] — handlers, processor and a store (embedded or DynamoDB) wired as deployed, with
//!   [`Stack::pump`] feeding the table's real stream to the processor as Lambda events.

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::dynamodb::EventRecord;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use roomcast::assembly::Assembly;
use roomcast::deliver::{Deliverer, DeliverySettings};
use roomcast::gateway::account::{Account, AccountSettings};
use roomcast::handlers::{self, HandlerDeps};
use roomcast::metrics::Metrics;
use roomcast::model::{Clock, ManualClock};
use roomcast::pipeline::Processor;
use roomcast::plugins::WithPlugins;
use roomcast::store::Store;
use roomcast::store::dynamodb::{DynamoStore, create_table};
use roomcast::store::memory::MemoryStore;
use roomcast::stream::poller::{StartAt, StreamPoller};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub mod aws;
mod faults;
mod moto;
mod parts;
mod recorder;
mod requests;
mod stack;
mod table;
mod webhooks;
pub mod ws;

pub use faults::*;
pub use moto::*;
pub use parts::*;
pub use recorder::*;
pub use requests::*;
pub use stack::*;
pub use table::*;
pub use webhooks::*;

/// Runs each scenario `async fn name(kind: &str)` once per store, as `memory::name` and
/// `dynamodb::name`. `multi_thread:` first gives each test a two-thread runtime (for tests that
/// run servers and clients side by side); `tables:` passes each scenario a fresh [`Table`]
/// instead of the store's name (the store contract's tests).
#[macro_export]
macro_rules! on_both_stores {
    (tables: $($name:ident),* $(,)?) => {
        mod memory {
            $( #[tokio::test] async fn $name() {
                super::$name($crate::Table::memory(roomcast::model::ManualClock::starting_now()).await).await
            } )*
        }
        mod dynamodb {
            $( #[tokio::test] async fn $name() { super::$name($crate::Table::dynamodb().await).await } )*
        }
    };
    (multi_thread: $($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name("memory").await } )* }
        mod dynamodb { $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $name() { super::$name("dynamodb").await } )* }
    };
    ($($name:ident),* $(,)?) => {
        mod memory { $( #[tokio::test] async fn $name() { super::$name("memory").await } )* }
        mod dynamodb { $( #[tokio::test] async fn $name() { super::$name("dynamodb").await } )* }
    };
}

/// The stack's own logs (`roomcast=debug`, or `RUST_LOG`) go to the test's captured output, so
/// a failing test shows what the processor and the deliverer did: every retry, every skip.
pub fn capture_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "roomcast=debug".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}
