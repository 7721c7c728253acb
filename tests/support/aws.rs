//! AWS's own conditions for the end-to-end tests, made here on loopback:
//!
//! * [`Template`] — `template.yaml`, read at test time: each function's binary, environment and
//!   IAM policy, with `!Ref`, `!GetAtt` and `!Sub` resolved for a local deployment. Never a copy:
//!   deleting an action from the template changes what the tests grant.
//! * [`Gate`] — IAM in front of moto. Every AWS call a Lambda binary makes goes through it, signed
//!   with that function's own access key. It works out the IAM actions and resources the call
//!   needs, as IAM does (each item of a `TransactWriteItems` needs its own action; a query on an
//!   index needs the index's ARN), checks them against that function's policy from the template,
//!   and answers `AccessDeniedException` with AWS's wording when the policy does not allow them.
//!   moto's own IAM matches DynamoDB calls against resource `*` and checks only a transaction's
//!   name, so the gate makes the decision and moto serves what it allows.
//! * [`Lambda`] — a function's real binary (`target/debug/<Binary>`) started as Lambda starts
//!   it: behind a local Lambda Runtime API (`/2018-06-01/runtime/invocation/next`, `…/response`,
//!   `…/error`, `…/init/error`), with the function's environment from the template, its
//!   credentials, and each invocation's deadline from the function's `Timeout`. An invocation
//!   that passes its deadline ends the process, as Lambda ends the sandbox; between invocations
//!   the process is stopped (`SIGSTOP`), as Lambda freezes it, so work left running after an
//!   answer does not go on unseen.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use serde_norway::Value as Yaml;
use tokio::sync::{Notify, oneshot};

pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

// ---------------------------------------------------------------------------------------------
// the template

/// What a local deployment's resources are called: what `!Ref`, `!GetAtt` and `!Sub` resolve to.
#[derive(Clone, Debug)]
pub struct Deployment {
    pub table: String,
    pub stream_arn: String,
    pub api_id: String,
    pub stage: String,
    /// Parameters given a value other than the template's default.
    pub parameters: BTreeMap<String, String>,
    /// The fan-out stage's FIFO queue (`FanoutQueue`), its URL on moto.
    pub fanout_queue: String,
    /// The tenants' webhook events' FIFO queue (`WebhookQueue`) and its dead-letter queue
    /// (`WebhookDeadLetterQueue`), their URLs on moto.
    pub webhook_queue: String,
    pub webhook_dead_letters: String,
}

impl Deployment {
    pub fn table_arn(&self) -> String {
        format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{}", self.table)
    }

    pub fn fanout_queue_arn(&self) -> String {
        queue_arn(&self.fanout_queue)
    }
}

/// An SQS queue's ARN from its URL (`…/{account}/{name}`).
pub fn queue_arn(url: &str) -> String {
    let name = url.rsplit('/').next().unwrap_or_default();
    format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}")
}

/// One `AWS::Serverless::Function` of the template.
#[derive(Clone, Debug)]
pub struct Function {
    pub logical_id: String,
    /// `Metadata.BuildProperties.Binary`: the cargo binary it runs.
    pub binary: String,
    /// Globals' environment, then the function's own, resolved.
    pub environment: BTreeMap<String, String>,
    /// Seconds: Globals' `Timeout` unless the function sets its own.
    pub timeout: u64,
    pub memory: u64,
    pub policy: Vec<Statement>,
    /// Its DynamoDB stream event's `FilterCriteria`, as the `pk` prefixes its patterns admit,
    /// each with the event names it is held to, if any (empty: every record). Lambda drops other
    /// records without invoking it; so does the harness.
    pub stream_filter: Vec<(String, Option<Vec<String>>)>,
}

/// One IAM policy statement, resolved.
#[derive(Clone, Debug)]
pub struct Statement {
    pub allow: bool,
    pub actions: Vec<String>,
    pub resources: Vec<String>,
    /// Where it comes from: `template.yaml`, or what SAM adds for an event source.
    pub origin: &'static str,
}

