//! Roomcast as AWS runs it: the real Lambda binaries behind a local Lambda Runtime API, each
//! with credentials allowed exactly what its function's policy in `template.yaml` grants
//! (`roomcast_tests::aws`), the table on moto, `@connections` on a recorder that checks
//! `execute-api:ManageConnections` the same way, and the stream fed to the processor as Lambda's
//! event source mapping feeds it — with the processor's own role, every batch delivered twice,
//! and a failed record retried from where the processor said. Big rooms' jobs go through a FIFO
//! queue on moto's SQS to the `fanout` binary, fed as Lambda's SQS event source feeds it.

use roomcast::store::{ConnectionStore, MembershipStore, PluginStore, TenantStore};
use std::collections::BTreeMap;
use std::time::Duration;

use roomcast::stream::poller::{StartAt, StreamPoller};
use roomcast_tests::aws::{Deployment, Gate, Invoked, Lambda, Template};
use roomcast_tests::{Recorder, connect_request, disconnect_request, message_request, moto_endpoint, moto_table};
use serde_json::{Value, json};

const FUNCTIONS: &[&str] = &[
    "AuthorizerFunction",
    "ConnectFunction",
    "DisconnectFunction",
    "MessageFunction",
    "ProcessorFunction",
    "SweeperFunction",
    "AdminFunction",
    "PublishFunction",
    "TenantPublishFunction",
    "FanoutFunction",
    "WebhookFunction",
];

/// The webhook queue's `maxReceiveCount` here: the template's is ten (about 25 minutes of
/// retries); three lets the test see dead letters in seconds.
const WEBHOOK_RECEIVES: u32 = 3;
const SECRET: &str = "as-aws-runs-it-secret";
const API_ID: &str = "local0001";
const STAGE: &str = "prod";

/// A deployment of `template.yaml` on loopback.
struct Aws {
    gate: Gate,
    recorder: Recorder,
    admin: roomcast::store::dynamodb::DynamoStore,
    lambdas: BTreeMap<&'static str, Lambda>,
    poller: StreamPoller,
    /// Deliver every batch twice, as the event source may after a failure or a timeout.
    redeliver: bool,
    /// Every `batchItemFailures` the processor answered.
    failures: Vec<Value>,
    /// The fan-out stage's queue, and the SQS client its event source reads it with (the
    /// fanout function's role).
    fanout_queue: String,
    fanout_sqs: aws_sdk_sqs::Client,
    /// The webhook queue and its dead-letter queue, and the SQS client the webhook function's
    /// event source reads with (its role).
    webhook_queue: String,
    webhook_dead_letters: String,
    webhook_sqs: aws_sdk_sqs::Client,
}

