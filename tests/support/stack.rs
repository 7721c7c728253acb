//! The whole backbone: handlers, processor and a table wired as deployed.

use super::*;

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

/// The deployment's HS256 secret in a [`Stack`]: what a `refresh` token is checked against.
pub const STACK_SECRET: &[u8] = b"stack-test-secret";

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
        let plugins =
            Arc::new(roomcast::plugins::registry::Registry::new(host, metrics.clone()).with_capacity(capacity));
        let processor = Assembly::new(sdk_config().await, processor_store, clock.clone(), metrics)
            .with_delivery(delivery)
            .processor()
            .with_plugins(plugins.clone());
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
            verifier: Some(Arc::new(roomcast::identity::Verifier::new(
                STACK_SECRET.to_vec(),
                Some(table.store.clone()),
            ))),
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
        let processor = self.assembly(metrics.clone()).await.with_delivery(delivery).processor();
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

    /// What this stack's processors and deliverers are built from: the table, its clock, this
    /// stack's `@connections` with short backoffs, and `metrics`.
    pub async fn assembly(&self, metrics: Arc<Metrics>) -> Assembly {
        Assembly::new(sdk_config().await, self.table.store.clone(), self.clock.clone(), metrics)
            .with_delivery(self.delivery())
    }

    /// A deliverer of its own over the table and this stack's `@connections`, with the table's
    /// counts: what a fan-out stage's worker (the `fanout` function's container) delivers with.
    pub async fn worker_deliverer(&self) -> Deliverer {
        self.assembly(self.table.metrics.clone()).await.deliverer()
    }

    /// From now on the processor hands frames for `recipients` or more to `stage`. The processor
    /// keeps the table's counts and loses its plugins.
    pub async fn hand_off_to(&mut self, stage: Arc<dyn roomcast::deliver::stage::Stage>, recipients: usize) {
        let hand_off = roomcast::deliver::stage::HandOff { stage, recipients };
        self.processor = self.assembly(self.table.metrics.clone()).await.processor().with_hand_off(hand_off);
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
            deliverer: Arc::new(self.assembly(Arc::new(Metrics::default())).await.deliverer()),
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