impl Function {
    /// Whether its stream event's filter lets `record` through to it.
    pub fn admits(&self, record: &aws_lambda_events::dynamodb::EventRecord) -> bool {
        let pk = match record.change.keys.get("pk") {
            Some(serde_dynamo::AttributeValue::S(pk)) => pk.as_str(),
            _ => "",
        };
        self.stream_filter.is_empty()
            || self.stream_filter.iter().any(|(prefix, events)| {
                pk.starts_with(prefix.as_str())
                    && events.as_ref().is_none_or(|names| names.contains(&record.event_name))
            })
    }

    /// Whether this function's policy allows `action` on `resource` (an explicit deny wins).
    pub fn allows(&self, action: &str, resource: &str) -> bool {
        let matching = |s: &&Statement| {
            s.actions.iter().any(|a| glob(&a.to_ascii_lowercase(), &action.to_ascii_lowercase()))
                && s.resources.iter().any(|r| glob(r, resource))
        };
        !self.policy.iter().filter(|s| !s.allow).any(|s| matching(&s))
            && self.policy.iter().filter(|s| s.allow).any(|s| matching(&s))
    }

    /// The access key id this function's calls are signed with.
    pub fn access_key(&self) -> String {
        format!("AKIA{}", self.logical_id.to_ascii_uppercase())
    }
}

/// IAM's wildcard match: `*` any run of characters, `?` any one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `template.yaml`, parsed.
pub struct Template {
    doc: Yaml,
}

