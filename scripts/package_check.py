#!/usr/bin/env python3
"""Checks every function artifact `sam build` made, before a deploy: scripts/package runs it after
the build, with the project's .venv (cfn-lint reads the templates).

For each AWS::Serverless::Function in template.yaml, the `bootstrap` in the built template's
CodeUri (.aws-sam/build/<LogicalId>/bootstrap) must

1. be an executable ELF for the function's architecture that needs no glibc newer than the one
   provided.al2023 has (2.34): this machine's own glibc may be newer, so running it here alone
   would not show that;
2. start as Lambda starts it, with the function's template environment (TABLE_NAME and the rest,
   test values for references), take one event from a local Lambda Runtime API
   (scripts/lambda_runtime_api.py), answer it as that function answers it with no AWS at all, and
   then ask for the next event. An init error, a crash, a wrong answer or no answer within the
   timeout fails it, shown with the function's own output.

Nothing leaves the machine: DynamoDB, the @connections API and every other AWS endpoint point at
a loopback port that refuses connections, the credentials and region are fake, instance metadata
is off, and the authorizer takes its secret from ROOMCAST_JWT_SECRET instead of SSM. So the
handlers that write answer as they do when the table is unreachable (a 500 route response, a
failed admin operation, a sweeper error), which is the proof that the artifact started, read its
configuration, built its clients, made its call and answered through the Runtime API.

Usage: scripts/package_check.py [--template template.yaml] [--build-dir .aws-sam/build]
                                [--timeout 20] [--only LogicalId ...]
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import pathlib
import re
import socket
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lambda_runtime_api  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

# provided.al2023 is Amazon Linux 2023: glibc 2.34.
MAX_GLIBC = (2, 34)
ELF_MACHINES = {"x86_64": 62, "arm64": 183}
TABLE = "roomcast-package-check"
CONNECTION = "package-check-connection"
JWT_SECRET = "package-check-secret"


# ------------------------------------------------------------------------------------ templates

def load_template(path):
    from cfnlint.decode import cfn_yaml

    return cfn_yaml.load(str(path))


def functions(template):
    """{LogicalId: resource} of the template's AWS::Serverless::Function resources."""
    return {name: r for name, r in template["Resources"].items() if r.get("Type") == "AWS::Serverless::Function"}


