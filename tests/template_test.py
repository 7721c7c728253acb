"""Checks template.yaml for the properties the deployment depends on, so that an edit cannot
silently drop them: the table's stream, TTL and index; the processor's bisect, bounded retries,
partial batch responses and dead-letter queue; the authorizer on $connect; route responses; and
IAM scoped to this table and this API's @connections. Also samconfig.toml, which makes `sam build`
and `sam deploy` run without questions, and how every function is built.

Run by scripts/test (after cfn-lint) with the project's .venv:
    .venv/bin/python -m unittest tests/template_test.py
"""

import pathlib
import tomllib
import re
import unittest

from cfnlint.decode import cfn_yaml

TEMPLATE = pathlib.Path(__file__).resolve().parent.parent / "template.yaml"
SAMCONFIG = TEMPLATE.parent / "samconfig.toml"


def load():
    return cfn_yaml.load(str(TEMPLATE))


def sub_text(value):
    """The string inside a !Sub (plain or list form), or a plain string."""
    if isinstance(value, dict) and "Fn::Sub" in value:
        sub = value["Fn::Sub"]
        return sub[0] if isinstance(sub, list) else sub
    return value if isinstance(value, str) else None


class Template(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.t = load()
        cls.resources = cls.t["Resources"]

    def of_type(self, kind):
        return {name: r for name, r in self.resources.items() if r["Type"] == kind}

    def statements(self, function):
        props = self.resources[function]["Properties"]
        return [s for policy in props.get("Policies", []) for s in policy.get("Statement", [])]

    def test_it_is_a_sam_template(self):
        self.assertEqual(self.t["Transform"], "AWS::Serverless-2016-10-31")

    def test_the_table(self):
        table = self.resources["Table"]["Properties"]
        self.assertEqual(table["BillingMode"], "PAY_PER_REQUEST")
        self.assertEqual(table["StreamSpecification"]["StreamViewType"], "NEW_AND_OLD_IMAGES")
        self.assertEqual(table["TimeToLiveSpecification"], {"AttributeName": "ttl", "Enabled": True})
        self.assertTrue(table["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"])
        keys = {k["AttributeName"]: k["KeyType"] for k in table["KeySchema"]}
        self.assertEqual(keys, {"pk": "HASH", "sk": "RANGE"})
        gsi = {g["IndexName"]: g for g in table["GlobalSecondaryIndexes"]}
        self.assertIn("gsi1", gsi)
        self.assertEqual({k["AttributeName"]: k["KeyType"] for k in gsi["gsi1"]["KeySchema"]},
                         {"gsi1pk": "HASH", "gsi1sk": "RANGE"})

    def test_the_processor_reads_the_stream_safely(self):
        processor = self.resources["ProcessorFunction"]["Properties"]
        architectures = processor.get("Architectures", self.t["Globals"]["Function"]["Architectures"])
        self.assertEqual(architectures, ["x86_64"], "wasmtime's tier-1 platform")
        events = [e["Properties"] for e in processor["Events"].values() if e["Type"] == "DynamoDB"]
        self.assertEqual(len(events), 1)
        source = events[0]
        self.assertEqual(source["Stream"], {"Fn::GetAtt": ["Table", "StreamArn"]})
        self.assertIs(source["BisectBatchOnFunctionError"], True)
        self.assertIn("ReportBatchItemFailures", source["FunctionResponseTypes"])
        self.assertTrue(0 <= source["MaximumRetryAttempts"] <= 10, "retries must be bounded")
        self.assertTrue(60 <= source["MaximumRecordAgeInSeconds"] <= 86400, "record age must be bounded")
        self.assertLessEqual(source["BatchSize"], 1000)
        self.assertIn("MaximumBatchingWindowInSeconds", source)
        on_failure = source["DestinationConfig"]["OnFailure"]
        self.assertEqual(on_failure["Destination"], {"Fn::GetAtt": ["StreamDeadLetterQueue", "Arn"]})
        self.assertEqual(self.resources["StreamDeadLetterQueue"]["Type"], "AWS::SQS::Queue")

    def test_plugin_limits_reach_the_processor(self):
        env = self.resources["ProcessorFunction"]["Properties"]["Environment"]["Variables"]
        self.assertEqual(env["ROOMCAST_PLUGIN_FUEL"], {"Ref": "PluginFuel"})
        self.assertEqual(env["ROOMCAST_PLUGIN_MEMORY_MIB"], {"Ref": "PluginMemoryMiB"})
        self.assertEqual(env["ROOMCAST_PLUGIN_DEADLINE_MS"], {"Ref": "PluginDeadlineMs"})

    def test_every_function_is_rust_on_provided_al2023(self):
        runtime = self.t["Globals"]["Function"]["Runtime"]
        self.assertEqual(runtime, "provided.al2023")
        functions = self.of_type("AWS::Serverless::Function")
        self.assertEqual(set(functions), {"AuthorizerFunction", "ConnectFunction", "DisconnectFunction", "MessageFunction",
                                          "ProcessorFunction", "SweeperFunction", "AdminFunction", "PublishFunction",
                                          "TenantPublishFunction", "FanoutFunction", "WebhookFunction"})
        for name, f in functions.items():
            self.assertEqual(f["Metadata"]["BuildMethod"], "rust-cargolambda", name)
            self.assertNotIn("Runtime", f["Properties"], f"{name} must not override the runtime")
            binary = f["Metadata"]["BuildProperties"]["Binary"]
            crate = TEMPLATE.parent / f["Properties"]["CodeUri"]
            self.assertTrue((crate / "src/bin" / f"{binary}.rs").exists(), f"{name}: no binary {binary} in {crate}")

    def test_every_function_builds_its_own_binary_and_only_the_processor_links_the_plugin_host(self):
        # (test_every_function_is_rust_on_provided_al2023 checks BuildMethod and that the binary exists.)
        binaries = {}
        for name, f in self.of_type("AWS::Serverless::Function").items():
            # The write-path and operator functions build from the handlers' crate, the fan-out
            # stage from the processor's (neither links wasmtime); the processor from its Lambda's
            # own package, which joins the processor and the plugin host.
            expected = {"ProcessorFunction": "./processor/lambda", "FanoutFunction": "./processor",
                        "WebhookFunction": "./processor"}.get(name, "./handlers")
            self.assertEqual(f["Properties"]["CodeUri"], expected, f"{name}: cargo-lambda builds {expected}")
            binaries.setdefault(f["Metadata"]["BuildProperties"]["Binary"], []).append(name)
        shared = {b: names for b, names in binaries.items() if len(names) > 1}
        self.assertEqual(shared, {}, "each function has its own binary (and its own build directory)")

    def test_samconfig_makes_build_and_deploy_ask_nothing_but_the_changeset(self):
        config = tomllib.loads(SAMCONFIG.read_text())
        self.assertEqual(config["version"], 0.1)
        default = config["default"]
        # rust-cargolambda was a SAM CLI beta: without this, SAM CLI 1.155 and older stop to ask.
        self.assertIs(default["build"]["parameters"]["beta_features"], True)
        deploy = default["deploy"]["parameters"]
        self.assertEqual(deploy["capabilities"], "CAPABILITY_IAM", "the template creates IAM roles")
        self.assertIs(deploy["resolve_s3"], True)
        self.assertIs(deploy["confirm_changeset"], True)
        stack = default.get("global", {}).get("parameters", {}).get("stack_name") or deploy.get("stack_name")
        self.assertTrue(stack, "sam deploy and sam delete need a stack name")

    def test_the_websocket_api_routes_and_route_responses(self):
        api = self.resources["WebSocketApi"]["Properties"]
        self.assertEqual(api["ProtocolType"], "WEBSOCKET")
        self.assertEqual(api["RouteSelectionExpression"], "$request.body.action")
        routes = {r["Properties"]["RouteKey"]: name for name, r in self.of_type("AWS::ApiGatewayV2::Route").items()}
        for key in ["$connect", "$disconnect", "$default", "sendMessage", "join", "leave", "ping", "info", "history", "who", "recover", "signal"]:
            self.assertIn(key, routes)
        responses = {r["Properties"]["RouteId"]["Ref"] for r in self.of_type("AWS::ApiGatewayV2::RouteResponse").values()}
        for key in ["$default", "sendMessage", "join", "leave", "ping", "info", "history", "who", "recover", "signal"]:
            self.assertIn(routes[key], responses, f"{key} needs a route response so answers reach clients")
            self.assertEqual(self.resources[routes[key]]["Properties"]["RouteResponseSelectionExpression"], "$default")
        self.assertEqual(len(self.of_type("AWS::ApiGatewayV2::Stage")), 1)

    def test_route_and_authorizer_changes_reach_the_stage_on_the_next_deploy(self):
        # A Deployment resource is created once and never replaced, so a later route or
        # authorizer change would stay undeployed; the stage deploys every change itself.
        deployments = [n for n, r in self.resources.items() if r["Type"] == "AWS::ApiGatewayV2::Deployment"]
        self.assertEqual(deployments, [])
        stage = self.resources["Stage"]
        self.assertIs(stage["Properties"].get("AutoDeploy"), True)
        self.assertNotIn("DeploymentId", stage["Properties"])
        routes = {n for n, r in self.resources.items() if r["Type"] == "AWS::ApiGatewayV2::Route"}
        self.assertTrue(routes <= set(stage.get("DependsOn", [])), "the stage is made after every route")

    def test_deliveries_go_to_the_apis_own_endpoint_not_the_clients_domain(self):
        # Behind a custom domain the request's domainName/stage is not the management API.
        env = self.t["Globals"]["Function"]["Environment"]["Variables"]
        endpoint = sub_text(env.get("ROOMCAST_MANAGEMENT_ENDPOINT"))
        self.assertIsNotNone(endpoint, "the management endpoint comes from configuration")
        self.assertIn("${WebSocketApi}.execute-api.${AWS::Region}", endpoint)
        self.assertTrue(endpoint.endswith("/${StageName}"), endpoint)

    def test_every_function_salts_the_sweep_index_alike_with_the_stacks_id(self):
        # Room names are a tenant's choice: unsalted, a tenant could make one index key hot.
        env = self.t["Globals"]["Function"]["Environment"]["Variables"]
        self.assertIn("ROOMCAST_SWEEP_SALT", env, "in Globals: every function that writes presence hashes alike")
        self.assertIn("AWS::StackId", str(env["ROOMCAST_SWEEP_SALT"]))
        for name, resource in self.resources.items():
            variables = resource.get("Properties", {}).get("Environment", {}).get("Variables", {})
            self.assertNotIn("ROOMCAST_SWEEP_SALT", variables, f"{name} must not salt differently")

    def test_connect_is_behind_the_request_authorizer(self):
        connect = self.resources["ConnectRoute"]["Properties"]
        self.assertEqual(connect["AuthorizationType"], "CUSTOM")
        authorizer = self.resources[connect["AuthorizerId"]["Ref"]]["Properties"]
        self.assertEqual(authorizer["AuthorizerType"], "REQUEST")
        self.assertEqual(authorizer["IdentitySource"], ["route.request.querystring.token"])
        self.assertIn("${AuthorizerFunction.Arn}", sub_text(authorizer["AuthorizerUri"]))
        env = self.resources["AuthorizerFunction"]["Properties"]["Environment"]["Variables"]
        self.assertEqual(env["ROOMCAST_JWT_SECRET_PARAMETER"], {"Ref": "JwtSecretParameter"})

    def test_manage_connections_is_scoped_to_this_apis_connections(self):
        found = 0
        for name in self.of_type("AWS::Serverless::Function"):
            for s in self.statements(name):
                actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
                if any(a.startswith("execute-api:") for a in actions):
                    found += 1
                    self.assertEqual(actions, ["execute-api:ManageConnections"], name)
                    resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
                    for resource in map(sub_text, resources):
                        self.assertIsNotNone(resource, f"{name}: ManageConnections needs a scoped resource")
                        self.assertIn("${WebSocketApi}/${StageName}/", resource, name)
                        self.assertIn("/@connections/", resource, name)
        self.assertEqual(found, 4, "the processor, the fan-out stage's worker, the sweeper and admin manage connections")

    def test_table_actions_are_on_the_table_and_its_indexes_only(self):
        allowed = [{"Fn::GetAtt": ["Table", "Arn"]}, {"Fn::GetAtt": ["Table", "StreamArn"]},
                   {"Fn::Sub": "${Table.Arn}/index/gsi1"}, {"Fn::Sub": "${Table.Arn}/index/sweep"}]
        indexes = {g["IndexName"] for g in self.resources["Table"]["Properties"]["GlobalSecondaryIndexes"]}
        self.assertEqual(indexes, {"gsi1", "sweep"})
        for name in self.of_type("AWS::Serverless::Function"):
            for s in self.statements(name):
                actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
                self.assertNotEqual(s["Resource"], "*", f"{name}: no wildcard resources")
                if any(a.startswith("dynamodb:") for a in actions):
                    self.assertFalse(any(a.endswith("*") for a in actions), f"{name}: no wildcard actions")
                    resources = s["Resource"] if isinstance(s["Resource"], list) else [s["Resource"]]
                    for r in resources:
                        self.assertIn(r, allowed, name)

    def test_the_fan_out_stage_is_a_fifo_queue_the_processor_sends_to_and_its_worker_reads(self):
        queue = self.resources["FanoutQueue"]["Properties"]
        self.assertIs(queue["FifoQueue"], True)
        self.assertIs(queue["ContentBasedDeduplication"], False, "job ids are the deduplication ids")
        dlq = queue["RedrivePolicy"]["deadLetterTargetArn"]
        self.assertEqual(dlq, {"Fn::GetAtt": ["FanoutDeadLetterQueue", "Arn"]})
        self.assertIs(self.resources["FanoutDeadLetterQueue"]["Properties"]["FifoQueue"], True)
        worker = self.resources["FanoutFunction"]["Properties"]
        self.assertGreaterEqual(queue["VisibilityTimeout"], 6 * worker["Timeout"])
        (event,) = worker["Events"].values()
        self.assertEqual(event["Type"], "SQS")
        self.assertEqual(event["Properties"]["Queue"], {"Fn::GetAtt": ["FanoutQueue", "Arn"]})
        self.assertIn("ReportBatchItemFailures", event["Properties"]["FunctionResponseTypes"])
        self.assertLessEqual(event["Properties"]["BatchSize"], 10, "a FIFO event source takes at most 10")
        env = self.resources["ProcessorFunction"]["Properties"]["Environment"]["Variables"]
        self.assertEqual(env["ROOMCAST_FANOUT_QUEUE_URL"], {"Ref": "FanoutQueue"})
        # Said, not defaulted: the stream keeps one batch per shard (order per room), the fan-out
        # leaves the batch instead.
        stream = self.resources["ProcessorFunction"]["Properties"]["Events"]["TableStream"]["Properties"]
        self.assertEqual(stream["ParallelizationFactor"], 1)
        sends = [s for s in self.statements("ProcessorFunction") if s["Action"] == "sqs:SendMessage"]
        self.assertEqual([s["Resource"] for s in sends],
                         [[{"Fn::GetAtt": ["FanoutQueue", "Arn"]}, {"Fn::GetAtt": ["WebhookQueue", "Arn"]}]])

    def test_webhooks_are_a_fifo_queue_of_tenants_retried_for_ten_minutes_at_least_then_dead_letters(self):
        queue = self.resources["WebhookQueue"]["Properties"]
        self.assertIs(queue["FifoQueue"], True, "a message group per tenant: in order, and isolated")
        self.assertIs(queue["ContentBasedDeduplication"], False, "the first event's id is the deduplication id")
        self.assertEqual(queue["RedrivePolicy"]["deadLetterTargetArn"], {"Fn::GetAtt": ["WebhookDeadLetterQueue", "Arn"]})
        self.assertIs(self.resources["WebhookDeadLetterQueue"]["Properties"]["FifoQueue"], True)
        worker = self.resources["WebhookFunction"]["Properties"]
        self.assertGreaterEqual(queue["VisibilityTimeout"], 6 * worker["Timeout"])
        env = worker["Environment"]["Variables"]
        self.assertEqual(env["ROOMCAST_WEBHOOK_QUEUE_URL"], {"Ref": "WebhookQueue"})
        self.assertEqual(env["ROOMCAST_WEBHOOK_ALLOW_PRIVATE"], "false", "tenants choose the URLs")
        # The retries before the dead letters: the backoff of processor/src/webhook/sqs.rs
        # (first, doubling, at most 300 s) over maxReceiveCount - 1 waits.
        first, receives = int(env["ROOMCAST_WEBHOOK_RETRY_SECONDS"]), queue["RedrivePolicy"]["maxReceiveCount"]
        # Each of the receives' refusals is followed by its wait.
        self.assertGreaterEqual(sum(min(first * 2 ** n, 300) for n in range(receives)), 600)
        (event,) = worker["Events"].values()
        self.assertEqual(event["Properties"]["Queue"], {"Fn::GetAtt": ["WebhookQueue", "Arn"]})
        self.assertIn("ReportBatchItemFailures", event["Properties"]["FunctionResponseTypes"])
        self.assertEqual(self.resources["ProcessorFunction"]["Properties"]["Environment"]["Variables"]
                         ["ROOMCAST_WEBHOOK_QUEUE_URL"], {"Ref": "WebhookQueue"})
        dead = [a["Properties"] for a in self.of_type("AWS::CloudWatch::Alarm").values()
                if a["Properties"]["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["WebhookDeadLetterQueue", "QueueName"]}]
        self.assertEqual(len(dead), 1, "the webhook dead-letter queue is alarmed")
        self.assertIn("WebhookDeadLetterQueueUrl", self.t["Outputs"])

    def test_the_sweeper_runs_on_a_schedule(self):
        events = self.resources["SweeperFunction"]["Properties"]["Events"].values()
        self.assertTrue(any(e["Type"] == "Schedule" for e in events))

    def test_the_processor_is_invoked_only_for_the_records_it_acts_on(self):
        import json
        processor = self.resources["ProcessorFunction"]["Properties"]
        (source,) = [e["Properties"] for e in processor["Events"].values() if e["Type"] == "DynamoDB"]
        prefixes = set()
        for f in source["FilterCriteria"]["Filters"]:
            pattern = json.loads(f["Pattern"])
            prefixes |= {p["prefix"] for p in pattern["dynamodb"]["Keys"]["pk"]["S"]}
        # The item kinds processor/src/stream/mod.rs decodes into a record it reacts to (not
        # `State`), and the `pk` prefixes table/src/model/keys.rs gives each kind.
        decoder = (TEMPLATE.parent / "processor/src/stream/mod.rs").read_text()
        typed = set(re.findall(r"ItemKind::(\w+) => typed\(", decoder))
        keys = (TEMPLATE.parent / "table/src/model/keys.rs").read_text()
        prefixes_of = {}
        for m in re.finditer(r'\(((?:"[A-Z]+"(?: \| )?)+), [^)]*\)[^\n=]*=> (?:\{\s*)?(\w+)', keys):
            for prefix in re.findall(r'"([A-Z]+)"', m.group(1)):
                prefixes_of.setdefault(m.group(2), set()).add(prefix + "#")
        self.assertTrue(typed and typed <= set(prefixes_of), f"the decoder's record kinds were found: {typed}")
        acted = set().union(*(prefixes_of[kind] for kind in typed))
        self.assertEqual(prefixes, acted)
        self.assertNotIn("LIMIT#", prefixes, "rate-limit counters never invoke the processor")
        # A message to a user is delivered from its INSERT; its TTL deletion invokes nothing.
        (users,) = [json.loads(f["Pattern"]) for f in source["FilterCriteria"]["Filters"]
                    if "USER#" in f["Pattern"]]
        self.assertEqual(users.get("eventName"), ["INSERT"])
        self.assertEqual([p["prefix"] for p in users["dynamodb"]["Keys"]["pk"]["S"]], ["USER#"])

    def test_a_flood_of_clients_cannot_take_the_processors_concurrency(self):
        props = lambda name: self.resources[name]["Properties"]
        conditions = self.t["Conditions"]
        for name, parameter in [("MessageFunction", "MessageConcurrency"), ("ConnectFunction", "ConnectConcurrency"),
                                ("AuthorizerFunction", "ConnectConcurrency"),
                                ("ProcessorFunction", "ProcessorConcurrency")]:
            condition, value, otherwise = props(name)["ReservedConcurrentExecutions"]["Fn::If"]
            self.assertEqual(value, {"Ref": parameter}, name)
            self.assertEqual(otherwise, {"Ref": "AWS::NoValue"}, name)
            self.assertIn(condition, conditions, name)
            self.assertGreater(self.t["Parameters"][parameter]["Default"], 0, f"{parameter} reserves by default")
        # Reservations leave most of a default account (1,000) unreserved, and never fewer than
        # the 100 Lambda requires.
        reserved = sum(self.t["Parameters"][p]["Default"] for p in ["MessageConcurrency", "ProcessorConcurrency",
                                                                    "PublishConcurrency", "TenantPublishConcurrency"])
        reserved += 2 * self.t["Parameters"]["ConnectConcurrency"]["Default"]
        self.assertLessEqual(reserved, 500)
        self.assertNotIn("ReservedConcurrentExecutions", props("DisconnectFunction"), "$disconnect is never retried")
        # The anonymous tenant route has its own function, concurrency and throttle.
        self.assertNotIn("Events", props("PublishFunction"), "the operator's publish has no public route")
        self.assertEqual(props("PublishFunction")["ReservedConcurrentExecutions"], {"Ref": "PublishConcurrency"})
        tenant = props("TenantPublishFunction")
        self.assertEqual(tenant["ReservedConcurrentExecutions"], {"Ref": "TenantPublishConcurrency"})
        (route,) = [e["Properties"] for e in tenant["Events"].values() if e["Type"] == "HttpApi"]
        self.assertEqual(route["Path"], "/publish")
        self.assertEqual(route["RouteSettings"]["ThrottlingRateLimit"], {"Ref": "TenantPublishRate"})
        self.assertIn("ThrottlingBurstLimit", route["RouteSettings"])
        self.assertEqual(self.resources["TenantPublishFunction"]["Metadata"]["BuildProperties"]["Binary"],
                         "tenant_publish")

    def test_alarms_and_outputs(self):
        alarms = {(a["Properties"]["Namespace"], a["Properties"]["MetricName"])
                  for a in self.of_type("AWS::CloudWatch::Alarm").values()}
        self.assertIn(("AWS/Lambda", "Errors"), alarms)
        self.assertIn(("AWS/Lambda", "IteratorAge"), alarms)
        self.assertIn(("AWS/SQS", "ApproximateNumberOfMessagesVisible"), alarms)
        # The processor's embedded metrics (table/src/metrics.rs): each alarmed counter exists
        # there, on the processor's FunctionName dimension.
        counters = set(re.findall(r"^    ([a-z_]+),$", (TEMPLATE.parent / "table/src/metrics.rs").read_text(), re.M))
        own = {name: a["Properties"] for name, a in self.of_type("AWS::CloudWatch::Alarm").items()
               if a["Properties"]["Namespace"] == "Roomcast"}
        by_function = {}
        for name, p in own.items():
            self.assertIn(p["MetricName"], counters, f"{name}: the processor emits no such counter")
            (dimension,) = p["Dimensions"]
            self.assertEqual(dimension["Name"], "FunctionName", name)
            by_function.setdefault(dimension["Value"]["Ref"], set()).add(p["MetricName"])
        self.assertEqual(by_function, {
            "ProcessorFunction": {"failed", "gone", "slow_consumers", "plugin_faults", "corrupt_items",
                                  "account_throttled", "progress_failures"},
            # The fan-out stage's worker prints the same counts: where big rooms' deliveries fail.
            "FanoutFunction": {"failed", "fanout_jobs_dropped"},
            "WebhookFunction": {"webhook_dropped"},
        })
        for output in ["WebSocketUrl", "TableName", "StreamDeadLetterQueueUrl"]:
            self.assertIn(output, self.t["Outputs"])


if __name__ == "__main__":
    unittest.main()