impl Template {
    pub fn path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../template.yaml")
    }

    pub fn load() -> Template {
        let text = std::fs::read_to_string(Self::path()).expect("read template.yaml");
        Self::parse(&text)
    }

    pub fn parse(text: &str) -> Template {
        Template { doc: serde_norway::from_str(text).expect("template.yaml is YAML") }
    }

    fn resources(&self) -> &serde_norway::Mapping {
        self.doc["Resources"].as_mapping().expect("template.yaml has Resources")
    }

    /// Every function, in template order.
    pub fn functions(&self, at: &Deployment) -> Vec<Function> {
        let globals = &self.doc["Globals"]["Function"];
        let mut functions = Vec::new();
        for (id, resource) in self.resources() {
            if resource["Type"].as_str() != Some("AWS::Serverless::Function") {
                continue;
            }
            let id = id.as_str().expect("a logical id").to_string();
            let props = &resource["Properties"];
            let binary = resource["Metadata"]["BuildProperties"]["Binary"]
                .as_str()
                .unwrap_or_else(|| panic!("{id}: no Metadata.BuildProperties.Binary"))
                .to_string();
            let mut environment = BTreeMap::new();
            for vars in [&globals["Environment"]["Variables"], &props["Environment"]["Variables"]] {
                if let Some(vars) = vars.as_mapping() {
                    for (name, value) in vars {
                        environment.insert(name.as_str().unwrap().to_string(), self.resolve(value, at));
                    }
                }
            }
            let number = |key: &str| {
                props[key].as_u64().or_else(|| globals[key].as_u64()).unwrap_or_else(|| panic!("{id}: no {key}"))
            };
            let mut policy = Vec::new();
            for entry in props["Policies"].as_sequence().map(Vec::as_slice).unwrap_or_default() {
                let statements = entry["Statement"].as_sequence().unwrap_or_else(|| {
                    panic!(
                        "{id}: a policy the harness cannot read ({entry:?}); only inline Statement lists are supported"
                    )
                });
                for s in statements {
                    let list = |v: &Yaml| -> Vec<String> {
                        match v {
                            Yaml::Sequence(items) => items.iter().map(|i| self.resolve(i, at)).collect(),
                            other => vec![self.resolve(other, at)],
                        }
                    };
                    policy.push(Statement {
                        allow: s["Effect"].as_str() == Some("Allow"),
                        actions: list(&s["Action"]),
                        resources: list(&s["Resource"]),
                        origin: "template.yaml",
                    });
                }
            }
            policy.extend(self.sam_added(props, at));
            let (timeout, memory) = (number("Timeout"), number("MemorySize"));
            let stream_filter = Self::stream_filter(&id, props);
            functions.push(Function { logical_id: id, binary, environment, timeout, memory, policy, stream_filter });
        }
        functions
    }

    /// The `pk` prefixes a DynamoDB event's `FilterCriteria` admits: patterns of the form
    /// `{"dynamodb": {"Keys": {"pk": {"S": [{"prefix": …}, …]}}}}`, optionally with
    /// `"eventName": [...]`, the one form the harness reads.
    fn stream_filter(id: &str, props: &Yaml) -> Vec<(String, Option<Vec<String>>)> {
        let mut prefixes = Vec::new();
        for event in props["Events"].as_mapping().into_iter().flat_map(|m| m.values()) {
            if event["Type"].as_str() != Some("DynamoDB") {
                continue;
            }
            for filter in event["Properties"]["FilterCriteria"]["Filters"].as_sequence().into_iter().flatten() {
                let text = filter["Pattern"].as_str().unwrap_or_else(|| panic!("{id}: a filter without a Pattern"));
                let pattern: serde_json::Value = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("{id}: a filter Pattern that is not JSON: {e}"));
                let values = pattern["dynamodb"]["Keys"]["pk"]["S"].as_array().unwrap_or_else(|| {
                    panic!("{id}: a filter the harness cannot read ({text}); only pk prefixes are supported")
                });
                let events = pattern.get("eventName").map(|names| {
                    let names = names.as_array().unwrap_or_else(|| panic!("{id}: eventName is not a list: {text}"));
                    names.iter().map(|n| n.as_str().expect("an event name").to_string()).collect::<Vec<_>>()
                });
                for key in pattern.as_object().into_iter().flat_map(|o| o.keys()) {
                    assert!(
                        key == "dynamodb" || key == "eventName",
                        "{id}: a filter field the harness cannot read: {key}"
                    );
                }
                for value in values {
                    let prefix = value["prefix"].as_str().unwrap_or_else(|| panic!("{id}: not a prefix: {value}"));
                    prefixes.push((prefix.to_string(), events.clone()));
                }
            }
        }
        prefixes
    }

    /// What SAM adds to a function's generated role for its event sources: for a DynamoDB
    /// stream, the managed policy `AWSLambdaDynamoDBExecutionRole` (its stream actions, on `*`);
    /// for an `OnFailure` destination of `Type: SQS`, `sqs:SendMessage` on that queue; for an SQS
    /// queue, `AWSLambdaSQSQueueExecutionRole` (receive, delete, attributes, on `*`).
    fn sam_added(&self, props: &Yaml, at: &Deployment) -> Vec<Statement> {
        let mut added = Vec::new();
        for (_, event) in props["Events"].as_mapping().into_iter().flatten() {
            if event["Type"].as_str() == Some("SQS") {
                added.push(Statement {
                    allow: true,
                    actions: ["ReceiveMessage", "DeleteMessage", "GetQueueAttributes"]
                        .map(|a| format!("sqs:{a}"))
                        .to_vec(),
                    resources: vec!["*".into()],
                    origin: "SAM (AWSLambdaSQSQueueExecutionRole)",
                });
                continue;
            }
            if event["Type"].as_str() != Some("DynamoDB") {
                continue;
            }
            added.push(Statement {
                allow: true,
                actions: ["DescribeStream", "GetRecords", "GetShardIterator", "ListStreams"]
                    .map(|a| format!("dynamodb:{a}"))
                    .to_vec(),
                resources: vec!["*".into()],
                origin: "SAM (AWSLambdaDynamoDBExecutionRole)",
            });
            let on_failure = &event["Properties"]["DestinationConfig"]["OnFailure"];
            if on_failure["Type"].as_str() == Some("SQS") {
                added.push(Statement {
                    allow: true,
                    actions: vec!["sqs:SendMessage".into()],
                    resources: vec![self.resolve(&on_failure["Destination"], at)],
                    origin: "SAM (OnFailure destination)",
                });
            }
        }
        added
    }

    pub fn function(&self, logical_id: &str, at: &Deployment) -> Function {
        self.functions(at)
            .into_iter()
            .find(|f| f.logical_id == logical_id)
            .unwrap_or_else(|| panic!("template.yaml has no function {logical_id}"))
    }

    fn reference(&self, name: &str, at: &Deployment) -> String {
        match name {
            "AWS::Partition" => "aws".into(),
            "AWS::Region" => REGION.into(),
            "AWS::AccountId" => ACCOUNT.into(),
            "AWS::StackName" => "roomcast-local".into(),
            "AWS::StackId" => format!("arn:aws:cloudformation:{REGION}:{ACCOUNT}:stack/roomcast-local/test-stack-id"),
            "AWS::URLSuffix" => "amazonaws.com".into(),
            "Table" => at.table.clone(),
            "Table.Arn" => at.table_arn(),
            "Table.StreamArn" => at.stream_arn.clone(),
            "WebSocketApi" => at.api_id.clone(),
            "StageName" => at.stage.clone(),
            "StreamDeadLetterQueue" => format!("http://localhost/{ACCOUNT}/roomcast-dlq"),
            "StreamDeadLetterQueue.Arn" => format!("arn:aws:sqs:{REGION}:{ACCOUNT}:roomcast-dlq"),
            "FanoutQueue" => at.fanout_queue.clone(),
            "FanoutQueue.Arn" => at.fanout_queue_arn(),
            "WebhookQueue" => at.webhook_queue.clone(),
            "WebhookQueue.Arn" => queue_arn(&at.webhook_queue),
            "WebhookDeadLetterQueue" => at.webhook_dead_letters.clone(),
            "WebhookDeadLetterQueue.Arn" => queue_arn(&at.webhook_dead_letters),
            other => {
                if let Some(value) = at.parameters.get(other) {
                    return value.clone();
                }
                let default = &self.doc["Parameters"][other]["Default"];
                match default {
                    Yaml::String(s) => s.clone(),
                    Yaml::Number(n) => n.to_string(),
                    _ => panic!("template.yaml refers to {other}, which the test harness cannot resolve"),
                }
            }
        }
    }

    fn resolve(&self, value: &Yaml, at: &Deployment) -> String {
        match value {
            Yaml::String(s) => s.clone(),
            Yaml::Number(n) => n.to_string(),
            Yaml::Bool(b) => b.to_string(),
            Yaml::Tagged(tagged) => {
                let inner = &tagged.value;
                match tagged.tag.to_string().as_str() {
                    "!Ref" => self.reference(inner.as_str().expect("!Ref takes a name"), at),
                    "!GetAtt" => self.reference(inner.as_str().expect("!GetAtt takes Resource.Attribute"), at),
                    "!Sub" => {
                        let text = match inner {
                            Yaml::String(s) => s.clone(),
                            Yaml::Sequence(parts) => parts[0].as_str().expect("!Sub's text").to_string(),
                            other => panic!("!Sub of {other:?}"),
                        };
                        self.substitute(&text, at)
                    }
                    other => panic!("template.yaml uses {other}, which the test harness cannot resolve"),
                }
            }
            Yaml::Mapping(m) if m.len() == 1 => {
                let (key, inner) = m.iter().next().unwrap();
                match key.as_str() {
                    Some("Ref") => self.reference(inner.as_str().expect("Ref takes a name"), at),
                    Some("Fn::GetAtt") => {
                        let parts: Vec<&str> = inner.as_sequence().unwrap().iter().filter_map(|p| p.as_str()).collect();
                        self.reference(&parts.join("."), at)
                    }
                    Some("Fn::Sub") => self.substitute(inner.as_str().expect("Fn::Sub's text"), at),
                    _ => panic!("template.yaml value {value:?} cannot be resolved by the test harness"),
                }
            }
            other => panic!("template.yaml value {other:?} cannot be resolved by the test harness"),
        }
    }

    fn substitute(&self, text: &str, at: &Deployment) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find('}').expect("a closed ${…}") + start;
            out.push_str(&self.reference(&rest[start + 2..end], at));
            rest = &rest[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

// ---------------------------------------------------------------------------------------------
// the IAM gate

/// One AWS call as the gate judged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Judged {
    pub function: String,
    pub action: String,
    pub resource: String,
    pub allowed: bool,
}

