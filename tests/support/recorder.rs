//! The `@connections` recorder: API Gateway's management API, with scripted faults.

use super::*;

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

/// What API Gateway does before a `GET` or `DELETE` reaches the connection: the account's
/// latency and quota (429), then the caller's policy (403).
async fn admitted<'a>(
    shared: &'a RecorderShared,
    headers: &HeaderMap,
    method: &str,
    stage: &str,
    id: &str,
) -> Result<std::sync::MutexGuard<'a, RecorderState>, axum::response::Response> {
    let (_call, admitted) = shared.account.admit();
    shared.account.delay().await;
    if admitted.is_err() {
        return Err(throttled());
    }
    let state = shared.state.lock().unwrap();
    if !state.allowed(headers, method, stage, id) {
        return Err(forbidden());
    }
    Ok(state)
}

async fn delete_connection(
    State(shared): Shared,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> axum::response::Response {
    let mut state = match admitted(&shared, &headers, "DELETE", &stage, &id).await {
        Ok(state) => state,
        Err(refused) => return refused,
    };
    state.deleted.push(id);
    StatusCode::NO_CONTENT.into_response()
}

async fn get_connection(
    State(shared): Shared,
    Path((stage, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> axum::response::Response {
    let mut state = match admitted(&shared, &headers, "GET", &stage, &id).await {
        Ok(state) => state,
        Err(refused) => return refused,
    };
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