def resolve(value, template, what):
    """A template value as the function would see it, with test values for what only a deployment
    knows: a parameter's default, a fixed table name, the fake region."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, dict) and set(value) == {"Ref"}:
        name = value["Ref"]
        parameter = template.get("Parameters", {}).get(name)
        if parameter is not None and "Default" in parameter:
            return str(parameter["Default"])
        resource = template["Resources"].get(name, {})
        if resource.get("Type") == "AWS::DynamoDB::Table":
            return TABLE
        if resource.get("Type") == "AWS::SQS::Queue":
            # A queue URL on a closed loopback port: nothing here hands off a frame.
            return f"http://127.0.0.1:1/123456789012/{name}.fifo"
        if name == "AWS::Region":
            return lambda_runtime_api.REGION
        if name == "AWS::URLSuffix":
            return "amazonaws.com"
        if name == "AWS::StackId":
            return f"arn:aws:cloudformation:{lambda_runtime_api.REGION}:123456789012:stack/roomcast/test-stack-id"
        if resource.get("Type") == "AWS::ApiGatewayV2::Api":
            return "testapi123"
    if isinstance(value, dict) and set(value) == {"Fn::Sub"} and isinstance(value["Fn::Sub"], str):
        # Each ${Name} as its Ref (the management endpoint's URL: isolation() points it at a
        # closed port anyway).
        return re.sub(r"\$\{([^}!.]+)\}", lambda m: resolve({"Ref": m.group(1)}, template, what), value["Fn::Sub"])
    raise ValueError(f"{what}: cannot give {json.dumps(value, default=str)} a test value; teach package_check.resolve")


def setting(template, function, key, default=None):
    """A function property, or the Globals one, as SAM merges them (the function's wins)."""
    props = function.get("Properties", {})
    if key in props:
        return props[key]
    return template.get("Globals", {}).get("Function", {}).get(key, default)


def template_environment(template, name, function):
    """The function's environment as SAM deploys it: Globals' variables, then its own."""
    variables = {}
    for source in (template.get("Globals", {}).get("Function", {}), function.get("Properties", {})):
        variables.update(source.get("Environment", {}).get("Variables", {}))
    return {k: resolve(v, template, f"{name}.Environment.{k}") for k, v in variables.items()}


def isolation(closed_port, work):
    """What keeps a function on this machine: every endpoint a closed loopback port, and empty
    AWS config and credentials files (run_one makes them) instead of this user's."""
    closed = f"http://127.0.0.1:{closed_port}"
    return {
        "DYNAMODB_ENDPOINT_URL": closed,
        "ROOMCAST_MANAGEMENT_ENDPOINT": closed,
        "AWS_ENDPOINT_URL": closed,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(pathlib.Path(work) / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(pathlib.Path(work) / "aws-credentials"),
    }


def environment(template, name, function, closed_port, work):
    env = template_environment(template, name, function)
    env.update(isolation(closed_port, work))
    if "ROOMCAST_JWT_SECRET_PARAMETER" in env:
        # The authorizer would read SSM at init; an empty name makes it take the secret itself.
        env["ROOMCAST_JWT_SECRET_PARAMETER"] = ""
        env["ROOMCAST_JWT_SECRET"] = JWT_SECRET
    if "ROOMCAST_PLUGIN_ARTIFACT_DIR" in env:
        env["ROOMCAST_PLUGIN_ARTIFACT_DIR"] = str(pathlib.Path(work) / "plugins")
    return env


# ------------------------------------------------------------------------------------ events

def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def websocket_event(route, body=None):
    """AWS's example WebSocket request (tests/fixtures), as tests/support/requests.rs shapes it."""
    event = fixture("example-apigw-websocket-request.json")
    context = event["requestContext"]
    context.update(connectionId=CONNECTION, routeKey=route, stage="prod",
                   domainName="abcd1234.execute-api.us-east-1.amazonaws.com",
                   eventType={"$connect": "CONNECT"}.get(route, "MESSAGE"))
    if route == "$connect":
        context["authorizer"] = {"principalId": "ann", "tenant": "acme", "userId": "ann"}
        event["queryStringParameters"] = {"rooms": "general"}
        event["multiValueQueryStringParameters"] = {"rooms": ["general"]}
    else:
        context["authorizer"] = None
    event["body"] = body
    return event


def disconnect_event():
    event = fixture("example-apigw-websocket-request-disconnect-route.json")
    event["requestContext"]["connectionId"] = CONNECTION
    return event


def mint(claims, secret):
    """An HS256 JWT, as roomcast::auth::mint signs it."""
    b64 = lambda data: base64.urlsafe_b64encode(data).rstrip(b"=").decode()  # noqa: E731
    header = b64(b'{"alg":"HS256","typ":"JWT"}')
    signed = f"{header}.{b64(json.dumps(claims, separators=(',', ':')).encode())}"
    return f"{signed}.{b64(hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest())}"


def authorizer_event():
    """AWS's example REQUEST authorizer event with a valid token: only a function that read its
    secret and verifies HS256 answers Allow (a bad token would be denied by a broken one too)."""
    event = fixture("example-apigw-v2-custom-authorizer-websocket-request.json")
    token = mint({"tenant": "acme", "sub": "ann", "exp": int(time.time()) + 3600}, JWT_SECRET)
    event["queryStringParameters"] = {"token": token}
    event["multiValueQueryStringParameters"] = {"token": [token]}
    return event


def scheduled_event():
    return {"version": "0", "id": "package-check", "detail-type": "Scheduled Event", "source": "aws.events",
            "account": lambda_runtime_api.ACCOUNT, "time": "2026-01-01T00:00:00Z",
            "region": lambda_runtime_api.REGION, "resources": [], "detail": {}}


# ------------------------------------------------------------------------------------ answers

class Wrong(Exception):
    pass


def response(result):
    if result.kind != "response":
        raise Wrong(f"expected a response; it {result.describe()}")
    return result.payload


def table_unreachable_route_response(result):
    """The write-path handlers' answer when the table cannot be reached (handlers::internal)."""
    answer = response(result)
    if not isinstance(answer, dict) or answer.get("statusCode") != 500:
        raise Wrong(f"expected the route response 500 (table unreachable); it {result.describe()}")
    body = json.loads(answer.get("body") or "{}")
    if (body.get("action"), body.get("code")) != ("error", "internal"):
        raise Wrong(f"expected an internal error frame in the body; it {result.describe()}")
    return "the route response 500, internal (the table is unreachable)"


def allow_policy(result):
    answer = response(result)
    statements = answer.get("policyDocument", {}).get("Statement", []) if isinstance(answer, dict) else []
    if ([s.get("Effect") for s in statements] != ["Allow"] or answer.get("principalId") != "ann"
            or answer.get("context") != {"tenant": "acme", "userId": "ann"}):
        raise Wrong(f"expected an Allow policy with the token's tenant and user; it {result.describe()}")
    return "an Allow policy for a valid token, with its tenant and user"


def empty_batch(result):
    if response(result) != {"batchItemFailures": []}:
        raise Wrong(f'expected {{"batchItemFailures": []}}; it {result.describe()}')
    return 'no batch item failures for an empty batch'


def admin_table_unreachable(result):
    answer = response(result)
    message = str(answer.get("body", {}).get("message", "")) if isinstance(answer, dict) else ""
    if answer.get("statusCode") != 500 or not message.startswith("table unavailable"):
        raise Wrong(f"expected statusCode 500, table unavailable; it {result.describe()}")
    return "statusCode 500, table unavailable"


def sweeper_table_unreachable(result):
    if result.kind != "error":
        raise Wrong(f"expected the sweep to fail (the table is unreachable); it {result.describe()}")
    message = str(result.payload.get("errorMessage", "")) if isinstance(result.payload, dict) else ""
    if "table unavailable" not in message or "panicked" in message:
        raise Wrong(f"expected a table unavailable error; it {result.describe()}")
    return "a function error, table unavailable"


def publish_event():
    """A function URL request, IAM-authorized (the operator's backend)."""
    return {"version": "2.0", "rawPath": "/", "headers": {"content-type": "application/json"},
            "requestContext": {"http": {"method": "POST", "path": "/"},
                               "authorizer": {"iam": {"accessKey": "AKIAOPERATOR", "accountId": "123456789012"}}},
            "body": json.dumps({"tenant": "acme", "room": "general", "message": "order shipped"}),
            "isBase64Encoded": False}


def publish_table_unavailable(result):
    answer = response(result)
    body = json.loads(answer.get("body") or "{}") if isinstance(answer, dict) else {}
    if answer.get("statusCode") != 503 or "table unavailable" not in str(body.get("error", "")):
        raise Wrong(f"expected statusCode 503, table unavailable; it {result.describe()}")
    return "statusCode 503, table unavailable"


# Binary (BuildProperties.Binary) → (what it is given, how its answer is judged).
CHECKS = {
    "authorizer": (authorizer_event, allow_policy),
    "connect": (lambda: websocket_event("$connect"), table_unreachable_route_response),
    "disconnect": (disconnect_event, table_unreachable_route_response),
    "message": (lambda: websocket_event("$default", '{"action":"ping"}'), table_unreachable_route_response),
    "processor": (lambda: {"Records": []}, empty_batch),
    "fanout": (lambda: {"Records": []}, empty_batch),
    "webhook": (lambda: {"Records": []}, empty_batch),
    "sweeper": (scheduled_event, sweeper_table_unreachable),
    "admin": (lambda: {"action": "get_all_connections", "limit": 1}, admin_table_unreachable),
    "publish": (publish_event, publish_table_unavailable),
    # The same code, deployed as the tenants' route.
    "tenant_publish": (publish_event, publish_table_unavailable),
}


# ------------------------------------------------------------------------------------ ELF

def glibc_needed(data):
    """The newest GLIBC_x.y symbol version the binary names (its dynamic string table), or None."""
    versions = [tuple(int(p) for p in m.split(b".")) for m in re.findall(rb"GLIBC_(\d+(?:\.\d+)+)\x00", data)]
    return max(versions) if versions else None


def elf_problems(path, architecture):
    """Why the file cannot run on Lambda's `architecture`, or [] (and a one-line description)."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        return [f"cannot read it: {e}"], ""
    problems = []
    if not os.access(path, os.X_OK):
        problems.append("it is not executable")
    if data[:4] != b"\x7fELF":
        return problems + ["it is not an ELF file"], ""
    if data[4] != 2 or data[5] != 1:
        problems.append("it is not a 64-bit little-endian ELF")
    machine = int.from_bytes(data[18:20], "little")
    want = ELF_MACHINES.get(architecture)
    if want is None:
        problems.append(f"unknown architecture {architecture!r}")
    elif machine != want:
        problems.append(f"its machine is {machine}, not {want} ({architecture})")
    kind = int.from_bytes(data[16:18], "little")
    if kind not in (2, 3):
        problems.append(f"it is not an executable (ELF type {kind})")
    glibc = glibc_needed(data)
    if glibc and glibc > MAX_GLIBC:
        problems.append(f"it needs GLIBC_{'.'.join(map(str, glibc))}; provided.al2023 has "
                        f"{'.'.join(map(str, MAX_GLIBC))}")
    size = f"{len(data) / 2**20:.1f} MiB"
    libc = f"glibc {'.'.join(map(str, glibc))} at most" if glibc else "no glibc symbol versions"
    return problems, f"{size}, {architecture} ELF, {libc}"


# ------------------------------------------------------------------------------------ the run

def closed_port():
    """A loopback port that refuses connections for as long as the socket lives: bound, not
    listening, so nothing else can take it."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def tail(text, lines=40):
    rows = text.rstrip().splitlines()
    return "\n".join((["..."] if len(rows) > lines else []) + rows[-lines:])


def check(template_path, build_dir, timeout=20.0, only=None, check_elf=True, out=sys.stdout):
    """Runs every check; returns the names of the functions that failed."""
    source = load_template(template_path)
    built_path = pathlib.Path(build_dir) / "template.yaml"
    if not built_path.exists():
        raise SystemExit(f"{built_path} is missing: run sam build first")
    built = functions(load_template(built_path))
    wanted = functions(source)
    failed = []
    missing = sorted(set(wanted) - set(built))
    for name in missing:
        print(f"FAILED {name}: not in {built_path}", file=out)
    failed += missing
    keeper, port = closed_port()
    try:
        for name, function in wanted.items():
            if name in missing or (only and name not in only):
                continue
            ok = run_one(source, name, function, built[name], pathlib.Path(build_dir), port, timeout, check_elf, out)
            if not ok:
                failed.append(name)
    finally:
        keeper.close()
    return failed


def run_one(template, name, function, built_function, build_dir, port, timeout, check_elf, out):
    binary = function.get("Metadata", {}).get("BuildProperties", {}).get("Binary", "?")
    code_uri = built_function.get("Properties", {}).get("CodeUri")
    bootstrap = build_dir / str(code_uri) / "bootstrap"
    print(f"\n{name} ({binary}): {bootstrap}", file=out)

    def fail(why, result=None):
        print(f"  FAILED: {why}", file=out)
        if result is not None:
            for stream in ("stderr", "stdout"):
                text = getattr(result, stream)
                if text.strip():
                    print(f"  --- its {stream} ---\n{tail(text)}\n  ---", file=out)
        return False

    if binary not in CHECKS:
        return fail(f"no check for binary {binary!r}: add one to CHECKS in scripts/package_check.py")
    if not code_uri or not bootstrap.exists():
        return fail(f"no bootstrap at {bootstrap}")
    architecture = (setting(template, function, "Architectures") or ["x86_64"])[0]
    if check_elf:
        problems, description = elf_problems(bootstrap, architecture)
        if problems:
            return fail("; ".join(problems))
        print(f"  {description}", file=out)
    make_event, judge = CHECKS[binary]
    with tempfile.TemporaryDirectory(prefix=f"package-check-{binary}-") as work:
        env = environment(template, name, function, port, work)
        for empty in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            pathlib.Path(env[empty]).touch()
        memory = int(resolve(setting(template, function, "MemorySize", 128), template, f"{name}.MemorySize"))
        # Lambda's own limit is the function's Timeout (3 s unless set); never wait longer.
        limit = float(resolve(setting(template, function, "Timeout", 3), template, f"{name}.Timeout"))
        result = lambda_runtime_api.invoke_once([str(bootstrap.resolve())], make_event(), function_name=name,
                                                env=env, timeout=min(timeout, limit), memory_mb=memory,
                                                cwd=str(bootstrap.parent.resolve()), deadline=limit)
    try:
        what = judge(result)
    except Wrong as e:
        return fail(str(e), result)
    if result.exit_code is not None or not result.came_back:
        return fail(f"it {result.describe()}", result)
    print(f"  ok: {what}, in {result.seconds:.1f} s; then it asked for the next event", file=out)
    return True


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default=str(ROOT / "template.yaml"))
    parser.add_argument("--build-dir", default=str(ROOT / ".aws-sam" / "build"))
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds each function has to answer")
    parser.add_argument("--only", nargs="+", metavar="LOGICAL_ID")
    args = parser.parse_args()
    failed = check(args.template, args.build_dir, args.timeout, args.only)
    total = len(args.only) if args.only else len(functions(load_template(args.template)))
    print(f"\npackage check: {total - len(failed)} passed, {len(failed)} failed")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