struct GateState {
    upstream: String,
    stream_arn: String,
    /// Access key id → the function it belongs to.
    principals: Mutex<HashMap<String, Function>>,
    judged: Mutex<Vec<Judged>>,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<bytes::Bytes>,
    >,
}

/// IAM for the functions, in front of moto (see the module docs).
#[derive(Clone)]
pub struct Gate {
    pub endpoint: String,
    state: Arc<GateState>,
}

impl Gate {
    pub async fn start(upstream: &str, deployment: &Deployment) -> Gate {
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
        let state = Arc::new(GateState {
            upstream: upstream.trim_end_matches('/').to_string(),
            stream_arn: deployment.stream_arn.clone(),
            principals: Mutex::new(HashMap::new()),
            judged: Mutex::new(Vec::new()),
            client,
        });
        let app = axum::Router::new().fallback(gate_request).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the gate");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Gate { endpoint, state }
    }

    /// Calls signed with `function`'s access key are judged by its policy.
    pub fn admit(&self, function: &Function) {
        self.state.principals.lock().unwrap().insert(function.access_key(), function.clone());
    }

    pub fn judged(&self) -> Vec<Judged> {
        self.state.judged.lock().unwrap().clone()
    }

    /// Every call a policy refused, one per line, naming the function, the action and the
    /// resource: what to add to template.yaml.
    pub fn denials(&self) -> Vec<String> {
        self.judged()
            .into_iter()
            .filter(|j| !j.allowed)
            .map(|j| {
                format!("{} is not allowed {} on {} by its policy in template.yaml", j.function, j.action, j.resource)
            })
            .collect()
    }

