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

/// Runs each scenario `async fn name(kind: &str)` once per store, as `memory::name` and
/// `dynamodb::name`. `multi_thread:` first gives each test a two-thread runtime (for tests that
/// run servers and clients side by side).
#[macro_export]
macro_rules! on_both_stores {
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

// ---------------------------------------------------------------------------------------------
// moto

/// The endpoint, and the server this binary started (held so that it lives as long as the tests;
/// the kernel kills it when the binary exits).
static MOTO: OnceLock<(String, Option<Mutex<std::process::Child>>)> = OnceLock::new();

/// The endpoint of a DynamoDB API for tests. Panics, with what to do, when there is none.
pub fn moto_endpoint() -> String {
    MOTO.get_or_init(|| {
        if let Ok(url) = std::env::var("ROOMCAST_TEST_DYNAMODB_ENDPOINT")
            && !url.is_empty()
        {
            return (url, None);
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        // moto's server through tests/moto_server.py, which makes its transactions as fast as
        // DynamoDB's (see there).
        let server = root.join(".venv/bin/python");
        let launcher = root.join("tests/moto_server.py");
        assert!(
            root.join(".venv/bin/moto_server").exists(),
            "no DynamoDB API for the tests: {} is missing. Run ./scripts/test (it installs moto into .venv) \
             or set ROOMCAST_TEST_DYNAMODB_ENDPOINT to a running moto server",
            root.join(".venv/bin/moto_server").display()
        );
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
        let mut command = Command::new(&server);
        command.arg(&launcher);
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        // The server dies with the test binary, however it ends.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // PR_SET_PDEATHSIG fires when the *thread* that spawned the child ends, and each test runs
        // on a thread of its own: spawn from a thread that lives as long as the binary.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(command.spawn());
            loop {
                std::thread::park();
            }
        });
        let mut child = rx
            .recv()
            .expect("the spawning thread answers")
            .unwrap_or_else(|e| panic!("starting {}: {e}", server.display()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..300 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return (format!("http://{addr}"), Some(Mutex::new(child)));
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("moto_server exited at start with {status}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("moto_server did not listen on {addr} within 30 s");
    })
    .0
    .clone()
}

/// AWS SDK configuration for local endpoints: fixed test credentials, us-east-1.
pub async fn sdk_config() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_credential_types::Credentials::new("test", "test", None, None, "roomcast-tests"))
        .load()
        .await
}

pub static TABLES: AtomicUsize = AtomicUsize::new(0);

/// A new table on moto, made by `roomcast`'s own `create_table`.
pub async fn moto_table() -> (DynamoStore, String) {
    let (store, arn, _) = moto_table_named().await;
    (store, arn)
}

/// [`moto_table`], and the table's name.
pub async fn moto_table_named() -> (DynamoStore, String, String) {
    let sdk = sdk_config().await;
    let endpoint = moto_endpoint();
    let client = roomcast::config::dynamodb_client(&sdk, Some(&endpoint));
    let name = format!("roomcast-{}-{}", std::process::id(), TABLES.fetch_add(1, Ordering::Relaxed));
    let info = create_table(&client, &name).await.expect("create table on moto");
    (DynamoStore::new(client, name.clone()), info.stream_arn, name)
}

// ---------------------------------------------------------------------------------------------
// the table's stream

/// Where a test reads the table's stream from.
pub enum StreamSource {
    Memory(mpsc::UnboundedReceiver<EventRecord>),
    Dynamo(Box<StreamPoller>),
}

impl StreamSource {
    pub async fn dynamo(stream_arn: &str) -> StreamSource {
        let sdk = sdk_config().await;
        let client = roomcast::config::streams_client(&sdk, Some(&moto_endpoint()));
        StreamSource::Dynamo(Box::new(StreamPoller::new(client, stream_arn, StartAt::TrimHorizon)))
    }

    /// Every record written since the last call, in stream order.
    pub async fn drain(&mut self) -> Vec<EventRecord> {
        let mut records = Vec::new();
        match self {
            StreamSource::Memory(rx) => {
                while let Ok(r) = rx.try_recv() {
                    records.push(r);
                }
            }
            StreamSource::Dynamo(poller) => loop {
                let batch = poller.poll().await.expect("poll the stream");
                if batch.records.is_empty() {
                    break;
                }
                records.extend(batch.records);
            },
        }
        records
    }
}

/// A store under test with its stream.
pub struct Table {
    pub store: Arc<dyn Store>,
    pub stream: StreamSource,
    pub memory: Option<Arc<MemoryStore>>,
    /// The DynamoDB adapter, for writes beneath the store's operations ([`Table::put_raw`]).
    pub dynamo: Option<DynamoStore>,
    /// Where the store counts items that do not decode; a [`Stack`]'s processor counts in it too.
    pub metrics: Arc<Metrics>,
    pub kind: &'static str,
}

impl Table {
    pub async fn memory(clock: Arc<dyn Clock>) -> Table {
        let metrics = Arc::new(Metrics::default());
        let store = MemoryStore::with_metrics(clock, metrics.clone());
        Table {
            stream: StreamSource::Memory(store.subscribe()),
            store: store.clone(),
            memory: Some(store),
            dynamo: None,
            metrics,
            kind: "memory",
        }
    }

    /// The embedded store on `clock` (`"memory"`), or a new table on moto (`"dynamodb"`).
    pub async fn on(kind: &str, clock: &Arc<ManualClock>) -> Table {
        match kind {
            "memory" => Table::memory(clock.clone()).await,
            "dynamodb" => Table::dynamodb().await,
            other => panic!("unknown store kind {other}"),
        }
    }

    pub async fn dynamodb() -> Table {
        let (store, arn) = moto_table().await;
        Table::on_moto(store, &arn).await
    }

    /// A table on moto whose every call goes through `partitions` (one partition's latency and
    /// throughput, `roomcast::partitions`); its stream is read from moto directly.
    pub async fn dynamodb_behind(partitions: &roomcast::partitions::Partitions) -> Table {
        let (_, arn, name) = moto_table_named().await;
        let client = roomcast::config::dynamodb_client(&sdk_config().await, Some(&partitions.endpoint));
        Table::on_moto(DynamoStore::new(client, name), &arn).await
    }

    /// A table made by [`moto_table`], its stream read from the start.
    pub async fn on_moto(store: DynamoStore, arn: &str) -> Table {
        let metrics = Arc::new(Metrics::default());
        let store = store.with_metrics(metrics.clone());
        Table {
            store: Arc::new(store.clone()),
            stream: StreamSource::dynamo(arn).await,
            memory: None,
            dynamo: Some(store),
            metrics,
            kind: "dynamodb",
        }
    }

    /// Writes an item as it is, past the records' types (`PutItem` on DynamoDB): what a newer
    /// handler or a console edit writes.
    pub async fn put_raw(&self, item: serde_dynamo::Item) {
        match (&self.memory, &self.dynamo) {
            (Some(memory), _) => memory.put_raw(item),
            (None, Some(dynamo)) => {
                dynamo
                    .client()
                    .put_item()
                    .table_name(dynamo.table())
                    .set_item(Some(item.into()))
                    .send()
                    .await
                    .expect("put a raw item");
            }
            (None, None) => panic!("a table without an adapter to write through"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// the @connections recorder

/// One `@connections` call as the recorder saw it.
#[derive(Clone, Debug)]
pub struct Call {
    pub stage: String,
    pub connection_id: String,
    pub body: Value,
    pub status: u16,
}

#[derive(Default)]
struct RecorderState {
    calls: Vec<Call>,
    /// Per connection, the statuses of its next calls; 200 when none is left.
    script: HashMap<String, VecDeque<u16>>,
    /// Connections `GetConnection` answers 410 for.
    gone: std::collections::HashSet<String>,
    /// Connections whose client closed: every call answers 410, as API Gateway does.
    closed: std::collections::HashSet<String>,
    /// Connections `GetConnection` was asked about.
    probed: Vec<String>,
    /// Connections closed with `DeleteConnection`, in order.
    deleted: Vec<String>,
    /// IAM for `@connections` calls: the gate and the API's id.
    gate: Option<(aws::Gate, String)>,
}

impl RecorderState {
    /// Whether the caller's policy allows `execute-api:ManageConnections` for this call.
    fn allowed(&self, headers: &HeaderMap, method: &str, stage: &str, id: &str) -> bool {
        match &self.gate {
            Some((gate, api_id)) => gate.judge_management(headers, method, api_id, stage, id),
            None => true,
        }
    }
}

/// What the recorder's handlers share: the record, and the account its calls pass through.
struct RecorderShared {
    state: Mutex<RecorderState>,
    account: Account,
}

type Shared = State<Arc<RecorderShared>>;

/// A local `@connections` endpoint that records calls and answers as scripted.
#[derive(Clone)]
pub struct Recorder {
    pub endpoint: String,
    shared: Arc<RecorderShared>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        Self::serve(RecorderState::default(), "test", AccountSettings::default()).await
    }

    /// A recorder that answers as API Gateway does from a Lambda in its region: after
    /// `account.latency` (plus jitter), and `429 LimitExceededException` past the account's quota.
    pub async fn start_as_aws(account: AccountSettings) -> Recorder {
        Self::serve(RecorderState::default(), "test", account).await
    }

    /// The account the calls pass through: answered, throttled, most in flight at once.
    pub fn account(&self) -> &Account {
        &self.shared.account
    }

    /// A recorder that lets through only the calls the caller's policy allows
    /// (`execute-api:ManageConnections` on `{api_id}/{stage}/{METHOD}/@connections/{id}`).
    pub async fn start_gated(gate: aws::Gate, api_id: &str, stage: &str) -> Recorder {
        let state = RecorderState { gate: Some((gate, api_id.to_string())), ..RecorderState::default() };
        Self::serve(state, stage, AccountSettings::default()).await
    }

    async fn serve(state: RecorderState, stage: &str, account: AccountSettings) -> Recorder {
        let state = Arc::new(RecorderShared { state: Mutex::new(state), account: Account::new(account) });
        let app = axum::Router::new()
            .route(
                "/{stage}/@connections/{id}",
                axum::routing::post(post_to_connection).get(get_connection).delete(delete_connection),
            )
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind recorder");
        let addr = listener.local_addr().expect("recorder address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder { endpoint: format!("http://{addr}/{stage}"), shared: state }
    }

    /// The connections closed with `DeleteConnection`, in order.
    pub fn deleted(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().deleted.clone()
    }

    /// The next calls to `connection_id` answer these statuses, in order.
    pub fn script(&self, connection_id: &str, statuses: &[u16]) {
        let mut state = self.shared.state.lock().unwrap();
        state.script.entry(connection_id.to_string()).or_default().extend(statuses);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.shared.state.lock().unwrap().calls.clone()
    }

    /// Bodies accepted (200) for one connection, in arrival order.
    pub fn received(&self, connection_id: &str) -> Vec<Value> {
        self.calls()
            .into_iter()
            .filter(|c| c.connection_id == connection_id && c.status == 200)
            .map(|c| c.body)
            .collect()
    }

    /// Accepted bodies of one `action` for one connection.
    pub fn received_action(&self, connection_id: &str, action: &str) -> Vec<Value> {
        self.received(connection_id).into_iter().filter(|b| b["action"] == action).collect()
    }

    /// Presence frames one connection accepted, each checked to carry an `id` (the stream
    /// record's event id, for deduplication) and a `version` (for order), and shown without them,
    /// so tests compare the rest.
    pub fn presence(&self, connection_id: &str) -> Vec<Value> {
        self.received_action(connection_id, "presence")
            .into_iter()
            .map(|mut frame| {
                let id = frame.as_object_mut().and_then(|f| f.remove("id"));
                assert!(id.as_ref().and_then(Value::as_str).is_some_and(|id| !id.is_empty()), "no id: {frame}");
                let version = frame.as_object_mut().and_then(|f| f.remove("version"));
                assert!(version.as_ref().and_then(Value::as_u64).is_some_and(|v| v > 0), "no version: {frame}");
                frame
            })
            .collect()
    }

    /// `GetConnection` answers 410 for `connection_id` from now on.
    pub fn mark_gone(&self, connection_id: &str) {
        self.shared.state.lock().unwrap().gone.insert(connection_id.to_string());
    }

    /// The client of `connection_id` closed it: from now on every call to it answers 410.
    pub fn close(&self, connection_id: &str) {
        self.shared.state.lock().unwrap().closed.insert(connection_id.to_string());
    }

    /// The connections `GetConnection` was asked about, in order.
    pub fn probed(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().probed.clone()
    }

    pub fn clear(&self) {
        self.shared.state.lock().unwrap().calls.clear();
    }
}

/// API Gateway's answer past the account's quota.
fn throttled() -> axum::response::Response {
    let mut response = (StatusCode::TOO_MANY_REQUESTS, json!({"message": "Rate exceeded"}).to_string()).into_response();
    response.headers_mut().insert("x-amzn-ErrorType", "LimitExceededException".parse().unwrap());
    response
}

fn forbidden() -> axum::response::Response {
    let mut response = (StatusCode::FORBIDDEN, json!({"message": "ForbiddenException"}).to_string()).into_response();
    response.headers_mut().insert("x-amzn-ErrorType", "ForbiddenException".parse().unwrap());
    response
}

async fn delete_connection(
    State(shared): Shared,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> axum::response::Response {
    let (_call, admitted) = shared.account.admit();
    shared.account.delay().await;
    if admitted.is_err() {
        return throttled();
    }
    let mut state = shared.state.lock().unwrap();
    if !state.allowed(&headers, "DELETE", &stage, &id) {
        return forbidden();
    }
    state.deleted.push(id);
    StatusCode::NO_CONTENT.into_response()
}

async fn get_connection(
    State(shared): Shared,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> axum::response::Response {
    let (_call, admitted) = shared.account.admit();
    shared.account.delay().await;
    if admitted.is_err() {
        return throttled();
    }
    let mut state = shared.state.lock().unwrap();
    if !state.allowed(&headers, "GET", &stage, &id) {
        return forbidden();
    }
    state.probed.push(id.clone());
    if state.gone.contains(&id) || state.closed.contains(&id) {
        let mut response = (StatusCode::GONE, json!({"message": null}).to_string()).into_response();
        response.headers_mut().insert("x-amzn-ErrorType", "GoneException".parse().unwrap());
        response
    } else {
        let body = json!({"ConnectedAt": "2026-01-01T00:00:00Z", "Identity": {"SourceIp": "127.0.0.1"}, "LastActiveAt": "2026-01-01T00:00:00Z"});
        (StatusCode::OK, body.to_string()).into_response()
    }
}

async fn post_to_connection(
    State(shared): Shared,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> impl IntoResponse {
    let signed =
        headers.get("authorization").and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("AWS4-HMAC-SHA256"));
    let (_call, admitted) = shared.account.admit();
    shared.account.delay().await;
    let mut state = shared.state.lock().unwrap();
    if admitted.is_err() {
        // Past the account's quota: answered, recorded as throttled, never delivered.
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        state.calls.push(Call { stage, connection_id: id, body, status: 429 });
        return throttled();
    }
    let signed = signed && state.allowed(&headers, "POST", &stage, &id);
    let status = match state.script.get_mut(&id).and_then(|q| q.pop_front()) {
        _ if !signed => 403,
        Some(scripted) => scripted,
        None if state.closed.contains(&id) => 410,
        None => 200,
    };
    let body = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    state.calls.push(Call { stage, connection_id: id, body, status });
    let error_type = match status {
        410 => "GoneException",
        429 => "LimitExceededException",
        413 => "PayloadTooLargeException",
        403 => "ForbiddenException",
        _ => "InternalServerErrorException",
    };
    let mut response = (StatusCode::from_u16(status).unwrap(), "").into_response();
    if status != 200 {
        response =
            (StatusCode::from_u16(status).unwrap(), json!({ "message": error_type }).to_string()).into_response();
        response.headers_mut().insert("x-amzn-ErrorType", error_type.parse().unwrap());
    }
    response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    response
}

// ---------------------------------------------------------------------------------------------
// AWS-documented request fixtures

pub const CONNECT_FIXTURE: &str = include_str!("fixtures/example-apigw-websocket-request.json");
pub const DISCONNECT_FIXTURE: &str = include_str!("fixtures/example-apigw-websocket-request-disconnect-route.json");
pub const DYNAMODB_EVENT_FIXTURE: &str = include_str!("fixtures/example-dynamodb-event.json");

/// The AWS example WebSocket request, as `$connect` with our authorizer's context.
pub fn connect_request(connection_id: &str, tenant: &str, user: &str, rooms: &str) -> ApiGatewayWebsocketProxyRequest {
    let mut v: Value = serde_json::from_str(CONNECT_FIXTURE).unwrap();
    v["requestContext"]["connectionId"] = json!(connection_id);
    v["requestContext"]["routeKey"] = json!("$connect");
    v["requestContext"]["eventType"] = json!("CONNECT");
    v["requestContext"]["domainName"] = json!("abcd1234.execute-api.us-east-1.amazonaws.com");
    v["requestContext"]["stage"] = json!("prod");
    v["requestContext"]["authorizer"] =
        json!({"principalId": user, "tenant": tenant, "userId": user, "integrationLatency": 12});
    v["queryStringParameters"] = json!({"rooms": rooms, "deployment_id": "deploy-1", "connection_type": "client"});
    v["multiValueQueryStringParameters"] =
        json!({"rooms": [rooms], "deployment_id": ["deploy-1"], "connection_type": ["client"]});
    v["body"] = Value::Null;
    serde_json::from_value(v).unwrap()
}

/// Query string parameters as API Gateway passes them.
pub fn query(pairs: &[(&str, &str)]) -> aws_lambda_events::query_map::QueryMap {
    let map: std::collections::HashMap<String, Vec<String>> =
        pairs.iter().map(|(k, v)| (k.to_string(), vec![v.to_string()])).collect();
    map.into()
}

/// The AWS example WebSocket request, as a message frame from `connection_id`.
pub fn message_request(connection_id: &str, body: &str) -> ApiGatewayWebsocketProxyRequest {
    let mut v: Value = serde_json::from_str(CONNECT_FIXTURE).unwrap();
    v["requestContext"]["connectionId"] = json!(connection_id);
    v["requestContext"]["routeKey"] = json!("$default");
    v["requestContext"]["eventType"] = json!("MESSAGE");
    v["requestContext"]["authorizer"] = Value::Null;
    v["body"] = json!(body);
    serde_json::from_value(v).unwrap()
}

/// The AWS example `$disconnect` request for `connection_id`.
pub fn disconnect_request(connection_id: &str) -> ApiGatewayWebsocketProxyRequest {
    let mut v: Value = serde_json::from_str(DISCONNECT_FIXTURE).unwrap();
    v["requestContext"]["connectionId"] = json!(connection_id);
    serde_json::from_value(v).unwrap()
}

pub fn body_json(response: &ApiGatewayProxyResponse) -> Value {
    match &response.body {
        Some(aws_lambda_events::encodings::Body::Text(t)) => {
            serde_json::from_str(t).unwrap_or(Value::String(t.clone()))
        }
        other => panic!("expected a text body, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// the whole backbone

/// Handlers, processor and table wired as deployed, with the processor's real management API
/// client talking to a [`Recorder`].
pub struct Stack {
    pub table: Table,
    pub clock: Arc<ManualClock>,
    pub deps: HandlerDeps,
    pub processor: Processor,
    pub recorder: Recorder,
    /// Every `batchItemFailures` the processor answered.
    pub failures: Vec<Value>,
    /// Tenant plugins the processor runs ([`Stack::install_plugin`]).
    pub plugins: Arc<roomcast::plugins::registry::Registry>,
    /// Every stream record [`Stack::pump`] fed to the processor, in order: a capture.
    pub captured: Vec<aws_lambda_events::dynamodb::EventRecord>,
}

/// All attempts for one recipient, in the tests' stacks on loopback (the deployment's is 20 s).
const TEST_DEADLINE: Duration = Duration::from_secs(5);

impl Stack {
    pub async fn memory() -> Stack {
        let clock = ManualClock::starting_now();
        Self::build(Table::memory(clock.clone()).await, clock, DeliverySettings::default()).await
    }

    pub async fn dynamodb() -> Stack {
        Self::build(Table::dynamodb().await, ManualClock::starting_now(), DeliverySettings::default()).await
    }

    pub async fn on(kind: &str) -> Stack {
        match kind {
            "memory" => Self::memory().await,
            "dynamodb" => Self::dynamodb().await,
            other => panic!("unknown store kind {other}"),
        }
    }

    pub async fn build(table: Table, clock: Arc<ManualClock>, delivery: DeliverySettings) -> Stack {
        Self::build_with_store(table.store.clone(), table, clock, delivery).await
    }

    /// `processor_store` may wrap the table's store (to inject platform faults).
    pub async fn build_with_store(
        processor_store: Arc<dyn Store>,
        table: Table,
        clock: Arc<ManualClock>,
        delivery: DeliverySettings,
    ) -> Stack {
        let host = Arc::new(roomcast::plugins::PluginHost::new().expect("the plugin host"));
        let capacity = roomcast::plugins::registry::DEFAULT_CAPACITY;
        let delivery = DeliverySettings { deadline: TEST_DEADLINE, ..delivery };
        Self::assemble(processor_store, table, clock, delivery, host, capacity, AccountSettings::default()).await
    }

    /// A stack whose `@connections` answers as API Gateway does from a Lambda in its region:
    /// after the account's latency, and 429 past its quota ([`Recorder::start_as_aws`]).
    pub async fn as_aws(kind: &str, account: AccountSettings) -> Stack {
        let clock = ManualClock::starting_now();
        let table = Table::on(kind, &clock).await;
        let host = Arc::new(roomcast::plugins::PluginHost::new().expect("the plugin host"));
        let capacity = roomcast::plugins::registry::DEFAULT_CAPACITY;
        // The deployment's own deadline per recipient: a throttled account takes seconds.
        Self::assemble(table.store.clone(), table, clock, DeliverySettings::default(), host, capacity, account).await
    }

    /// A stack whose processor keeps at most `capacity` tenants' compiled plugins.
    pub async fn with_plugin_capacity(kind: &str, capacity: usize) -> Stack {
        let clock = ManualClock::starting_now();
        let table = Table::on(kind, &clock).await;
        let host = Arc::new(roomcast::plugins::PluginHost::new().expect("the plugin host"));
        let (account, delivery) =
            (AccountSettings::default(), DeliverySettings { deadline: TEST_DEADLINE, ..Default::default() });
        Self::assemble(table.store.clone(), table, clock, delivery, host, capacity, account).await
    }

    async fn assemble(
        processor_store: Arc<dyn Store>,
        table: Table,
        clock: Arc<ManualClock>,
        delivery: DeliverySettings,
        host: Arc<roomcast::plugins::PluginHost>,
        capacity: usize,
        account: AccountSettings,
    ) -> Stack {
        capture_logs();
        let recorder = Recorder::start_as_aws(account).await;
        // The table's: the processor's counts include the items its reads could not decode.
        let metrics = table.metrics.clone();
        let delivery = DeliverySettings {
            endpoint_override: Some(recorder.endpoint.clone()),
            initial_backoff: Duration::from_millis(10),
            ..delivery
        };
        let deliverer =
            Deliverer::new(sdk_config().await, delivery, processor_store.clone(), clock.clone(), metrics.clone());
        let plugins =
            Arc::new(roomcast::plugins::registry::Registry::new(host, metrics.clone()).with_capacity(capacity));
        let processor =
            Processor::new(processor_store, deliverer, clock.clone(), metrics, 8).with_plugins(plugins.clone());
        let deps = HandlerDeps {
            joins: Default::default(),
            // Off, but in the tests of limits (tests/limits.rs): other tests send faster than a
            // client may, on a clock that does not move.
            limits: roomcast::limits::Limiter::new(roomcast::limits::RateLimits::unlimited()),
            store: table.store.clone(),
            clock: clock.clone(),
            connection_ttl_seconds: 600,
            history_ttl_seconds: 3600,
            idempotency_window_seconds: roomcast::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
        };
        Stack { table, clock, deps, processor, recorder, failures: Vec::new(), plugins, captured: Vec::new() }
    }

    pub async fn connect(&self, id: &str, tenant: &str, user: &str, rooms: &str) -> ApiGatewayProxyResponse {
        handlers::connect(&connect_request(id, tenant, user, rooms), &self.deps).await
    }

    pub async fn send(&self, id: &str, frame: Value) -> Value {
        body_json(&handlers::message(&message_request(id, &frame.to_string()), &self.deps).await)
    }

    pub async fn disconnect(&self, id: &str) -> ApiGatewayProxyResponse {
        handlers::disconnect(&disconnect_request(id), &self.deps).await
    }

    /// Feeds everything in the table's stream to the processor as Lambda events (JSON, as Lambda
    /// delivers them), until the stream is quiet: cascades write records that are processed too.
    pub async fn pump(&mut self) -> usize {
        let Stack { table, processor, captured, failures, .. } = self;
        pump_records(table, processor, captured, failures).await
    }
}

/// Feeds the table's stream to `processor` until it is quiet (see [`Stack::pump`]).
async fn pump_records(
    table: &mut Table,
    processor: &Processor,
    captured: &mut Vec<EventRecord>,
    failures: &mut Vec<Value>,
) -> usize {
    let mut total = 0;
    loop {
        let records = table.stream.drain().await;
        if records.is_empty() {
            return total;
        }
        total += records.len();
        let event = json!({ "Records": records });
        captured.extend(records);
        let response = processor.handle_event(&event).await.expect("a stream event");
        let response = serde_json::to_value(response).unwrap();
        if !response["batchItemFailures"].as_array().is_some_and(|a| a.is_empty()) {
            failures.push(response);
        }
    }
}

impl Stack {
    /// Another processor container over the same table and `@connections`: its own rosters,
    /// delivery limits and counts, as a second Lambda container of the function has.
    pub async fn another_container(&self) -> (Processor, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let delivery = DeliverySettings { deadline: TEST_DEADLINE, ..self.delivery() };
        let store = self.table.store.clone();
        let deliverer =
            Deliverer::new(sdk_config().await, delivery, store.clone(), self.clock.clone(), metrics.clone());
        let processor = Processor::new(store, deliverer, self.clock.clone(), metrics.clone(), 8);
        (processor, metrics)
    }

    /// The deployment's delivery settings, against this stack's `@connections`, with short backoffs.
    fn delivery(&self) -> DeliverySettings {
        DeliverySettings {
            endpoint_override: Some(self.recorder.endpoint.clone()),
            initial_backoff: Duration::from_millis(10),
            ..Default::default()
        }
    }

    /// A deliverer of its own over the table and this stack's `@connections`, with the table's
    /// counts: what a fan-out stage's worker (the `fanout` function's container) delivers with.
    pub async fn worker_deliverer(&self) -> Deliverer {
        Deliverer::new(
            sdk_config().await,
            self.delivery(),
            self.table.store.clone(),
            self.clock.clone(),
            self.table.metrics.clone(),
        )
    }

    /// From now on the processor hands frames for `recipients` or more to `stage`. The processor
    /// keeps the table's counts and loses its plugins.
    pub async fn hand_off_to(&mut self, stage: Arc<dyn roomcast::deliver::stage::Stage>, recipients: usize) {
        let deliverer = self.worker_deliverer().await;
        let store = self.table.store.clone();
        let hand_off = roomcast::deliver::stage::HandOff { stage, recipients };
        self.processor =
            Processor::new(store, deliverer, self.clock.clone(), self.table.metrics.clone(), 8).with_hand_off(hand_off);
    }

    /// [`Stack::hand_off_to`] a fan-out stage in this process
    /// (`roomcast::deliver::stage::LocalStage`), whose workers have a deliverer of their own, as
    /// the `fanout` function's containers do.
    pub async fn hand_off_at(&mut self, recipients: usize) -> Arc<roomcast::deliver::stage::LocalStage> {
        let stage = roomcast::deliver::stage::LocalStage::new(self.worker_deliverer().await);
        self.hand_off_to(stage.clone(), recipients).await;
        stage
    }

    /// [`Stack::pump`] as AWS delivers the stream ([`roomcast::stream::shards::PerItemOrder`]):
    /// order per item only, shards' batches at the same time, some delivered twice. Shard 0 goes
    /// to this stack's processor, the others to `others` (one processor a shard, as each shard has
    /// an invocation of its own). Until the stream is quiet; the number of records.
    pub async fn pump_per_item(
        &mut self,
        order: &mut roomcast::stream::shards::PerItemOrder,
        others: &[&Processor],
    ) -> usize {
        let mut total = 0;
        loop {
            let records = self.table.stream.drain().await;
            if records.is_empty() {
                return total;
            }
            total += records.len();
            self.captured.extend(records.iter().cloned());
            let failures = Mutex::new(Vec::new());
            let processor = &self.processor;
            order
                .deliver(records, |d| {
                    let processor = if d.shard == 0 { processor } else { others[(d.shard - 1) % others.len()] };
                    let failures = &failures;
                    async move {
                        let response =
                            processor.handle_event(&json!({ "Records": d.records })).await.expect("a stream event");
                        let response = serde_json::to_value(response).unwrap();
                        if !response["batchItemFailures"].as_array().is_some_and(|a| a.is_empty()) {
                            failures.lock().unwrap().push(response);
                        }
                    }
                })
                .await;
            self.failures.extend(failures.into_inner().unwrap());
        }
    }

    /// The operators' side over this stack's table and `@connections`: the sweeper's `sweep`.
    pub async fn admin(&self) -> roomcast::admin::Admin {
        roomcast::admin::Admin {
            store: self.table.store.clone(),
            deliverer: Arc::new(Deliverer::new(
                sdk_config().await,
                self.delivery(),
                self.table.store.clone(),
                self.clock.clone(),
                Arc::new(Metrics::default()),
            )),
            clock: self.clock.clone(),
            idle_limit: Duration::from_secs(600),
            presence_grace: Duration::from_secs(roomcast::presence::RECONCILE_GRACE_SECONDS as u64),
            connection_ttl: Duration::from_secs(600),
        }
    }

    /// [`Stack::pump`], the records going to `processor` (one of [`Stack::another_container`]).
    pub async fn pump_into(&mut self, processor: &Processor) -> usize {
        pump_records(&mut self.table, processor, &mut self.captured, &mut self.failures).await
    }
}

// ---------------------------------------------------------------------------------------------
// platform faults

/// Wraps a real store; reading the members of `room` fails as if DynamoDB were unavailable, for
/// the next `times` reads.
pub struct UnavailableRoom {
    pub inner: Arc<dyn Store>,
    pub room: String,
    pub times: AtomicUsize,
}

#[async_trait::async_trait]
impl Store for UnavailableRoom {
    async fn put_connection(
        &self,
        c: &roomcast::model::Connection,
        m: &[roomcast::model::Membership],
    ) -> roomcast::store::Result<()> {
        self.inner.put_connection(c, m).await
    }
    async fn get_connection(
        &self,
        id: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Option<roomcast::model::Connection>> {
        self.inner.get_connection(id, now).await
    }
    async fn delete_connection(
        &self,
        id: &str,
        r: Option<roomcast::model::LeftReason>,
    ) -> roomcast::store::Result<Option<roomcast::model::Connection>> {
        self.inner.delete_connection(id, r).await
    }
    async fn join(&self, m: &roomcast::model::Membership) -> roomcast::store::Result<bool> {
        self.inner.join(m).await
    }
    async fn leave(&self, id: &str, tenant: &str, room: &str) -> roomcast::store::Result<()> {
        self.inner.leave(id, tenant, room).await
    }
    async fn touch(
        &self,
        c: &roomcast::model::Connection,
        now: chrono::DateTime<chrono::Utc>,
        ttl: i64,
    ) -> roomcast::store::Result<()> {
        self.inner.touch(c, now, ttl).await
    }
    async fn room_members(
        &self,
        tenant: &str,
        room: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Membership>> {
        if room == self.room
            && self.times.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            return Err(roomcast::store::StoreError::Unavailable("query: service unavailable (injected)".into()));
        }
        self.inner.room_members(tenant, room, now).await
    }
    async fn bump_roster(&self, tenant: &str, room: &str) -> roomcast::store::Result<()> {
        self.inner.bump_roster(tenant, room).await
    }
    async fn tenant_identity(
        &self,
        tenant: &str,
    ) -> roomcast::store::Result<Option<roomcast::identity::TenantIdentity>> {
        self.inner.tenant_identity(tenant).await
    }
    async fn put_tenant_identity(&self, identity: &roomcast::identity::TenantIdentity) -> roomcast::store::Result<()> {
        self.inner.put_tenant_identity(identity).await
    }
    async fn stale_connections(
        &self,
        shard: u32,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Connection>> {
        self.inner.stale_connections(shard, cutoff).await
    }
    async fn present_users(&self, shard: u32) -> roomcast::store::Result<Vec<roomcast::model::Presence>> {
        self.inner.present_users(shard).await
    }
    async fn take_sweep_lease(&self, now: i64, until: i64) -> roomcast::store::Result<Option<u32>> {
        self.inner.take_sweep_lease(now, until).await
    }
    async fn release_sweep_lease(&self, next_shard: u32) -> roomcast::store::Result<()> {
        self.inner.release_sweep_lease(next_shard).await
    }
    async fn count_in_window(&self, key: &str, window: i64) -> roomcast::store::Result<u64> {
        self.inner.count_in_window(key, window).await
    }
    async fn roster_version(&self, tenant: &str, room: &str) -> roomcast::store::Result<Option<u64>> {
        // Never kept: every read of the room asks `room_members`, which fails as set.
        if room == self.room {
            return Ok(None);
        }
        self.inner.roster_version(tenant, room).await
    }
    async fn remove_membership(
        &self,
        tenant: &str,
        room: &str,
        id: &str,
        r: roomcast::model::LeftReason,
    ) -> roomcast::store::Result<()> {
        self.inner.remove_membership(tenant, room, id, r).await
    }
    async fn put_message(&self, m: &roomcast::model::Message) -> roomcast::store::Result<()> {
        self.inner.put_message(m).await
    }
    async fn put_signal(&self, s: &roomcast::model::Signal) -> roomcast::store::Result<()> {
        self.inner.put_signal(s).await
    }
    async fn migrate_presence(&self, tenant: &str, room: &str) -> roomcast::store::Result<bool> {
        self.inner.migrate_presence(tenant, room).await
    }
    async fn unannounce(&self, tenant: &str, room: &str, user_id: &str) -> roomcast::store::Result<()> {
        self.inner.unannounce(tenant, room, user_id).await
    }
    async fn apply_presence(
        &self,
        update: &roomcast::presence::PresenceUpdate,
    ) -> roomcast::store::Result<roomcast::presence::PresenceOutcome> {
        self.inner.apply_presence(update).await
    }
    async fn who(
        &self,
        tenant: &str,
        room: &str,
        limit: usize,
        after: Option<&str>,
    ) -> roomcast::store::Result<roomcast::presence::WhoPage> {
        self.inner.who(tenant, room, limit, after).await
    }
    async fn presence(
        &self,
        tenant: &str,
        room: &str,
        user: &str,
    ) -> roomcast::store::Result<Option<roomcast::model::Presence>> {
        self.inner.presence(tenant, room, user).await
    }
    async fn room_presence(
        &self,
        tenant: &str,
        room: &str,
    ) -> roomcast::store::Result<Option<roomcast::model::RoomPresence>> {
        self.inner.room_presence(tenant, room).await
    }
    async fn tenant_settings(&self, tenant: &str) -> roomcast::store::Result<Option<roomcast::model::TenantSettings>> {
        self.inner.tenant_settings(tenant).await
    }
    async fn put_tenant_settings(&self, settings: &roomcast::model::TenantSettings) -> roomcast::store::Result<()> {
        self.inner.put_tenant_settings(settings).await
    }
    async fn fanout_progress(&self, key: &str) -> roomcast::store::Result<Option<roomcast::model::FanoutProgress>> {
        self.inner.fanout_progress(key).await
    }
    async fn put_fanout_progress(&self, progress: &roomcast::model::FanoutProgress) -> roomcast::store::Result<()> {
        self.inner.put_fanout_progress(progress).await
    }
    async fn plugin_config(&self, tenant: &str) -> roomcast::store::Result<Option<roomcast::model::PluginConfig>> {
        self.inner.plugin_config(tenant).await
    }
    async fn put_plugin_config(&self, config: &roomcast::model::PluginConfig) -> roomcast::store::Result<()> {
        self.inner.put_plugin_config(config).await
    }
    async fn settle_join(&self, m: &roomcast::model::Membership, allowed: bool) -> roomcast::store::Result<bool> {
        self.inner.settle_join(m, allowed).await
    }
    async fn set_authorizes_joins(&self, tenant: &str, version: &str, authorizes: bool) -> roomcast::store::Result<()> {
        self.inner.set_authorizes_joins(tenant, version, authorizes).await
    }
    async fn user_connections(
        &self,
        tenant: &str,
        user: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Connection>> {
        self.inner.user_connections(tenant, user, now).await
    }
    async fn scan_connections(
        &self,
        limit: usize,
        after: Option<&str>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Connection>> {
        self.inner.scan_connections(limit, after).await
    }
    async fn scan_presence(
        &self,
        limit: usize,
        after: Option<(String, String)>,
    ) -> roomcast::store::Result<Vec<roomcast::model::Presence>> {
        self.inner.scan_presence(limit, after).await
    }
    async fn put_presence_suspects(&self, p: &roomcast::model::Presence) -> roomcast::store::Result<bool> {
        self.inner.put_presence_suspects(p).await
    }
    async fn set_status(&self, id: &str, status: &str) -> roomcast::store::Result<Option<roomcast::model::Connection>> {
        self.inner.set_status(id, status).await
    }
    async fn put_plugin(
        &self,
        m: &roomcast::model::PluginMeta,
        c: &[roomcast::model::PluginChunk],
    ) -> roomcast::store::Result<()> {
        self.inner.put_plugin(m, c).await
    }
    async fn plugin_bytes(
        &self,
        tenant: &str,
        version: &str,
        chunks: usize,
    ) -> roomcast::store::Result<Option<Vec<u8>>> {
        self.inner.plugin_bytes(tenant, version, chunks).await
    }
    async fn plugin(
        &self,
        tenant: &str,
        version: &str,
    ) -> roomcast::store::Result<Option<roomcast::model::PluginMeta>> {
        self.inner.plugin(tenant, version).await
    }
    async fn plugins(&self, tenant: &str) -> roomcast::store::Result<Vec<roomcast::model::PluginMeta>> {
        self.inner.plugins(tenant).await
    }
    async fn set_plugin_status(
        &self,
        tenant: &str,
        version: &str,
        status: roomcast::model::PluginStatus,
        reason: Option<&str>,
    ) -> roomcast::store::Result<()> {
        self.inner.set_plugin_status(tenant, version, status, reason).await
    }
    async fn active_plugin(&self, tenant: &str) -> roomcast::store::Result<Option<roomcast::model::PluginActive>> {
        self.inner.active_plugin(tenant).await
    }
    async fn set_active_plugin(&self, tenant: &str, version: Option<&str>) -> roomcast::store::Result<()> {
        self.inner.set_active_plugin(tenant, version).await
    }
    async fn history_page(
        &self,
        tenant: &str,
        room: &str,
        from: &roomcast::store::HistoryFrom,
        limit: usize,
        now: chrono::DateTime<chrono::Utc>,
        viewer: Option<&str>,
        max_bytes: usize,
    ) -> roomcast::store::Result<Vec<roomcast::model::Message>> {
        self.inner.history_page(tenant, room, from, limit, now, viewer, max_bytes).await
    }
    async fn put_message_once(
        &self,
        m: &roomcast::model::Message,
        record: &roomcast::model::IdempotencyRecord,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<roomcast::model::Message> {
        self.inner.put_message_once(m, record, now).await
    }
    async fn mark_message(
        &self,
        tenant: &str,
        room: &str,
        sk: &str,
        verdict: &roomcast::react::Verdict,
    ) -> roomcast::store::Result<()> {
        self.inner.mark_message(tenant, room, sk, verdict).await
    }
    async fn message(
        &self,
        tenant: &str,
        room: &str,
        sk: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> roomcast::store::Result<Option<roomcast::model::Message>> {
        self.inner.message(tenant, room, sk, now).await
    }
}

impl Stack {
    /// Compiles a component built from this workspace (`scripts/test` builds them) and makes it
    /// `tenant`'s plugin.
    pub fn install_plugin(&self, tenant: &str, crate_name: &str, policy: roomcast::plugins::registry::Policy) {
        let limits = roomcast::plugins::Limits::default();
        let plugin = self.plugins.host().compile(&component(crate_name), &limits).expect("compile the plugin");
        self.plugins.install(tenant, plugin, limits, policy, true);
    }

    /// `roomcast plugin upload` into this stack's table, at the stack's time.
    pub async fn upload_plugin(
        &self,
        tenant: &str,
        component: &[u8],
        policy: roomcast::model::FailurePolicy,
        limits: roomcast::plugins::LimitOverrides,
    ) -> roomcast::model::PluginMeta {
        use roomcast::model::Clock;
        roomcast::plugins::upload(
            &*self.table.store,
            self.plugins.host(),
            tenant,
            component,
            policy,
            limits,
            self.clock.now(),
        )
        .await
        .expect("upload the plugin")
    }

    pub fn clock_now(&self) -> chrono::DateTime<chrono::Utc> {
        use roomcast::model::Clock;
        self.clock.now()
    }

    /// What is in the stream now, processed as one batch (cascades it writes wait for the next).
    pub async fn pump_once(&mut self) -> Vec<EventRecord> {
        let records = self.table.stream.drain().await;
        self.deliver(&records).await;
        records
    }

    /// `records` as one Lambda event, again if they were delivered before: a redelivery.
    pub async fn deliver(&mut self, records: &[EventRecord]) {
        if records.is_empty() {
            return;
        }
        self.captured.extend(records.iter().cloned());
        let response = self.processor.handle_event(&json!({ "Records": records })).await.expect("a stream event");
        let response = serde_json::to_value(response).unwrap();
        if !response["batchItemFailures"].as_array().is_some_and(|a| a.is_empty()) {
            self.failures.push(response);
        }
    }

    /// DynamoDB's TTL deleting a connection whose TTL has passed: on the embedded store its TTL
    /// process runs (every expired item goes, with the service identity); on moto, which has no
    /// TTL process, the processor gets the REMOVE record DynamoDB would write for the connection.
    pub async fn expire_by_ttl(&mut self, connection_id: &str, sequence: &str) {
        use roomcast::model::Clock;
        let now = self.clock.now();
        match &self.table.memory {
            Some(memory) => {
                assert!(memory.expire_due(now) >= 1, "nothing had expired");
            }
            None => {
                let dynamo = self.table.dynamo.as_ref().expect("a DynamoDB table");
                let item = dynamo
                    .client()
                    .get_item()
                    .table_name(dynamo.table())
                    .key("pk", aws_sdk_dynamodb::types::AttributeValue::S(format!("CONN#{connection_id}")))
                    .key("sk", aws_sdk_dynamodb::types::AttributeValue::S("META".into()))
                    .send()
                    .await
                    .unwrap()
                    .item
                    .expect("the expired connection's record");
                let old_image: serde_dynamo::Item = item.into();
                let record = json!({
                    "eventID": format!("ttl-{connection_id}"), "eventName": "REMOVE", "eventVersion": "1.1",
                    "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
                    "userIdentity": {"type": "Service", "principalId": "dynamodb.amazonaws.com"},
                    "dynamodb": {"Keys": {"pk": {"S": format!("CONN#{connection_id}")}, "sk": {"S": "META"}},
                                 "OldImage": old_image, "SequenceNumber": sequence, "SizeBytes": 200,
                                 "StreamViewType": "NEW_AND_OLD_IMAGES"}
                });
                let response = self.processor.handle_event(&json!({"Records": [record]})).await.unwrap();
                assert!(response.batch_item_failures.is_empty());
            }
        }
    }

    /// Every page of `who` for `room`, asked by `connection_id`: (user, connections) in order, and
    /// the total the first page gave.
    pub async fn who(&self, connection_id: &str, room: &str, page: usize) -> (Vec<(String, u64)>, u64) {
        let mut users = Vec::new();
        let mut after: Option<String> = None;
        let mut total = None;
        loop {
            let answer = self.send(connection_id, json!({"action":"who","room":room,"limit":page,"after":after})).await;
            assert_eq!(answer["action"], "who", "{answer}");
            total.get_or_insert(answer["total"].as_u64().expect("a total"));
            for u in answer["users"].as_array().unwrap() {
                users.push((u["user_id"].as_str().unwrap().to_string(), u["connections"].as_u64().unwrap()));
            }
            match answer["next"].as_str() {
                Some(next) => after = Some(next.to_string()),
                None => return (users, total.unwrap()),
            }
        }
    }

    /// The presence events `observer` was told about `user`, each id once (as a client dedupes),
    /// in the order of their `version` (frames from two shards may arrive the other way round; a
    /// client keeps the highest version).
    pub fn presence_events(&self, observer: &str, user: &str) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        let mut frames: Vec<Value> = self
            .recorder
            .received_action(observer, "presence")
            .into_iter()
            .filter(|f| f["user_id"] == user)
            .filter(|f| seen.insert(f["id"].as_str().expect("every presence frame has an id").to_string()))
            .collect();
        frames.sort_by_key(|f| f["version"].as_u64().expect("every presence frame has a version"));
        let versions: std::collections::HashSet<u64> = frames.iter().filter_map(|f| f["version"].as_u64()).collect();
        assert_eq!(versions.len(), frames.len(), "two frames of {user} with one version: {frames:?}");
        frames.into_iter().map(|f| f["event"].as_str().unwrap().to_string()).collect()
    }

    /// The live set of a room as its membership records say: (user, connections) by user id.
    pub async fn live_set(&self, tenant: &str, room: &str) -> Vec<(String, u64)> {
        let members = self.table.store.room_members(tenant, room, self.clock_now()).await.unwrap();
        let mut users = std::collections::BTreeMap::<String, u64>::new();
        for m in members {
            *users.entry(m.user_id).or_default() += 1;
        }
        users.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// the local stack over real WebSockets

pub mod ws {
    use std::time::Duration;

    use futures::{SinkExt, StreamExt};
    use roomcast::auth::{Claims, mint};
    use roomcast::dev::{DevOptions, DevStack};
    use serde_json::Value;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    pub const SECRET: &[u8] = b"roomcast-test-secret";

    /// `roomcast dev` on a free port, on the embedded store or on moto.
    pub async fn dev(kind: &str, tweak: impl FnOnce(&mut DevOptions)) -> DevStack {
        super::capture_logs();
        let mut options = DevOptions {
            port: 0,
            auth: roomcast::gateway::AuthMode::Jwt { secret: SECRET.to_vec() },
            // Off, but where a test sets them: other tests send faster than a client may.
            rate_limits: roomcast::limits::RateLimits::unlimited(),
            ..DevOptions::default()
        };
        options.delivery.initial_backoff = Duration::from_millis(20);
        if kind == "dynamodb" {
            options.dynamodb_endpoint = Some(super::moto_endpoint());
            options.table = format!(
                "dev-{}-{}",
                std::process::id(),
                super::TABLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
        }
        tweak(&mut options);
        roomcast::dev::start(options).await.expect("start the dev stack")
    }

    pub fn presence(user: &str, event: &str) -> impl Fn(&Value) -> bool {
        let (user, event) = (user.to_string(), event.to_string());
        move |f| f["action"] == "presence" && f["user_id"] == user.as_str() && f["event"] == event.as_str()
    }

    /// `client` asks for every page of `who` in `room`: (user, connections), and the total.
    pub async fn who(client: &mut Client, room: &str) -> (Vec<(String, u64)>, u64) {
        let mut users = Vec::new();
        let mut after = Value::Null;
        loop {
            let page = client.ask(serde_json::json!({"action":"who","room":room,"limit":2,"after":after}), "who").await;
            for u in page["users"].as_array().unwrap() {
                users.push((u["user_id"].as_str().unwrap().to_string(), u["connections"].as_u64().unwrap()));
            }
            match &page["next"] {
                Value::String(next) => after = Value::String(next.clone()),
                _ => return (users, page["total"].as_u64().unwrap()),
            }
        }
    }

    /// Waits until the table's live memberships of acme/`room` are `want` (user, connections),
    /// then checks that `who` answers the same.
    pub async fn who_settles_on(stack: &DevStack, client: &mut Client, room: &str, want: &[(&str, u64)]) {
        let want: Vec<(String, u64)> = want.iter().map(|(u, n)| (u.to_string(), *n)).collect();
        for _ in 0..200 {
            let members = stack.store.room_members("acme", room, chrono::Utc::now()).await.unwrap();
            let mut live = std::collections::BTreeMap::<String, u64>::new();
            for m in members {
                *live.entry(m.user_id).or_default() += 1;
            }
            let live: Vec<_> = live.into_iter().collect();
            if live == want {
                // The memberships are settled; presence follows from their records.
                for _ in 0..200 {
                    let (users, total) = who(client, room).await;
                    if users == want && total == want.len() as u64 {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                panic!("who never equalled the live set {want:?}: {:?}", who(client, room).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the room's memberships never became {want:?}");
    }

    /// Takes every pending frame matching `want`.
    pub fn take_all(client: &mut Client, want: impl Fn(&Value) -> bool) -> Vec<Value> {
        std::iter::from_fn(|| client.pending_match(&want)).collect()
    }

    pub fn token(tenant: &str, user: &str) -> String {
        let exp = chrono::Utc::now().timestamp() + 3600;
        mint(
            &Claims {
                tenant: tenant.into(),
                sub: user.into(),
                exp,
                nbf: None,
                scope: None,
                rooms: None,
                extra: Default::default(),
            },
            SECRET,
        )
    }

    type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    /// A real WebSocket client that keeps what it has not looked at yet.
    pub struct Client {
        socket: Socket,
        pending: Vec<Value>,
        pub closed: Option<(u16, String)>,
    }

    /// Connects with a query string (`token=…&rooms=…`); the upgrade's HTTP status on refusal.
    pub async fn try_connect(stack: &DevStack, query: &str) -> Result<Client, u16> {
        let url = format!("{}?{query}", stack.ws_url());
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => Ok(Client { socket, pending: Vec::new(), closed: None }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
            Err(e) => panic!("connect failed without an HTTP answer: {e}"),
        }
    }

    pub async fn connect(stack: &DevStack, tenant: &str, user: &str, rooms: &str) -> Client {
        let query = format!("token={}&rooms={rooms}", token(tenant, user));
        try_connect(stack, &query).await.unwrap_or_else(|status| panic!("connect refused with {status}"))
    }

    impl Client {
        pub async fn send(&mut self, frame: Value) {
            self.send_text(frame.to_string()).await;
        }

        /// Sends, reporting whether the socket took it (false once the server has closed it).
        pub async fn try_send(&mut self, frame: Value) -> bool {
            self.socket.send(Message::Text(frame.to_string().into())).await.is_ok()
        }

        pub async fn send_text(&mut self, text: String) {
            self.socket.send(Message::Text(text.into())).await.expect("send a frame");
        }

        async fn read(&mut self, wait: Duration) -> Option<Value> {
            loop {
                match tokio::time::timeout(wait, self.socket.next()).await {
                    Err(_) => return None,
                    Ok(Some(Ok(Message::Text(t)))) => return Some(serde_json::from_str(&t).expect("JSON frames")),
                    Ok(Some(Ok(Message::Close(frame)))) => {
                        self.closed =
                            Some(frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string())));
                        return None;
                    }
                    Ok(Some(Ok(_))) => continue,
                    Ok(Some(Err(_))) | Ok(None) => {
                        self.closed.get_or_insert((1006, String::new()));
                        return None;
                    }
                }
            }
        }

        /// The first frame (pending or new) matching `want`, within 10 s; panics otherwise.
        pub async fn expect(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
            if let Some(i) = self.pending.iter().position(&want) {
                return self.pending.remove(i);
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while let Some(left) = deadline.checked_duration_since(tokio::time::Instant::now()) {
                match self.read(left).await {
                    Some(frame) if want(&frame) => return frame,
                    Some(frame) => self.pending.push(frame),
                    None if self.closed.is_some() => {
                        panic!("closed {:?} while waiting for {what}; had {:?}", self.closed, self.pending)
                    }
                    None => break,
                }
            }
            panic!("no {what} within 10 s; had {:?}", self.pending)
        }

        pub async fn expect_action(&mut self, action: &str) -> Value {
            self.expect(action, |f| f["action"] == action).await
        }

        /// Waits for the marker frame `marker` and asserts that nothing matching `unwanted`
        /// arrived before it: the negative check of a frame that, had it been sent, would have
        /// been sent before the marker.
        pub async fn expect_before(
            &mut self,
            what: &str,
            marker: impl Fn(&Value) -> bool,
            unwanted: impl Fn(&Value) -> bool,
        ) {
            self.expect(what, marker).await;
            assert!(!self.pending.iter().any(unwanted), "unexpected before {what}: {:?}", self.pending);
        }

        /// Takes a pending frame matching `want`, if one has arrived.
        pub fn pending_match(&mut self, want: impl Fn(&Value) -> bool) -> Option<Value> {
            let i = self.pending.iter().position(want)?;
            Some(self.pending.remove(i))
        }

        /// A request/answer on this socket (route responses come back on it).
        pub async fn ask(&mut self, frame: Value, answer: &str) -> Value {
            self.send(frame).await;
            self.expect_action(answer).await
        }

        /// Waits for the server to close the socket; the close code and reason.
        pub async fn expect_close(&mut self, wait: Duration) -> (u16, String) {
            let deadline = tokio::time::Instant::now() + wait;
            while self.closed.is_none() {
                let left = deadline.checked_duration_since(tokio::time::Instant::now()).expect("closed in time");
                if let Some(frame) = self.read(left).await {
                    self.pending.push(frame);
                }
            }
            self.closed.clone().unwrap()
        }

        pub async fn close(mut self) {
            let frame =
                tokio_tungstenite::tungstenite::protocol::CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
            let _ = self.socket.close(Some(frame)).await;
            // Read until the server's close arrives, so `$disconnect` has been called.
            while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), self.socket.next()).await {}
        }
    }
}

/// Signs `header.payload` with HS256, for hand-made tokens.
/// A tenant backend's publish token (scope `publish`), valid ten minutes.
pub fn publish_token(tenant: &str, secret: &[u8]) -> String {
    let exp = chrono::Utc::now().timestamp() + 600;
    let claims = roomcast::auth::Claims {
        tenant: tenant.into(),
        sub: "shop".into(),
        exp,
        nbf: None,
        scope: Some("publish".into()),
        rooms: None,
        extra: Default::default(),
    };
    roomcast::auth::mint(&claims, secret)
}

pub fn sign_hs256(signed: &str, secret: &[u8]) -> String {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(signed.as_bytes());
    format!("{signed}.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

/// A component built from this workspace for wasm32-wasip2 (`scripts/test` builds them first).
pub fn component(crate_name: &str) -> Vec<u8> {
    let file = crate_name.replace('-', "_");
    let path = target_dir().join(format!("wasm32-wasip2/release/{file}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}. Build the components first: scripts/test does, or \
             cargo build --release --target wasm32-wasip2 -p {crate_name}",
            path.display()
        )
    })
}

/// A plugin written by hand (`tests/fixtures/memories.wat`) whose component instantiates `hogs`
/// core modules of `pages` 64 KiB pages of memory each; otherwise it accepts everything.
pub fn memories_component(hogs: usize, pages: u32) -> Vec<u8> {
    wat_plugin(hogs, pages, false)
}

/// The same plugin, whose module loops without end in its start function (at instantiation).
pub fn looping_at_start_component() -> Vec<u8> {
    wat_plugin(0, 1, true)
}

fn wat_plugin(hogs: usize, pages: u32, spin_at_start: bool) -> Vec<u8> {
    let text = include_str!("fixtures/memories.wat")
        .replace("@START@", if spin_at_start { "(start $spin)" } else { "" })
        .replace("@PAGES@", &pages.to_string())
        .replace("@HOGS@", &"(core instance (instantiate $hog))\n".repeat(hogs));
    wat::parse_str(&text).expect("the fixture is valid")
}

/// Where cargo puts build output: `CARGO_TARGET_DIR` when set, else the workspace's `target/`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// A connection record as the `$connect` handler writes it, for store-level tests.
pub fn test_connection(
    id: &str,
    tenant: &str,
    user: &str,
    rooms: &[&str],
    at: chrono::DateTime<chrono::Utc>,
) -> roomcast::model::Connection {
    roomcast::model::Connection::new(roomcast::model::NewConnection {
        connection_id: id,
        tenant: &roomcast::model::Name::parse("tenant", tenant).unwrap(),
        user_id: user,
        connection_type: Some("client".into()),
        deployment_id: Some("d1".into()),
        rooms: rooms.iter().map(|r| r.to_string()).collect(),
        endpoint: "https://abc.execute-api.us-east-1.amazonaws.com/prod".into(),
        now: at,
        ttl_seconds: 600,
    })
}

/// Writes `c` and a membership for each of its rooms, as `$connect` does.
pub async fn put_test_connection(table: &Table, c: &roomcast::model::Connection, at: chrono::DateTime<chrono::Utc>) {
    let memberships: Vec<_> =
        c.rooms.iter().map(|r| c.membership(r, roomcast::model::JoinReason::Connect, at)).collect();
    table.store.put_connection(c, &memberships).await.unwrap();
}