impl Aws {
    async fn start(template: Template, redeliver: bool, extra: &[(&str, &str)]) -> Aws {
        roomcast_tests::capture_logs();
        let (admin, stream_arn) = moto_table().await;
        let parameter = format!("/roomcast/jwt-{}-{}", std::process::id(), admin.table());
        // The stack's fan-out queue, as CloudFormation makes it (FIFO).
        let sdk = roomcast_tests::sdk_config().await;
        let sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&sdk).endpoint_url(moto_endpoint()).build(),
        );
        let fanout_queue = sqs
            .create_queue()
            .queue_name(format!("fanout-{}.fifo", admin.table()))
            .attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
            .send()
            .await
            .expect("create the fan-out queue on moto")
            .queue_url
            .expect("a queue URL");
        // The webhook queue and its dead-letter queue, FIFO, as CloudFormation makes them.
        let fifo = |name: String| {
            sqs.create_queue().queue_name(name).attributes(aws_sdk_sqs::types::QueueAttributeName::FifoQueue, "true")
        };
        let webhook_dead_letters = fifo(format!("webhook-dlq-{}.fifo", admin.table()))
            .send()
            .await
            .expect("create the webhook dead-letter queue on moto")
            .queue_url
            .expect("a queue URL");
        let redrive = json!({
            "deadLetterTargetArn": roomcast_tests::aws::queue_arn(&webhook_dead_letters),
            "maxReceiveCount": WEBHOOK_RECEIVES,
        });
        let webhook_queue = fifo(format!("webhook-{}.fifo", admin.table()))
            .attributes(aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy, redrive.to_string())
            .send()
            .await
            .expect("create the webhook queue on moto")
            .queue_url
            .expect("a queue URL");
        let deployment = Deployment {
            table: admin.table().to_string(),
            stream_arn,
            api_id: API_ID.into(),
            stage: STAGE.into(),
            parameters: BTreeMap::from([("JwtSecretParameter".to_string(), parameter.clone())]),
            fanout_queue: fanout_queue.clone(),
            webhook_queue: webhook_queue.clone(),
            webhook_dead_letters: webhook_dead_letters.clone(),
        };
        // The operator creates the secret before deploying (the template's parameter says so).
        let ssm = aws_sdk_ssm::Client::from_conf(
            aws_sdk_ssm::config::Builder::from(&sdk).endpoint_url(moto_endpoint()).build(),
        );
        ssm.put_parameter()
            .name(&parameter)
            .value(SECRET)
            .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
            .send()
            .await
            .expect("put the JWT secret parameter on moto");

        let gate = Gate::start(&moto_endpoint(), &deployment).await;
        let recorder = Recorder::start_gated(gate.clone(), API_ID, STAGE).await;
        let functions = template.functions(&deployment);
        let mut lambdas = BTreeMap::new();
        for name in FUNCTIONS {
            let function = functions
                .iter()
                .find(|f| f.logical_id == *name)
                .unwrap_or_else(|| panic!("template.yaml has no {name}"))
                .clone();
            gate.admit(&function);
            let mut env =
                vec![("ROOMCAST_MANAGEMENT_ENDPOINT", recorder.endpoint.as_str()), ("RUST_LOG", "roomcast=debug")];
            env.extend_from_slice(extra);
            lambdas.insert(*name, Lambda::start(function, &gate.endpoint, &env).await);
        }

        // The event source mapping reads the stream with the function's own role.
        let processor = &lambdas["ProcessorFunction"].function;
        let streams = roomcast::config::streams_client(&role(processor).await, Some(&gate.endpoint));
        let poller = StreamPoller::new(streams, &deployment.stream_arn, StartAt::TrimHorizon);
        // The SQS event source reads the queue with the fanout function's own role.
        let fanout = &lambdas["FanoutFunction"].function;
        let fanout_sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&role(fanout).await).endpoint_url(&gate.endpoint).build(),
        );
        let webhook = &lambdas["WebhookFunction"].function;
        let webhook_sqs = aws_sdk_sqs::Client::from_conf(
            aws_sdk_sqs::config::Builder::from(&role(webhook).await).endpoint_url(&gate.endpoint).build(),
        );
        Aws {
            gate,
            recorder,
            admin,
            lambdas,
            poller,
            redeliver,
            failures: Vec::new(),
            fanout_queue,
            fanout_sqs,
            webhook_queue,
            webhook_dead_letters,
            webhook_sqs,
        }
    }

    /// Lambda's SQS event source for the webhook function, until no message is visible: up to ten
    /// an invocation, with their receive counts; the messages it did not report are deleted, the
    /// reported ones come back after the backoff the function set. The batches' reported ids.
    async fn pump_webhooks(&mut self) -> Vec<String> {
        let timeout = Duration::from_secs(self.lambdas["WebhookFunction"].function.timeout);
        self.pump_webhooks_within(timeout).await
    }

    /// [`Aws::pump_webhooks`] with each invocation's deadline `timeout` away: it must answer by
    /// then.
    async fn pump_webhooks_within(&mut self, timeout: Duration) -> Vec<String> {
        let mut reported = Vec::new();
        loop {
            let out = self
                .webhook_sqs
                .receive_message()
                .queue_url(&self.webhook_queue)
                .max_number_of_messages(10)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await
                .expect("the event source receives from the webhook queue");
            self.assert_allowed();
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                return reported;
            }
            let arn = roomcast_tests::aws::queue_arn(&self.webhook_queue);
            let records: Vec<Value> = messages
                .iter()
                .map(|m| {
                    let count = m
                        .attributes
                        .as_ref()
                        .and_then(|a| a.get(&aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount))
                        .cloned()
                        .unwrap_or_else(|| "1".into());
                    json!({
                        "messageId": m.message_id, "receiptHandle": m.receipt_handle, "body": m.body,
                        "md5OfBody": m.md5_of_body, "attributes": { "ApproximateReceiveCount": count },
                        "messageAttributes": {}, "eventSource": "aws:sqs", "eventSourceARN": arn,
                        "awsRegion": roomcast_tests::aws::REGION,
                    })
                })
                .collect();
            let lambda = &self.lambdas["WebhookFunction"];
            let answer = lambda.invoke_within(json!({ "Records": records }), timeout).await;
            self.assert_allowed();
            let answer = answer.response("WebhookFunction", lambda);
            let failed: Vec<String> = answer["batchItemFailures"]
                .as_array()
                .unwrap_or_else(|| panic!("the webhook function answered {answer}"))
                .iter()
                .map(|f| f["itemIdentifier"].as_str().unwrap().to_string())
                .collect();
            for m in &messages {
                let id = m.message_id.clone().unwrap();
                if failed.contains(&id) {
                    continue;
                }
                self.webhook_sqs
                    .delete_message()
                    .queue_url(&self.webhook_queue)
                    .receipt_handle(m.receipt_handle.clone().unwrap())
                    .send()
                    .await
                    .expect("the event source deletes what the function did not report");
                self.assert_allowed();
            }
            reported.extend(failed);
        }
    }

    /// Lambda's SQS event source for the fanout function, until the queue is empty: up to ten
    /// messages an invocation (twice when redelivering, as SQS may), deleted once the function
    /// answered without reporting them. The jobs worked.
    async fn pump_fanout(&mut self) -> usize {
        let mut jobs = 0;
        loop {
            let out = self
                .fanout_sqs
                .receive_message()
                .queue_url(&self.fanout_queue)
                .max_number_of_messages(10)
                .message_system_attribute_names(aws_sdk_sqs::types::MessageSystemAttributeName::All)
                .send()
                .await
                .expect("the event source receives from the fan-out queue");
            self.assert_allowed();
            let messages = out.messages.unwrap_or_default();
            if messages.is_empty() {
                return jobs;
            }
            let arn = roomcast_tests::aws::queue_arn(&self.fanout_queue);
            let records: Vec<Value> = messages
                .iter()
                .map(|m| {
                    json!({
                        "messageId": m.message_id, "receiptHandle": m.receipt_handle, "body": m.body,
                        "md5OfBody": m.md5_of_body, "attributes": {}, "messageAttributes": {},
                        "eventSource": "aws:sqs", "eventSourceARN": arn, "awsRegion": roomcast_tests::aws::REGION,
                    })
                })
                .collect();
            let times = if self.redeliver { 2 } else { 1 };
            for _ in 0..times {
                let answer = self.invoke("FanoutFunction", json!({ "Records": records })).await;
                assert_eq!(answer["batchItemFailures"], json!([]), "the fanout function reported jobs: {answer}");
            }
            let entries: Vec<aws_sdk_sqs::types::DeleteMessageBatchRequestEntry> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle.clone().unwrap())
                        .build()
                        .unwrap()
                })
                .collect();
            self.fanout_sqs
                .delete_message_batch()
                .queue_url(&self.fanout_queue)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("the event source deletes the worked jobs");
            self.assert_allowed();
            jobs += messages.len();
        }
    }

    fn assert_allowed(&self) {
        let denials = self.gate.denials();
        assert!(denials.is_empty(), "IAM denied calls that the functions make:\n{}", denials.join("\n"));
    }

    /// One invocation; it must answer, and every AWS call it made must have been allowed.
    async fn invoke(&self, function: &str, payload: Value) -> Value {
        let lambda = &self.lambdas[function];
        let answer = lambda.invoke(payload).await;
        self.assert_allowed();
        answer.response(function, lambda)
    }

    async fn authorize(&self, token: &str) -> Value {
        let mut event: Value =
            serde_json::from_str(include_str!("fixtures/example-apigw-v2-custom-authorizer-websocket-request.json"))
                .unwrap();
        event["methodArn"] = json!(format!("arn:aws:execute-api:us-east-1:123456789012:{API_ID}/{STAGE}/$connect"));
        event["queryStringParameters"] = json!({ "token": token, "rooms": "lobby" });
        event["multiValueQueryStringParameters"] = json!({ "token": [token], "rooms": ["lobby"] });
        self.invoke("AuthorizerFunction", event).await
    }

    /// `$connect` as API Gateway calls it after the authorizer allowed `token`.
    async fn connect(&self, id: &str, token: &str, rooms: &str) -> Value {
        let allowed = self.authorize(token).await;
        assert_eq!(allowed["policyDocument"]["Statement"][0]["Effect"], "Allow", "{allowed}");
        let mut event = serde_json::to_value(connect_request(id, "x", "x", rooms)).unwrap();
        let mut context = allowed["context"].clone();
        context["principalId"] = allowed["principalId"].clone();
        event["requestContext"]["authorizer"] = context;
        let answer = self.invoke("ConnectFunction", event).await;
        assert_eq!(answer["statusCode"], 200, "$connect answered {answer}");
        answer
    }

    async fn send(&self, id: &str, frame: Value) -> Value {
        let event = serde_json::to_value(message_request(id, &frame.to_string())).unwrap();
        let answer = self.invoke("MessageFunction", event).await;
        serde_json::from_str(answer["body"].as_str().unwrap_or("null")).unwrap_or(Value::Null)
    }

    async fn disconnect(&self, id: &str) {
        let event = serde_json::to_value(disconnect_request(id)).unwrap();
        let answer = self.invoke("DisconnectFunction", event).await;
        assert_eq!(answer["statusCode"], 200, "$disconnect answered {answer}");
    }

    /// The event source with the processor's deadline at `deadline`: every invocation must
    /// answer before it; a reported record is retried from (at most Lambda's five times). The
    /// number of invocations that reported one.
    async fn pump_within(&mut self, deadline: Duration) -> usize {
        let mut reported = 0;
        loop {
            let batch = self.poller.poll().await.expect("read the stream");
            if batch.records.is_empty() {
                return reported;
            }
            let records = self.admitted(batch.records);
            if records.is_empty() {
                continue;
            }
            let started = std::time::Instant::now();
            let lambda = &self.lambdas["ProcessorFunction"];
            let answer = lambda.invoke_within(json!({ "Records": records }), deadline).await;
            let Invoked::Response(response) = answer else {
                panic!("the processor did not answer within its deadline: {answer:?}\n{}", lambda.logs())
            };
            assert!(started.elapsed() < deadline, "answered after the deadline: {:?}", started.elapsed());
            if let Some(first) = response["batchItemFailures"].as_array().and_then(|a| a.first()) {
                reported += 1;
                assert!(reported <= 5, "still failing after Lambda's retries: {response}");
                self.poller.rewind(&batch.shard_id, first["itemIdentifier"].as_str().unwrap());
            }
        }
    }

    /// The records the processor's stream filter lets through (Lambda drops the rest).
    fn admitted(
        &self,
        records: Vec<aws_lambda_events::dynamodb::EventRecord>,
    ) -> Vec<aws_lambda_events::dynamodb::EventRecord> {
        let function = &self.lambdas["ProcessorFunction"].function;
        records.into_iter().filter(|r| function.admits(r)).collect()
    }

    /// Feeds the stream to the processor until it is quiet, as the event source mapping does:
    /// each batch (twice when redelivering), and after a reported failure the batch again from
    /// the reported record. Returns the invocations made.
    async fn pump(&mut self) -> Vec<Invoked> {
        let mut invocations = Vec::new();
        let mut retries = 0;
        loop {
            let batch = self.poller.poll().await.expect("the event source reads the stream");
            self.assert_allowed();
            if batch.records.is_empty() {
                return invocations;
            }
            let records = self.admitted(batch.records);
            if records.is_empty() {
                continue;
            }
            let event = json!({ "Records": records });
            let times = if self.redeliver { 2 } else { 1 };
            let mut failed = None;
            for _ in 0..times {
                let lambda = &self.lambdas["ProcessorFunction"];
                let answer = lambda.invoke(event.clone()).await;
                self.assert_allowed();
                if let Invoked::Response(response) = &answer {
                    if let Some(first) = response["batchItemFailures"].as_array().and_then(|a| a.first()) {
                        failed = first["itemIdentifier"].as_str().map(str::to_string);
                        self.failures.push(response.clone());
                    }
                } else {
                    panic!("the processor did not answer: {answer:?}\n--- its log ---\n{}", lambda.logs());
                }
                invocations.push(answer);
            }
            if let Some(sequence) = failed {
                retries += 1;
                assert!(retries <= 5, "the batch failed 5 times (MaximumRetryAttempts): {:?}", self.failures);
                self.poller.rewind(&batch.shard_id, &sequence);
            }
        }
    }
}