    /// The actions each function's policy in template.yaml grants that no call of this session
    /// needed, as `Function: action` lines: candidates to take out of template.yaml. (What SAM
    /// adds for Lambda's own use is not the template's to take out.)
    pub fn unused_grants(&self) -> Vec<String> {
        let judged = self.judged();
        let principals = self.state.principals.lock().unwrap();
        let mut unused = Vec::new();
        for function in principals.values() {
            for statement in function.policy.iter().filter(|s| s.allow && s.origin == "template.yaml") {
                for action in &statement.actions {
                    let used = judged.iter().any(|j| {
                        j.allowed
                            && j.function == function.logical_id
                            && glob(&action.to_ascii_lowercase(), &j.action.to_ascii_lowercase())
                            && statement.resources.iter().any(|r| glob(r, &j.resource))
                    });
                    if !used {
                        unused.push(format!("{}: {action}", function.logical_id));
                    }
                }
            }
        }
        unused.sort();
        unused.dedup();
        unused
    }

    /// Judges a call to `@connections` (API Gateway's management API): `execute-api:ManageConnections`
    /// on `…/{stage}/{METHOD}/@connections/{id}`.
    pub fn judge_management(&self, headers: &HeaderMap, method: &str, api_id: &str, stage: &str, id: &str) -> bool {
        let resource = format!("arn:aws:execute-api:{REGION}:{ACCOUNT}:{api_id}/{stage}/{method}/@connections/{id}");
        judge(&self.state, headers, &[("execute-api:ManageConnections".into(), resource)]).is_ok()
    }
}

/// The access key id of a SigV4-signed request.
fn access_key(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    let credential = auth.split("Credential=").nth(1)?;
    Some(credential.split('/').next()?.to_string())
}

/// Checks every (action, resource) the call needs; records each.
fn judge(state: &GateState, headers: &HeaderMap, needs: &[(String, String)]) -> Result<(), String> {
    let key = access_key(headers);
    let principals = state.principals.lock().unwrap();
    let Some(function) = key.as_ref().and_then(|k| principals.get(k)) else {
        return Err(format!("the request is not signed by a function's access key (key {key:?})"));
    };
    let mut refused = None;
    let mut judged = state.judged.lock().unwrap();
    for (action, resource) in needs {
        let allowed = function.allows(action, resource);
        judged.push(Judged {
            function: function.logical_id.clone(),
            action: action.clone(),
            resource: resource.clone(),
            allowed,
        });
        if !allowed && refused.is_none() {
            refused = Some(format!(
                "User: arn:aws:sts::{ACCOUNT}:assumed-role/{0}Role/{0} is not authorized to perform: {action} on \
                 resource: {resource} because no identity-based policy allows the {action} action",
                function.logical_id
            ));
        }
    }
    refused.map_or(Ok(()), Err)
}

/// The IAM actions and resources one JSON-protocol call needs.
fn needs(state: &GateState, target: &str, body: &Value) -> Result<Vec<(String, String)>, String> {
    let table_arn = |name: &str| format!("arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}");
    let (service, operation) = target.split_once('.').ok_or_else(|| format!("unknown X-Amz-Target {target:?}"))?;
    let str_of = |v: &Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
    Ok(match service {
        "DynamoDB_20120810" => match operation {
            "TransactWriteItems" => {
                let mut needs = Vec::new();
                for item in body["TransactItems"].as_array().into_iter().flatten() {
                    for (kind, action) in [
                        ("Put", "PutItem"),
                        ("Update", "UpdateItem"),
                        ("Delete", "DeleteItem"),
                        ("ConditionCheck", "ConditionCheckItem"),
                    ] {
                        if item.get(kind).is_some() {
                            needs.push((format!("dynamodb:{action}"), table_arn(&str_of(&item[kind], "TableName"))));
                        }
                    }
                }
                needs
            }
            "TransactGetItems" => body["TransactItems"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|item| ("dynamodb:GetItem".to_string(), table_arn(&str_of(&item["Get"], "TableName"))))
                .collect(),
            "BatchGetItem" | "BatchWriteItem" => body["RequestItems"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(table, _)| (format!("dynamodb:{operation}"), table_arn(table)))
                .collect(),
            "ListTables" => vec![("dynamodb:ListTables".into(), "*".into())],
            _ => {
                let mut resource = table_arn(&str_of(body, "TableName"));
                if let Some(index) = body["IndexName"].as_str() {
                    resource = format!("{resource}/index/{index}");
                }
                vec![(format!("dynamodb:{operation}"), resource)]
            }
        },
        "DynamoDBStreams_20120810" => {
            let arn = body["StreamArn"].as_str().map_or_else(|| state.stream_arn.clone(), str::to_string);
            vec![(format!("dynamodb:{operation}"), if operation == "ListStreams" { "*".into() } else { arn })]
        }
        "AmazonSSM" => {
            let name = str_of(body, "Name");
            let name = name.strip_prefix('/').unwrap_or(&name);
            vec![(format!("ssm:{operation}"), format!("arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/{name}"))]
        }
        "AmazonSQS" => {
            // Batch operations are judged as their single action (IAM has no *Batch actions).
            let action = match operation {
                "SendMessageBatch" => "SendMessage",
                "DeleteMessageBatch" => "DeleteMessage",
                "ChangeMessageVisibilityBatch" => "ChangeMessageVisibility",
                other => other,
            };
            let queue = match body["QueueUrl"].as_str() {
                Some(url) => queue_arn(url),
                None => format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{}", str_of(body, "QueueName")),
            };
            vec![(format!("sqs:{action}"), queue)]
        }
        other => return Err(format!("the gate does not know the service of X-Amz-Target {other}")),
    })
}

fn aws_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({ "__type": format!("com.amazon.coral.service#{kind}"), "message": message, "Message": message });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert("x-amzn-ErrorType", kind.parse().unwrap());
    response.headers_mut().insert("content-type", "application/x-amz-json-1.0".parse().unwrap());
    response
}