/// The SDK configuration of an event source mapping acting with `function`'s role.
async fn role(function: &roomcast_tests::aws::Function) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(roomcast_tests::aws::REGION))
        .credentials_provider(aws_credential_types::Credentials::new(
            function.access_key(),
            "local-secret",
            None,
            None,
            "event-source-mapping",
        ))
        .load()
        .await
}

fn token(tenant: &str, user: &str) -> String {
    let exp = chrono::Utc::now().timestamp() + 3600;
    roomcast::auth::mint(
        &roomcast::auth::Claims {
            tenant: tenant.into(),
            sub: user.into(),
            exp,
            nbf: None,
            scope: None,
            rooms: None,
            extra: Default::default(),
        },
        SECRET.as_bytes(),
    )
}

/// Every function's binary, through a whole session (connect, join, messages, a plugin upload
/// and the plugin deciding, history, disconnect, the sweeper and every admin operation), with
/// nothing but its template policy, and every stream batch delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_function_runs_under_its_template_policy_with_every_batch_delivered_twice() {
    // Rooms of four or more hand their frames to the fan-out stage (lobby never has four); a
    // 410 deletes at once (no connection here is a client still opening).
    // The sweep repairs presence without a grace here, so that its reconciliation runs under
    // the sweeper's and the admin function's policies.
    let staged = [
        ("ROOMCAST_HANDOFF_RECIPIENTS", "4"),
        ("ROOMCAST_YOUNG_CONNECTION_MS", "0"),
        ("ROOMCAST_PRESENCE_REPAIR_GRACE_SECONDS", "0"),
        // Acme's webhook is on loopback (the deployed function refuses private addresses).
        ("ROOMCAST_WEBHOOK_RETRY_SECONDS", "1"),
        ("ROOMCAST_WEBHOOK_ALLOW_PRIVATE", "true"),
    ];
    let mut aws = Aws::start(Template::load(), true, &staged).await;
    // Acme has a webhook that refuses its first delivery (webhooks have a test of their own).
    let (receiver, url) = roomcast_tests::WebhookReceiver::start().await;
    receiver.refuse_first.store(1, std::sync::atomic::Ordering::SeqCst);
    let hook = roomcast::model::WebhookSettings {
        url: format!("{url}/ok"),
        secret: "acme-hook-secret".into(),
        events: Vec::new(),
    };
    let settings =
        roomcast::model::TenantSettings { webhook: Some(hook), ..roomcast::model::TenantSettings::new("acme") };
    aws.admin.put_tenant_settings(&settings).await.expect("acme's webhook");

    // The authorizer reads its secret from SSM with its own policy, and refuses a bad token.
    let denied = aws.authorize("not-a-token").await;
    assert_eq!(denied["policyDocument"]["Statement"][0]["Effect"], "Deny", "{denied}");
    // A tenant with an HS256 secret of its own: the authorizer reads it from the table (GetItem
    // under its policy); its tokens are admitted, the deployment's secret no longer is.
    let mut own = roomcast::identity::TenantIdentity::new("own");
    own.hs256_secret = Some("own-tenant-secret-of-at-least-32-bytes".into());
    aws.admin.put_tenant_identity(&own).await.expect("the tenant's identity");
    let claims = |tenant: &str| roomcast::auth::Claims {
        tenant: tenant.into(),
        sub: "olga".into(),
        exp: chrono::Utc::now().timestamp() + 600,
        nbf: None,
        scope: None,
        rooms: None,
        extra: Default::default(),
    };
    let allowed = aws.authorize(&roomcast::auth::mint(&claims("own"), b"own-tenant-secret-of-at-least-32-bytes")).await;
    assert_eq!(allowed["policyDocument"]["Statement"][0]["Effect"], "Allow", "{allowed}");
    assert_eq!(allowed["context"]["tenant"], "own", "{allowed}");
    let shared = aws.authorize(&token("own", "olga")).await;
    assert_eq!(shared["policyDocument"]["Statement"][0]["Effect"], "Deny", "{shared}");

    aws.connect("c-alice", &token("acme", "alice"), "lobby").await;
    aws.connect("c-bob", &token("acme", "bob"), "lobby").await;
    aws.pump().await;
    for id in ["c-alice", "c-bob"] {
        assert!(!aws.recorder.received_action(id, "welcome").is_empty(), "{id} was not welcomed");
    }

    // Messages, join, the read-only routes.
    let mut ids = Vec::new();
    for text in ["one", "two"] {
        let ack = aws.send("c-alice", json!({"action": "sendMessage", "room": "lobby", "message": text})).await;
        assert_eq!(ack["action"], "ack", "{ack}");
        ids.push(ack["id"].as_str().unwrap().to_string());
    }
    assert_eq!(aws.send("c-bob", json!({"action": "join", "room": "side"})).await["action"], "ack");
    assert_eq!(aws.send("c-bob", json!({"action": "ping"})).await["action"], "pong");
    assert_eq!(aws.send("c-bob", json!({"action": "info"})).await["action"], "info");
    aws.pump().await;

    // Rate limits, counted in the table under the message function's policy: tenant `flood`
    // allows 2 messages a second per connection, so a flood is refused, then deleted, and the
    // processor closes its socket (DELETE @connections under its policy).
    let mut settings = roomcast::model::TenantSettings::new("flood");
    settings.rate_limits.insert("messages_per_connection".into(), 2);
    aws.admin.put_tenant_settings(&settings).await.expect("the tenant's limits");
    aws.connect("c-flood", &token("flood", "mallory"), "lobby").await;
    let mut refused = 0;
    for i in 0..200 {
        let answer = aws
            .send("c-flood", json!({"action": "sendMessage", "room": "lobby", "message": format!("flood {i}")}))
            .await;
        if answer["code"] == "rate_limited" {
            refused += 1;
            assert!(answer["retry_after_ms"].as_u64().is_some_and(|ms| ms <= 1000), "{answer}");
            if answer["message"].as_str().unwrap().contains("being closed") {
                break;
            }
        }
    }
    assert!(refused > 0, "the flood was never refused");
    aws.pump().await;
    assert!(aws.recorder.deleted().contains(&"c-flood".to_string()), "closed: {:?}", aws.recorder.deleted());

    // An operator uploads a plugin (with the operator's credentials); the processor activates
    // it from the stream and runs it on the next message, all under its own policy.
    let host = roomcast::plugins::PluginHost::new().expect("a plugin host");
    let component = roomcast_tests::component("roomcast-plugin-moderation");
    roomcast::plugins::upload(
        &aws.admin,
        &host,
        "acme",
        &component,
        roomcast::model::FailurePolicy::Closed,
        Default::default(),
        chrono::Utc::now(),
    )
    .await
    .expect("upload the plugin");
    aws.pump().await;
    let spam = aws.send("c-alice", json!({"action": "sendMessage", "room": "lobby", "message": "buy spam"})).await;
    let ok = aws.send("c-alice", json!({"action": "sendMessage", "room": "lobby", "message": "three"})).await;
    ids.push(ok["id"].as_str().unwrap().to_string());
    aws.pump().await;
    let rejected = aws.recorder.received_action("c-alice", "rejected");
    assert!(rejected.iter().any(|r| r["id"] == spam["id"]), "the plugin did not reject: {rejected:?}");

    // Room authorization (plugins 0.2): tenant `gate` runs the rooms-acl example with its list
    // in the tenant's configuration. `$connect` reads the ACTIVE pointer (GetItem under its
    // policy); the processor decides each join and settles it under its own.
    let acl = roomcast_tests::component("roomcast-plugin-rooms-acl");
    let values = [("room.vip".to_string(), "ann".to_string())].into_iter().collect();
    let config = roomcast::model::PluginConfig::new("gate", values, chrono::Utc::now()).unwrap();
    aws.admin.put_plugin_config(&config).await.expect("configure the tenant");
    roomcast::plugins::upload(
        &aws.admin,
        &host,
        "gate",
        &acl,
        roomcast::model::FailurePolicy::Closed,
        Default::default(),
        chrono::Utc::now(),
    )
    .await
    .expect("upload rooms-acl");
    aws.pump().await;
    aws.connect("c-ann", &token("gate", "ann"), "lobby").await;
    aws.connect("c-eve", &token("gate", "eve"), "lobby,vip").await;
    aws.pump().await;
    // Every room of the connect waits for the rules: the welcome names none, then each is
    // acknowledged or denied.
    assert_eq!(aws.recorder.received_action("c-eve", "welcome")[0]["rooms"], json!([]));
    assert!(aws.recorder.received_action("c-eve", "join_denied").iter().any(|d| d["room"] == "vip"));
    assert!(aws.recorder.received_action("c-eve", "ack").iter().any(|a| a["room"] == "lobby"));
    let pending = aws.send("c-ann", json!({"action": "join", "room": "vip"})).await;
    assert_eq!(pending["pending"], true, "{pending}");
    aws.pump().await;
    assert!(aws.recorder.received_action("c-ann", "ack").iter().any(|a| a["room"] == "vip" && a["users"] == 1));
    aws.send("c-ann", json!({"action": "sendMessage", "room": "vip", "message": "members only"})).await;
    aws.pump().await;
    assert!(aws.recorder.received_action("c-ann", "message").iter().any(|m| m["room"] == "vip"));
    let eve_vip: Vec<Value> = aws
        .recorder
        .received("c-eve")
        .into_iter()
        .filter(|f| f["room"] == "vip" && f["action"] != "join_denied")
        .collect();
    assert!(eve_vip.is_empty(), "the denied member got {eve_vip:?}");
    // A token's `rooms` claim, through the real authorizer: no plugin needed.
    let exp = chrono::Utc::now().timestamp() + 3600;
    let limited = roomcast::auth::mint(
        &roomcast::auth::Claims {
            tenant: "acme".into(),
            sub: "sue".into(),
            exp,
            nbf: None,
            scope: None,
            rooms: Some(vec!["lobby".into()]),
            extra: Default::default(),
        },
        SECRET.as_bytes(),
    );
    aws.connect("c-sue", &limited, "lobby,side").await;
    aws.pump().await;
    assert_eq!(aws.recorder.received_action("c-sue", "welcome")[0]["rooms"], json!(["lobby"]));
    assert!(aws.recorder.received_action("c-sue", "join_denied").iter().any(|d| d["room"] == "side"));
    assert_eq!(aws.send("c-sue", json!({"action": "join", "room": "side"})).await["action"], "join_denied");

    let history = aws.send("c-bob", json!({"action": "history", "room": "lobby"})).await;
    for id in &ids {
        assert!(
            history["messages"].as_array().unwrap().iter().any(|m| m["id"] == id.as_str()),
            "{id} not in {history}"
        );
    }

    // A backend publishes: through the function URL (IAM-authorized: the operator, any tenant),
    // through the HTTP API with a tenant's publish token (its tenant only), and by direct invoke.
    let http = |authorizer: Value, authorization: &str, body: Value| {
        json!({
            "version": "2.0", "routeKey": "POST /publish", "rawPath": "/publish",
            "headers": {"content-type": "application/json", "authorization": authorization},
            "requestContext": {"http": {"method": "POST", "path": "/publish"}, "authorizer": authorizer},
            "body": body.to_string(), "isBase64Encoded": false,
        })
    };
    let iam = json!({"iam": {"accessKey": "AKIAOPERATOR", "accountId": "123456789012", "userArn": "arn:aws:iam::123456789012:user/ops"}});
    let shipped = json!({"tenant": "acme", "room": "lobby", "message": "order shipped", "idempotency_key": "order-7"});
    let first = aws.invoke("PublishFunction", http(iam.clone(), "", shipped.clone())).await;
    assert_eq!(first["statusCode"], 200, "{first}");
    let first_id =
        serde_json::from_str::<Value>(first["body"].as_str().unwrap()).unwrap()["id"].as_str().unwrap().to_string();
    let again = aws.invoke("PublishFunction", http(iam, "", shipped)).await;
    assert!(again["body"].as_str().unwrap().contains(&first_id), "the same key answers the first id: {again}");
    ids.push(first_id);
    let publisher = |tenant: &str| format!("Bearer {}", roomcast_tests::publish_token(tenant, SECRET.as_bytes()));
    let theirs = json!({"tenant": "acme", "room": "lobby", "message": "from globex"});
    // Tenants' backends publish through a function of their own (its own concurrency and the
    // route's throttle): the same binary, the token's tenant only.
    let refused = aws.invoke("TenantPublishFunction", http(Value::Null, &publisher("globex"), theirs)).await;
    assert_eq!(refused["statusCode"], 403, "{refused}");
    let refused = aws
        .invoke(
            "TenantPublishFunction",
            http(Value::Null, &token("acme", "alice"), json!({"tenant": "acme", "room": "lobby", "message": "x"})),
        )
        .await;
    assert_eq!(refused["statusCode"], 403, "a connect token cannot publish: {refused}");
    let from_the_shop =
        json!({"tenant": "acme", "room": "lobby", "message": "from the shop", "idempotency_key": "shop-1"});
    let ours = aws.invoke("TenantPublishFunction", http(Value::Null, &publisher("acme"), from_the_shop.clone())).await;
    assert_eq!(ours["statusCode"], 200, "{ours}");
    let again = aws.invoke("TenantPublishFunction", http(Value::Null, &publisher("acme"), from_the_shop)).await;
    assert_eq!(again["body"], ours["body"], "a repeated key answers the first id");
    ids.push(
        serde_json::from_str::<Value>(ours["body"].as_str().unwrap()).unwrap()["id"].as_str().unwrap().to_string(),
    );
    let direct = aws.invoke("PublishFunction", json!({"tenant": "acme", "room": "lobby", "message": "direct"})).await;
    ids.push(direct["id"].as_str().expect("a direct invoke answers the id").to_string());
    aws.pump().await;
    let published: Vec<String> = aws
        .recorder
        .received_action("c-bob", "message")
        .iter()
        .filter(|m| m["user_id"] == "backend")
        .filter_map(|m| m["message"].as_str().map(str::to_string))
        .collect();
    for text in ["order shipped", "from the shop", "direct"] {
        assert!(published.iter().any(|p| p == text), "{text} did not reach bob: {published:?}");
    }
    assert!(!published.iter().any(|p| p == "from globex"));

    // Backends act on users (issue 26): the operator disconnects zed (the function URL), acme's
    // backend disconnects sue and refuses her for a minute (its publish token). Each connection
    // is told `terminated` and closed by the processor; sue's next token is refused.
    aws.connect("c-zed", &token("acme", "zed"), "lobby").await;
    aws.pump().await;
    let zed = json!({"action": "disconnect_user", "tenant": "acme", "user_id": "zed"});
    let iam = json!({"iam": {"accessKey": "AKIAOPERATOR", "accountId": "123456789012", "userArn": "arn:aws:iam::123456789012:user/ops"}});
    let out = aws.invoke("PublishFunction", http(iam, "", zed)).await;
    assert_eq!((out["statusCode"].as_u64(), out["body"].as_str()), (Some(200), Some(r#"{"disconnected":1}"#)), "{out}");
    let until = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
    let sue = json!({"action": "disconnect_user", "tenant": "acme", "user_id": "sue", "refuse_until": until});
    let users = |tenant: &str| format!("Bearer {}", roomcast_tests::users_token(tenant, SECRET.as_bytes()));
    let not_theirs = aws.invoke("TenantPublishFunction", http(Value::Null, &users("globex"), sue.clone())).await;
    assert_eq!(not_theirs["statusCode"], 403, "another tenant's token: {not_theirs}");
    let publish_only = aws.invoke("TenantPublishFunction", http(Value::Null, &publisher("acme"), sue.clone())).await;
    assert_eq!(publish_only["statusCode"], 403, "a publish token: {publish_only}");
    let out = aws.invoke("TenantPublishFunction", http(Value::Null, &users("acme"), sue)).await;
    assert_eq!(out["statusCode"], 200, "{out}");
    assert!(out["body"].as_str().unwrap().contains(r#""disconnected":1"#), "{out}");
    aws.pump().await;
    for id in ["c-zed", "c-sue"] {
        let told = aws.recorder.received_action(id, "error");
        assert!(told.iter().any(|e| e["code"] == "terminated"), "{id} was not told: {told:?}");
        assert!(aws.recorder.deleted().contains(&id.to_string()), "{id} was not closed");
    }
    // Authorizer containers see a tenant's identity at most IDENTITY_FRESH late: refused by then.
    let mut effect = Value::Null;
    for _ in 0..400 {
        effect = aws.authorize(&token("acme", "sue")).await["policyDocument"]["Statement"][0]["Effect"].clone();
        if effect == "Deny" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(effect, "Deny", "sue was never refused");
    // And put a user's connections into rooms: the operator alice into `side`, acme's backend
    // alice into `third` (join_user: memberships written as her own join writes them).
    let iam = json!({"iam": {"accessKey": "AKIAOPERATOR", "accountId": "123456789012", "userArn": "arn:aws:iam::123456789012:user/ops"}});
    let side = json!({"action": "join_user", "tenant": "acme", "user_id": "alice", "room": "side"});
    let out = aws.invoke("PublishFunction", http(iam, "", side)).await;
    assert!(out["body"].as_str().unwrap().contains(r#""joined":1"#), "{out}");
    let third = json!({"action": "join_user", "tenant": "acme", "user_id": "alice", "room": "third"});
    let out = aws.invoke("TenantPublishFunction", http(Value::Null, &users("acme"), third)).await;
    assert!(out["body"].as_str().unwrap().contains(r#""joined":1"#), "{out}");
    aws.pump().await;
    let acks = aws.recorder.received_action("c-alice", "ack");
    for room in ["side", "third"] {
        assert!(acks.iter().any(|a| a["room"] == room && a["request"] == "join"), "alice not told of {room}: {acks:?}");
    }
    // And send to a user: acme's backend reaches alice's connection, whatever its rooms (the
    // publish function queries her connections on the index, the processor posts the record).
    let note =
        json!({"action": "send_to_user", "tenant": "acme", "user_id": "alice", "message": "paid", "from": "billing"});
    let out = aws.invoke("TenantPublishFunction", http(Value::Null, &users("acme"), note)).await;
    assert!(out["body"].as_str().unwrap().contains(r#""connections":1"#), "{out}");
    aws.pump().await;
    let notes = aws.recorder.received_action("c-alice", "user_message");
    assert!(notes.iter().any(|n| n["message"] == "paid" && n["from"] == "billing"), "alice got {notes:?}");

    aws.disconnect("c-bob").await;
    aws.pump().await;
    let left = aws.recorder.received_action("c-alice", "presence");
    assert!(left.iter().any(|p| p["user_id"] == "bob" && p["event"] == "left"), "{left:?}");
    // Presence state, written by the processor under its policy (a transaction of a PutItem and a
    // DeleteItem at each transition), read by the message function's `who` under its own.
    assert!(left.iter().all(|p| p["id"].as_str().is_some_and(|id| !id.is_empty())), "{left:?}");
    // A token refresh: checked by the message function with the deployment's secret (read
    // from SSM under its policy), the new claims written in place (UpdateItem).
    let refreshed = aws.send("c-alice", json!({"action": "refresh", "token": token("acme", "alice")})).await;
    assert_eq!(refreshed["action"], "refreshed", "{refreshed}");
    let other = aws.send("c-alice", json!({"action": "refresh", "token": token("acme", "bob")})).await;
    assert_eq!(other["code"], "unauthorized", "{other}");
    let who = aws.send("c-alice", json!({"action": "who", "room": "lobby"})).await;
    assert_eq!(who["action"], "who", "{who}");
    let users: Vec<&str> = who["users"].as_array().unwrap().iter().map(|u| u["user_id"].as_str().unwrap()).collect();
    assert!(users.contains(&"alice") && !users.contains(&"bob"), "{who}");
    assert_eq!(who["total"].as_u64(), Some(users.len() as u64), "{who}");

    assert_eq!(aws.send("c-alice", json!({"action": "join", "room": "side"})).await["action"], "ack");
    assert_eq!(aws.send("c-alice", json!({"action": "leave", "room": "side"})).await["action"], "ack");
    aws.pump().await;

    // Alice is present in two rooms whose memberships go without their REMOVE reaching the
    // processor (lost, as far as presence knows): each sweep below takes one out.
    for room in ["r1", "r2"] {
        assert_eq!(aws.send("c-alice", json!({"action": "join", "room": room})).await["action"], "ack");
    }
    aws.pump().await;

    // Two connections went silent two hours ago, and API Gateway says they are gone: the sweeper
    // removes one on its schedule, the admin operation the other.
    let two_hours_ago = roomcast::model::ManualClock::at(chrono::Utc::now() - chrono::Duration::hours(2));
    let old = roomcast::handlers::HandlerDeps {
        joins: Default::default(),
        limits: Default::default(),
        store: std::sync::Arc::new(aws.admin.clone()),
        clock: two_hours_ago,
        connection_ttl_seconds: 3 * 3600,
        history_ttl_seconds: 3600,
        idempotency_window_seconds: roomcast::handlers::DEFAULT_IDEMPOTENCY_WINDOW_SECONDS,
        verifier: None,
    };
    let stale = |id: &'static str, user: &'static str| {
        let (old, recorder) = (&old, &aws.recorder);
        async move {
            let connected = roomcast::handlers::connect(&connect_request(id, "acme", user, "attic"), old).await;
            assert_eq!(connected.status_code, 200);
            recorder.mark_gone(id);
        }
    };
    aws.admin.leave("c-alice", "acme", "r1").await.unwrap();
    stale("c-stale-1", "carol").await;
    let report = aws.invoke("SweeperFunction", json!({"source": "aws.events", "detail-type": "Scheduled Event"})).await;
    assert!(report["presenceRepaired"].as_u64().is_some_and(|n| n >= 1), "{report}");
    aws.admin.leave("c-alice", "acme", "r2").await.unwrap();
    stale("c-stale-2", "dave").await;
    for (event, key) in [
        (json!({"action": "get_user_connections", "tenant": "acme", "userId": "alice"}), "connections"),
        (json!({"action": "get_all_connections", "limit": 10}), "connections"),
        (json!({"action": "update_connection_status", "connectionId": "c-alice", "status": "AWAY"}), "connection"),
        (json!({"action": "cleanup_stale_connections", "idleSeconds": 3600}), "cleanedCount"),
    ] {
        let answer = aws.invoke("AdminFunction", event.clone()).await;
        assert_eq!(answer["statusCode"], 200, "{event} answered {answer}");
        assert!(answer["body"].get(key).is_some(), "{event} answered {answer}");
    }
    aws.pump().await;

    assert!(aws.admin.get_connection("c-stale-1", chrono::Utc::now()).await.unwrap().is_none(), "not swept");
    assert!(aws.admin.get_connection("c-stale-2", chrono::Utc::now()).await.unwrap().is_none(), "not cleaned");

    // The processor printed each batch's counts as CloudWatch embedded metrics, on the
    // dimension the template's alarms watch.
    let logs = aws.lambdas["ProcessorFunction"].logs();
    let emf: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l.get("_aws").is_some())
        .collect();
    assert!(!emf.is_empty(), "no embedded metrics in the processor's output:\n{logs}");
    for line in &emf {
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Namespace"], "Roomcast", "{line}");
        assert_eq!(line["FunctionName"], "ProcessorFunction", "{line}");
    }
    // Per-tenant plugin lines (`Tenant` dimension) come besides the batch's counts.
    let (tenants, batches): (Vec<&Value>, Vec<&Value>) = emf.iter().partition(|l| l.get("Tenant").is_some());
    for line in &tenants {
        assert_eq!(line["_aws"]["CloudWatchMetrics"][0]["Dimensions"], serde_json::json!([["FunctionName", "Tenant"]]));
        assert!(line["PluginCalls"].is_u64() && line["PluginVersion"].is_string(), "{line}");
    }
    let delivered: u64 = batches.iter().map(|l| l["delivered"].as_u64().unwrap()).sum();
    assert!(delivered > 0, "the metrics count the deliveries: {emf:?}");

    assert!(!tenants.is_empty(), "no per-tenant plugin metrics: {emf:?}");
    // The plugins' log lines, as JSON lines tagged with tenant, version, hook and sequence number.
    let plugin_log: Vec<Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["target"] == "roomcast::plugin_log")
        .collect();
    let rejected_line = plugin_log
        .iter()
        .find(|l| l["fields"]["message"].as_str().is_some_and(|m| m.contains("rejected")))
        .unwrap_or_else(|| panic!("no plugin log line in the processor's output:\n{logs}"));
    let fields = &rejected_line["fields"];
    assert_eq!(
        (fields["tenant"].as_str(), fields["hook"].as_str()),
        (Some("acme"), Some("on-message")),
        "{rejected_line}"
    );
    assert!(fields["version"].as_str().is_some_and(|v| v.len() == 16) && fields["seq"].is_string(), "{rejected_line}");

    // A big room: the processor queues its frames (sqs:SendMessage under its policy), the
    // fanout function delivers them under its own, and deletes a member API Gateway says is gone.
    for i in 0..5 {
        aws.connect(&format!("c-crowd-{i}"), &token("acme", &format!("crowd{i}")), "crowd").await;
    }
    aws.pump().await;
    aws.pump_fanout().await;
    aws.recorder.script("c-crowd-4", &[410]);
    let said =
        aws.send("c-crowd-0", json!({"action": "sendMessage", "room": "crowd", "message": "to the crowd"})).await;
    assert_eq!(said["action"], "ack", "{said}");
    aws.pump().await;
    assert!(aws.pump_fanout().await > 0, "the message to the crowd was not handed to the fan-out stage");
    for i in 0..4 {
        let got = aws.recorder.received_action(&format!("c-crowd-{i}"), "message");
        assert!(got.iter().any(|m| m["message"] == "to the crowd"), "c-crowd-{i} got {got:?}");
    }
    aws.pump().await;
    aws.pump_fanout().await;
    let gone = aws.admin.get_connection("c-crowd-4", chrono::Utc::now()).await.unwrap();
    assert!(gone.is_none(), "the fanout function did not delete the member API Gateway said was gone");

    // The webhook function delivers acme's events (after putting off the refused first try).
    for _ in 0..200 {
        aws.pump_webhooks().await;
        let events = receiver.events("ok", "acme-hook-secret");
        if events.iter().any(|e| e["type"] == "connection.opened" && e["user_id"] == "alice") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.events("ok", "acme-hook-secret").iter().any(|e| e["type"] == "room.occupied"));

    // Least privilege: every action template.yaml grants was needed by this session.
    let unused = aws.gate.unused_grants();
    assert!(unused.is_empty(), "template.yaml grants actions no function used: {unused:?}");

    // Nothing failed, and redelivery showed clients each message twice under the same id.
    assert!(aws.failures.is_empty(), "the processor reported failures: {:?}", aws.failures);
    let messages = aws.recorder.received_action("c-bob", "message");
    for id in &ids {
        let copies: Vec<&Value> = messages.iter().filter(|m| m["id"] == id.as_str()).collect();
        assert_eq!(copies.len(), 2, "message {id} reached bob {} times: {messages:?}", copies.len());
        assert_eq!(copies[0], copies[1], "a redelivered message differs from the first delivery");
    }
    let distinct: std::collections::BTreeSet<&str> = messages.iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(distinct.len(), ids.len(), "bob saw other messages than the ones sent: {messages:?}");
}

/// The proof that the template is what the test grants: the same session with one action taken
/// out of one function's policy fails, naming the function and the action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_without_an_action_its_function_needs_fails_naming_both() {
    let text = std::fs::read_to_string(Template::path()).unwrap();
    let processor = text.find("  ProcessorFunction:").expect("the processor in template.yaml");
    let at =
        text[processor..].find("- dynamodb:GetItem\n").expect("the processor is granted dynamodb:GetItem") + processor;
    let line = text[..at].rfind('\n').unwrap() + 1;
    let without = format!("{}{}", &text[..line], &text[at + "- dynamodb:GetItem\n".len()..]);
    let mut aws = Aws::start(Template::parse(&without), false, &[]).await;
    aws.connect("c-alice", &token("acme", "alice"), "lobby").await;
    let poisoned = std::panic::AssertUnwindSafe(aws.pump());
    let outcome = futures::FutureExt::catch_unwind(poisoned).await;
    let message = match outcome {
        Ok(_) => panic!("the session passed without dynamodb:GetItem in the processor's policy"),
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    };
    assert!(
        message.contains("ProcessorFunction is not allowed dynamodb:GetItem on arn:aws:dynamodb:"),
        "the failure does not name the function and the action: {message}"
    );
}

/// One client answers 429 forever, under a 6-second deadline: every invocation answers before
/// its deadline, the other members get every message (after the retries Lambda makes from the
/// reported record), and the slow client is counted and closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_never_stalls_its_room_or_passes_the_deadline() {
    let template = Template::load();
    let mut aws = Aws::start(template, false, &[("ROOMCAST_SLOW_CONSUMER_MS", "1500")]).await;
    // The processor's Timeout, as the template would set it for this test.
    let six = Duration::from_secs(6);
    aws.connect("c-alice", &token("acme", "alice"), "lobby").await;
    aws.connect("c-bob", &token("acme", "bob"), "lobby").await;
    aws.connect("c-slow", &token("acme", "slow"), "lobby").await;
    aws.pump().await;
    aws.recorder.script("c-slow", &[429; 10_000]);
    let mut ids = Vec::new();
    for n in 0..3 {
        let ack =
            aws.send("c-alice", json!({"action": "sendMessage", "room": "lobby", "message": format!("m{n}")})).await;
        ids.push(ack["id"].as_str().unwrap().to_string());
    }
    // Lambda's event source, with the processor's deadline at 6 s.
    aws.pump_within(six).await;
    aws.assert_allowed();
    let to_bob: Vec<Value> = aws.recorder.received_action("c-bob", "message");
    for id in &ids {
        assert!(to_bob.iter().any(|m| m["id"] == id.as_str()), "bob never got {id}: {to_bob:?}");
    }
    assert!(aws.recorder.deleted().contains(&"c-slow".to_string()), "the slow consumer was not closed");
    // Before judging it, the processor asked GetConnection whether the 429s were the account's,
    // under its policy (`assert_allowed` above fails a call the template does not allow).
    assert!(aws.recorder.probed().contains(&"c-slow".to_string()), "GetConnection was not asked");
    let logs = aws.lambdas["ProcessorFunction"].logs();
    assert!(logs.contains("\"slow_consumers\":1"), "slow_consumers not counted:\n{logs}");
}

/// The deadline binds: one member's calls fail with 500 for longer than the invocation has. The
/// processor answers before its 6-second deadline with the record it could not finish, Lambda
/// retries from there, and in the end every member has every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_longer_than_the_deadline_answers_in_time_and_is_finished_by_lambdas_retries() {
    let mut aws = Aws::start(Template::load(), false, &[]).await;
    let six = Duration::from_secs(6);
    for (id, user) in [("c-alice", "alice"), ("c-bob", "bob"), ("c-flaky", "flaky")] {
        aws.connect(id, &token("acme", user), "lobby").await;
    }
    aws.pump().await;
    // API Gateway answers 500 to one connection for about ten seconds of backoff.
    aws.recorder.script("c-flaky", &[500; 14]);
    let mut ids = Vec::new();
    for n in 0..3 {
        let ack =
            aws.send("c-alice", json!({"action": "sendMessage", "room": "lobby", "message": format!("m{n}")})).await;
        ids.push(ack["id"].as_str().unwrap().to_string());
    }
    let reported = aws.pump_within(six).await;
    aws.assert_allowed();
    assert!(reported >= 1, "the deadline never bound: nothing was reported");
    for member in ["c-bob", "c-flaky"] {
        let got = aws.recorder.received_action(member, "message");
        for id in &ids {
            assert!(got.iter().any(|m| m["id"] == id.as_str()), "{member} never got {id}: {got:?}");
        }
    }
    let logs = aws.lambdas["ProcessorFunction"].logs();
    assert!(logs.contains("\"out_of_time\":1"), "out_of_time not counted:\n{logs}");
}

/// Webhooks as deployed (issue 26): the processor queues each record's events on the FIFO webhook
/// queue under its policy, the webhook function posts them to a real receiver on loopback under
/// its own, with every stream batch delivered twice. The receiver refuses acme's first two
/// deliveries: the function reports them and puts them off, and they arrive later, in order,
/// signed, each event once by id. Globex's endpoint refuses everything: its events go to the
/// dead-letter queue after the queue's receives, holding up none of acme's, and once its endpoint
/// answers an operator re-drives them (`roomcast webhooks redrive`) and they arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_queued_by_the_processor_and_delivered_by_their_function_under_the_template_policies() {
    use std::sync::atomic::Ordering::SeqCst;
    let (receiver, url) = roomcast_tests::WebhookReceiver::start().await;
    receiver.refuse_first.store(2, SeqCst);
    receiver.refusing.store(true, SeqCst);
    // The receiver is on loopback, which the deployed function refuses unless allowed.
    let env = [("ROOMCAST_WEBHOOK_RETRY_SECONDS", "1"), ("ROOMCAST_WEBHOOK_ALLOW_PRIVATE", "true")];
    let mut aws = Aws::start(Template::load(), true, &env).await;
    let hook = |tenant: &str, path: &str, secret: &str| roomcast::model::TenantSettings {
        webhook: Some(roomcast::model::WebhookSettings {
            url: format!("{url}/{path}"),
            secret: secret.into(),
            events: Vec::new(),
        }),
        ..roomcast::model::TenantSettings::new(tenant)
    };
    aws.admin.put_tenant_settings(&hook("acme", "ok", "acme-webhook-secret")).await.unwrap();
    aws.admin.put_tenant_settings(&hook("globex", "refuse", "globex-webhook-secret")).await.unwrap();

    aws.connect("c-eve", &token("globex", "eve"), "lobby").await;
    aws.connect("c-ann", &token("acme", "ann"), "lobby").await;
    aws.pump().await;
    aws.connect("c-bob", &token("acme", "bob"), "lobby").await;
    aws.pump().await;
    aws.disconnect("c-bob").await;
    aws.pump().await;
    assert!(aws.failures.is_empty(), "the processor reported failures: {:?}", aws.failures);

    // Lambda's event source for the webhook function until acme's events are all in.
    let wanted = ["connection.opened", "room.occupied", "member.joined", "member.left", "connection.closed"];
    let mut reported = Vec::new();
    let mut acme = Vec::new();
    for _ in 0..200 {
        reported.extend(aws.pump_webhooks().await);
        acme = receiver.events("ok", "acme-webhook-secret");
        if acme.iter().any(|e| e["type"] == "connection.closed" && e["user_id"] == "bob") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(receiver.refused.load(SeqCst) >= 2, "the receiver refused nothing");
    assert!(!reported.is_empty(), "the webhook function reported no refused batch");
    // Each event once: every stream batch was processed twice, and the queue kept one copy of
    // each record's events (its deduplication id is the record's id).
    let mut seen = std::collections::BTreeSet::new();
    let once: Vec<&Value> = acme.iter().filter(|e| seen.insert(e["id"].as_str().unwrap().to_string())).collect();
    assert_eq!(once.len(), acme.len(), "an event arrived twice: {acme:?}");
    let story: Vec<(String, String)> = once
        .iter()
        .map(|e| (e["type"].as_str().unwrap().to_string(), e["user_id"].as_str().unwrap_or("").to_string()))
        .collect();
    // The stream orders records per item only: a connection's record and its membership's
    // (written together) may be processed in either order, so their events may come in either.
    // Each step's events come after the step before's, and a room's start just before its first
    // member.
    let steps: [&[(&str, &str)]; 3] = [
        &[("connection.opened", "ann"), ("room.occupied", ""), ("member.joined", "ann")],
        &[("connection.opened", "bob"), ("member.joined", "bob")],
        &[("member.left", "bob"), ("connection.closed", "bob")],
    ];
    assert_eq!(story.len(), 7, "acme's events: {acme:?}");
    let mut at = 0;
    for step in steps {
        let mut got: Vec<(String, String)> = story[at..at + step.len()].to_vec();
        let mut want: Vec<(String, String)> = step.iter().map(|(k, u)| (k.to_string(), u.to_string())).collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "acme's events, step by step: {story:?}");
        at += step.len();
    }
    let occupied = story.iter().position(|(k, _)| k == "room.occupied").unwrap();
    assert_eq!(story[occupied + 1], ("member.joined".to_string(), "ann".to_string()), "{story:?}");
    assert!(once.iter().all(|e| wanted.contains(&e["type"].as_str().unwrap())));
    assert!(
        once.iter()
            .filter(|e| e["type"] != "connection.opened" && e["type"] != "connection.closed")
            .all(|e| e["room"] == "lobby")
    );

    // Globex's endpoint refused every delivery: after the queue's receives its events are
    // dead letters, and acme's arrived all the same.
    let dead = |aws: &Aws| {
        let sqs = aws.webhook_sqs.clone();
        let url = aws.webhook_dead_letters.clone();
        async move {
            sqs.get_queue_attributes()
                .queue_url(url)
                .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                .send()
                .await
                .unwrap()
                .attributes
                .and_then(|a| a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages).cloned())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0)
        }
    };
    let mut buried = 0;
    for _ in 0..300 {
        aws.pump_webhooks().await;
        buried = dead(&aws).await;
        if buried > 0 && aws.pump_webhooks().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(buried > 0, "globex's refused events never reached the dead-letter queue");
    assert!(receiver.events("refuse", "globex-webhook-secret").is_empty());

    // Its endpoint answers again; the operator re-drives (as `roomcast webhooks redrive` does,
    // with the operator's credentials) and the function delivers them.
    receiver.refusing.store(false, SeqCst);
    let operator = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::config::Builder::from(&roomcast_tests::sdk_config().await).endpoint_url(moto_endpoint()).build(),
    );
    let moved = roomcast::webhook::sqs::redrive(&operator, &aws.webhook_dead_letters, &aws.webhook_queue)
        .await
        .expect("re-drive the dead letters");
    assert_eq!(moved, buried);
    assert_eq!(dead(&aws).await, 0);
    let mut globex = Vec::new();
    for _ in 0..200 {
        aws.pump_webhooks().await;
        globex = receiver.events("refuse", "globex-webhook-secret");
        if globex.iter().any(|e| e["type"] == "member.joined" && e["user_id"] == "eve") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut seen = std::collections::BTreeSet::new();
    let kinds: Vec<&str> =
        globex.iter().filter(|e| seen.insert(e["id"].to_string())).map(|e| e["type"].as_str().unwrap()).collect();
    let mut kinds = kinds;
    kinds.sort();
    assert_eq!(kinds, vec!["connection.opened", "member.joined", "room.occupied"], "{globex:?}");
    let logs = aws.lambdas["WebhookFunction"].logs();
    assert!(logs.contains("webhook refused: retried"), "the refusals were not logged:\n{logs}");

    // Initech's endpoint never answers, and the invocation has 3 s: initech's batch is reported
    // before the deadline, and acme's events of the same invocation are delivered all the same.
    aws.admin.put_tenant_settings(&hook("initech", "hang", "initech-webhook-secret")).await.unwrap();
    aws.connect("c-ian", &token("initech", "ian"), "lobby").await;
    aws.connect("c-cy", &token("acme", "cy"), "lobby").await;
    aws.pump().await;
    let reported = aws.pump_webhooks_within(Duration::from_secs(3)).await;
    assert_eq!(reported.len(), 1, "initech's one message is reported: {reported:?}");
    assert!(receiver.hanging.load(SeqCst) >= 1, "initech's endpoint was never reached");
    let acme = receiver.events("ok", "acme-webhook-secret");
    assert!(acme.iter().any(|e| e["type"] == "connection.opened" && e["user_id"] == "cy"), "{acme:?}");
    let logs = aws.lambdas["WebhookFunction"].logs();
    assert!(logs.contains("still delivering at the deadline"), "{logs}");
    receiver.release();
}