async fn gate_request(
    State(state): State<Arc<GateState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: bytes::Bytes,
) -> Response {
    let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let needs = match needs(&state, &target, &parsed) {
        Ok(needs) => needs,
        Err(why) => return aws_error(StatusCode::BAD_REQUEST, "UnrecognizedClientException", &why),
    };
    if let Err(why) = judge(&state, &headers, &needs) {
        return aws_error(StatusCode::BAD_REQUEST, "AccessDeniedException", &why);
    }
    let mut request = axum::http::Request::builder().method(method).uri(format!(
        "{}{}",
        state.upstream,
        uri.path_and_query().map_or("/", |p| p.as_str())
    ));
    for (name, value) in &headers {
        if name != "host" {
            request = request.header(name, value);
        }
    }
    let request = request.body(http_body_util::Full::new(body)).expect("a forwarded request");
    match state.client.request(request).await {
        Ok(upstream) => {
            use http_body_util::BodyExt;
            let (parts, body) = upstream.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            Response::from_parts(parts, axum::body::Body::from(bytes))
        }
        Err(e) => aws_error(StatusCode::BAD_GATEWAY, "ServiceUnavailable", &format!("moto did not answer: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// a Lambda function behind a local Runtime API

/// What an invocation came to.
#[derive(Debug)]
pub enum Invoked {
    /// The handler's answer.
    Response(Value),
    /// The handler's error (`/error`), as the runtime reported it.
    Error(Value),
    /// Init failed (`/init/error`), or the process ended without answering.
    Crashed(String),
    /// No answer by the deadline: Lambda ends the sandbox; so did the harness.
    TimedOut,
}

impl Invoked {
    pub fn response(self, what: &str, lambda: &Lambda) -> Value {
        match self {
            Invoked::Response(v) => v,
            other => {
                panic!("{what}: {} answered {other:?}\n--- its log ---\n{}", lambda.function.logical_id, lambda.logs())
            }
        }
    }
}

struct Pending {
    id: String,
    payload: Value,
    deadline_ms: u64,
}

#[derive(Default)]
struct RuntimeState {
    queue: Mutex<VecDeque<Pending>>,
    arrived: Notify,
    waiting: Mutex<HashMap<String, oneshot::Sender<Invoked>>>,
    init_error: Mutex<Option<String>>,
}

/// A function's binary, running behind its own local Lambda Runtime API.
pub struct Lambda {
    pub function: Function,
    runtime_api: String,
    state: Arc<RuntimeState>,
    env: Vec<(String, String)>,
    child: Mutex<Option<Child>>,
    logs: Arc<Mutex<Vec<String>>>,
    counter: std::sync::atomic::AtomicUsize,
}

/// The binary `name`, as `cargo build` put it (`scripts/test` builds them before the tests).
pub fn binary(name: &str) -> PathBuf {
    let path = crate::target_dir().join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build the Lambda binaries first (scripts/test does; or cargo build --bins -p roomcast-handlers -p roomcast-processor -p roomcast-processor-lambda -p roomcast)",
        path.display()
    );
    path
}

impl Lambda {
    /// Starts `function`'s binary. `endpoint` takes every AWS call (the [`Gate`]); `extra` adds
    /// or overrides environment variables (endpoints of the local stack, test timings).
    pub async fn start(function: Function, endpoint: &str, extra: &[(&str, &str)]) -> Lambda {
        let state = Arc::new(RuntimeState::default());
        let app = axum::Router::new()
            .route("/2018-06-01/runtime/invocation/next", axum::routing::get(next))
            .route("/2018-06-01/runtime/invocation/{id}/response", axum::routing::post(respond))
            .route("/2018-06-01/runtime/invocation/{id}/error", axum::routing::post(fail))
            .route("/2018-06-01/runtime/init/error", axum::routing::post(init_error))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a runtime API");
        let runtime_api = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut env: Vec<(String, String)> = function.environment.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let name = function.logical_id.clone();
        env.extend([
            ("AWS_LAMBDA_FUNCTION_NAME".to_string(), name.clone()),
            ("AWS_LAMBDA_FUNCTION_VERSION".into(), "$LATEST".into()),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE".into(), function.memory.to_string()),
            ("AWS_LAMBDA_LOG_GROUP_NAME".into(), format!("/aws/lambda/{name}")),
            ("AWS_LAMBDA_LOG_STREAM_NAME".into(), "local".into()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_DEFAULT_REGION".into(), REGION.into()),
            ("AWS_ACCESS_KEY_ID".into(), function.access_key()),
            ("AWS_SECRET_ACCESS_KEY".into(), "local-secret".into()),
            ("AWS_SESSION_TOKEN".into(), format!("local-session-{name}")),
            ("DYNAMODB_ENDPOINT_URL".into(), endpoint.into()),
            ("AWS_ENDPOINT_URL".into(), endpoint.into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]);
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        let lambda = Lambda {
            function,
            runtime_api,
            state,
            env,
            child: Mutex::new(None),
            logs: Arc::new(Mutex::new(Vec::new())),
            counter: Default::default(),
        };
        lambda.spawn();
        lambda
    }

    fn spawn(&self) {
        let mut command = Command::new(binary(&self.function.binary));
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().cloned())
            .env("AWS_LAMBDA_RUNTIME_API", &self.runtime_api)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The process dies with the test binary, however it ends.
        unsafe {
            use std::os::unix::process::CommandExt;
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("start {}: {e}", self.function.binary));
        for pipe in [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = self.logs.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                    logs.lock().unwrap().push(line);
                }
            });
        }
        *self.child.lock().unwrap() = Some(child);
    }

    /// Everything the function printed so far (its JSON logs).
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Invokes with the function's own `Timeout` as the deadline.
    pub async fn invoke(&self, payload: Value) -> Invoked {
        self.invoke_within(payload, Duration::from_secs(self.function.timeout)).await
    }

    /// One invocation with `timeout` as its deadline. Past it (and a second's grace for the
    /// answer to travel), the process is ended and started again, as Lambda does.
    pub async fn invoke_within(&self, payload: Value, timeout: Duration) -> Invoked {
        let n = self.counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}-{n}", self.function.logical_id);
        let deadline_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64 + timeout.as_millis() as u64;
        self.signal(libc::SIGCONT);
        let (tx, rx) = oneshot::channel();
        self.state.waiting.lock().unwrap().insert(id.clone(), tx);
        self.state.queue.lock().unwrap().push_back(Pending { id: id.clone(), payload, deadline_ms });
        self.state.arrived.notify_one();
        let crashed = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(error) = self.state.init_error.lock().unwrap().clone() {
                    return Invoked::Crashed(format!("init error: {error}"));
                }
                let mut child = self.child.lock().unwrap();
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    return Invoked::Crashed(format!("the process exited with {status}"));
                }
            }
        };
        let outcome = tokio::select! {
            answer = rx => answer.unwrap_or(Invoked::Crashed("the runtime API dropped the invocation".into())),
            crashed = crashed => crashed,
            _ = tokio::time::sleep(timeout + Duration::from_secs(1)) => Invoked::TimedOut,
        };
        self.state.waiting.lock().unwrap().remove(&id);
        if matches!(outcome, Invoked::TimedOut | Invoked::Crashed(_)) {
            self.restart();
        } else {
            // Lambda freezes the sandbox once the function has answered: nothing it left running
            // goes on until the next invocation.
            self.signal(libc::SIGSTOP);
        }
        outcome
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(child) = self.child.lock().unwrap().as_ref() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }

    fn restart(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.state.queue.lock().unwrap().clear();
        *self.state.init_error.lock().unwrap() = None;
        self.spawn();
    }
}

impl Drop for Lambda {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn next(State(state): State<Arc<RuntimeState>>) -> Response {
    loop {
        let notified = state.arrived.notified();
        if let Some(p) = state.queue.lock().unwrap().pop_front() {
            let mut response = (StatusCode::OK, p.payload.to_string()).into_response();
            let headers = response.headers_mut();
            headers.insert("lambda-runtime-aws-request-id", p.id.parse().unwrap());
            headers.insert("lambda-runtime-deadline-ms", p.deadline_ms.to_string().parse().unwrap());
            headers.insert(
                "lambda-runtime-invoked-function-arn",
                format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:local").parse().unwrap(),
            );
            headers
                .insert("lambda-runtime-trace-id", format!("Root=1-00000000-{:024x}", p.deadline_ms).parse().unwrap());
            headers.insert("content-type", "application/json".parse().unwrap());
            return response;
        }
        notified.await;
    }
}

async fn respond(State(state): State<Arc<RuntimeState>>, Path(id): Path<String>, body: bytes::Bytes) -> StatusCode {
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    if let Some(tx) = state.waiting.lock().unwrap().remove(&id) {
        let _ = tx.send(Invoked::Response(value));
    }
    StatusCode::ACCEPTED
}

async fn fail(State(state): State<Arc<RuntimeState>>, Path(id): Path<String>, body: bytes::Bytes) -> StatusCode {
    let value = serde_json::from_slice(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into()));
    if let Some(tx) = state.waiting.lock().unwrap().remove(&id) {
        let _ = tx.send(Invoked::Error(value));
    }
    StatusCode::ACCEPTED
}

async fn init_error(State(state): State<Arc<RuntimeState>>, body: bytes::Bytes) -> StatusCode {
    *state.init_error.lock().unwrap() = Some(String::from_utf8_lossy(&body).into());
    StatusCode::ACCEPTED
}
