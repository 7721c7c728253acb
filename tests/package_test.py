"""Tests scripts/package_check.py, the check scripts/package runs on every artifact `sam build`
made, without a Rust build: fake bootstraps (Python) stand in for the seven functions and answer as
they answer with the table unreachable, so the template reading, the environment, the events and
the judging are all exercised, and so is each way an artifact can be broken.

Run by scripts/test with the project's .venv (cfn-lint reads the templates):
    .venv/bin/python -m unittest tests/package_test.py
"""

import json
import os
import pathlib
import shutil
import sys
import tempfile
import unittest
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import package_check  # noqa: E402

TEMPLATE = ROOT / "template.yaml"

# A stand-in for one Lambda binary: a runtime client, and the answer that binary gives when the
# table cannot be reached. MODE breaks it on purpose.
FAKE = r'''#!PYTHON
import base64, hashlib, hmac, http.client, json, os, socket, sys, urllib.parse
BINARY, MODE = "BINARY_NAME", "MODE_NAME"
if MODE == "crash":
    print("thread 'main' panicked: boom", file=sys.stderr)
    sys.exit(101)
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=30)
def post(path, body):
    conn.request("POST", path, body=json.dumps(body).encode())
    conn.getresponse().read()
if MODE == "init_error" or os.environ.get("TABLE_NAME") != "roomcast-package-check":
    post("/2018-06-01/runtime/init/error", {"errorType": "Config", "errorMessage": "TABLE_NAME is not set"})
    sys.exit(1)
def table_reachable():
    url = urllib.parse.urlparse(os.environ["DYNAMODB_ENDPOINT_URL"])
    try:
        socket.create_connection((url.hostname, url.port), 1).close()
        return True
    except OSError:
        return False
def route_response():
    if table_reachable():
        return {"statusCode": 200}
    return {"statusCode": 500, "body": json.dumps({"action": "error", "code": "internal", "message": "x"})}
def authorize(event):
    assert os.environ["ROOMCAST_JWT_SECRET_PARAMETER"] == "", "would read SSM"
    header, payload, signature = event["queryStringParameters"]["token"].split(".")
    mac = hmac.new(os.environ["ROOMCAST_JWT_SECRET"].encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    if base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode() != signature:
        return {"principalId": "anonymous", "policyDocument": {"Statement": [{"Effect": "Deny"}]}}
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return {"principalId": claims["sub"], "policyDocument": {"Statement": [{"Effect": "Allow"}]},
            "context": {"tenant": claims["tenant"], "userId": claims["sub"]}}
while True:
    conn.request("GET", "/2018-06-01/runtime/invocation/next")
    reply = conn.getresponse()
    event, request_id = json.loads(reply.read()), reply.getheader("Lambda-Runtime-Aws-Request-Id")
    base = f"/2018-06-01/runtime/invocation/{request_id}"
    if MODE == "wrong":
        post(f"{base}/response", {"statusCode": 200})
    elif BINARY == "authorizer":
        post(f"{base}/response", authorize(event))
    elif BINARY in ("connect", "disconnect", "message"):
        post(f"{base}/response", route_response())
    elif BINARY in ("processor", "fanout", "webhook"):
        post(f"{base}/response", {"batchItemFailures": []} if event == {"Records": []} else {})
    elif BINARY == "admin":
        post(f"{base}/response", {"statusCode": 500, "body": {"message": "table unavailable: Scan: refused"}})
    elif BINARY in ("publish", "tenant_publish"):
        post(f"{base}/response", {"statusCode": 503, "body": json.dumps({"error": "table unavailable: put_item: refused"})})
    elif BINARY == "sweeper":
        post(f"{base}/error", {"errorType": "&str", "errorMessage": "table unavailable: Scan: refused"})
    if MODE == "exit_after_answering":
        sys.exit(0)
'''


def fake_build(work, modes=None, drop=()):
    """A .aws-sam/build as sam build lays it out, with fake bootstraps; `modes` breaks some."""
    template = package_check.load_template(TEMPLATE)
    build = pathlib.Path(work) / "build"
    for name, function in package_check.functions(template).items():
        binary = function["Metadata"]["BuildProperties"]["Binary"]
        function["Properties"]["CodeUri"] = name
        mode = (modes or {}).get(name, "ok")
        if mode == "missing":
            continue
        (build / name).mkdir(parents=True)
        bootstrap = build / name / "bootstrap"
        bootstrap.write_text(FAKE.replace("PYTHON", sys.executable).replace("BINARY_NAME", binary)
                             .replace("MODE_NAME", mode))
        bootstrap.chmod(0o755)
    for name in drop:
        del template["Resources"][name]
    build.mkdir(exist_ok=True)
    (build / "template.yaml").write_text(json.dumps(template))  # JSON is YAML
    return build


class Output:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass


class PackageCheck(unittest.TestCase):
    def setUp(self):
        self.work = tempfile.mkdtemp(prefix="package-test-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.template = package_check.load_template(TEMPLATE)
        self.functions = package_check.functions(self.template)

    def run_check(self, build):
        out = Output()
        failed = package_check.check(TEMPLATE, build, timeout=10, check_elf=False, out=out)
        return failed, out.text

    def test_every_function_in_the_template_has_a_check(self):
        binaries = {f["Metadata"]["BuildProperties"]["Binary"] for f in self.functions.values()}
        self.assertEqual(binaries, set(package_check.CHECKS))

    def test_every_environment_resolves_and_keeps_the_function_on_loopback(self):
        for name, function in self.functions.items():
            env = package_check.environment(self.template, name, function, 9, self.work)
            self.assertTrue(all(isinstance(v, str) for v in env.values()), name)
            self.assertEqual(env["TABLE_NAME"], package_check.TABLE, name)
            for key in ("DYNAMODB_ENDPOINT_URL", "ROOMCAST_MANAGEMENT_ENDPOINT", "AWS_ENDPOINT_URL"):
                self.assertEqual(urllib.parse.urlparse(env[key]).hostname, "127.0.0.1", f"{name} {key}")
            for key, value in env.items():
                if value.startswith(("http://", "https://")):
                    self.assertEqual(urllib.parse.urlparse(value).hostname, "127.0.0.1", f"{name} {key}")
            self.assertEqual(env["AWS_EC2_METADATA_DISABLED"], "true")
            self.assertEqual(env.get("ROOMCAST_JWT_SECRET_PARAMETER", ""), "", f"{name} must not read SSM")
            if "ROOMCAST_PLUGIN_ARTIFACT_DIR" in env:
                self.assertTrue(env["ROOMCAST_PLUGIN_ARTIFACT_DIR"].startswith(self.work))
        authorizer = package_check.environment(self.template, "AuthorizerFunction",
                                               self.functions["AuthorizerFunction"], 9, self.work)
        self.assertEqual(authorizer["ROOMCAST_JWT_SECRET"], package_check.JWT_SECRET)

    def test_a_build_that_answers_as_the_functions_do_passes(self):
        failed, text = self.run_check(fake_build(self.work))
        self.assertEqual(failed, [], text)
        self.assertEqual(text.count("  ok: "), len(self.functions), text)
        self.assertIn("an Allow policy for a valid token", text)
        self.assertIn("the route response 500, internal (the table is unreachable)", text)

    def test_each_way_an_artifact_breaks_fails_with_its_output(self):
        modes = {"ConnectFunction": "crash", "ProcessorFunction": "init_error", "AdminFunction": "wrong",
                 "SweeperFunction": "missing", "AuthorizerFunction": "exit_after_answering"}
        failed, text = self.run_check(fake_build(self.work, modes, drop=["DisconnectFunction"]))
        self.assertEqual(set(failed), set(modes) | {"DisconnectFunction"}, text)
        self.assertIn("panicked: boom", text, "a crash shows the function's stderr")
        self.assertIn("exited with status 101 before answering", text)
        self.assertIn("reported an init error", text)
        self.assertIn("expected statusCode 500, table unavailable", text)
        self.assertIn("no bootstrap at", text)
        self.assertIn("then exited with status 0", text)
        self.assertIn("DisconnectFunction: not in", text)
        self.assertEqual(text.count("  ok: "), 5, text)  # Message, Publish, TenantPublish, Fanout, Webhook

    def test_the_token_is_one_the_authorizer_accepts(self):
        # roomcast::auth's own test vector: mint(claims(2000), b"test-secret") signs the same bytes.
        token = package_check.mint({"tenant": "acme", "sub": "ann", "exp": 2000}, "test-secret")
        header, payload, _ = token.split(".")
        self.assertEqual(header, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9")  # {"alg":"HS256","typ":"JWT"}
        self.assertEqual(json.loads(__import__("base64").urlsafe_b64decode(payload + "==")),
                         {"tenant": "acme", "sub": "ann", "exp": 2000})


def elf(machine=62, glibc=(b"2.2.5", b"2.28"), kind=2):
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + kind.to_bytes(2, "little") + machine.to_bytes(2, "little")
    return header + bytes(64 - len(header)) + b"libc.so.6\x00" + b"".join(b"GLIBC_" + v + b"\x00" for v in glibc)


class ElfCheck(unittest.TestCase):
    def check(self, data, architecture="x86_64", mode=0o755):
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(data)
        self.addCleanup(os.unlink, f.name)
        os.chmod(f.name, mode)
        return package_check.elf_problems(f.name, architecture)

    def test_an_x86_64_executable_within_al2023s_glibc_passes(self):
        problems, description = self.check(elf(glibc=(b"2.2.5", b"2.34", b"2.17")))
        self.assertEqual(problems, [])
        self.assertIn("glibc 2.34 at most", description)

    def test_a_newer_glibc_than_al2023s_fails(self):
        problems, _ = self.check(elf(glibc=(b"2.2.5", b"2.36")))
        self.assertEqual(problems, ["it needs GLIBC_2.36; provided.al2023 has 2.34"])

    def test_the_wrong_architecture_a_non_elf_and_a_non_executable_fail(self):
        self.assertIn("its machine is 183, not 62 (x86_64)", self.check(elf(machine=183))[0])
        self.assertEqual(self.check(elf(machine=183), "arm64")[0], [])
        self.assertIn("it is not an ELF file", self.check(b"#!/bin/sh\n")[0])
        self.assertIn("it is not executable", self.check(elf(), mode=0o644)[0])
        self.assertIn("it is not an executable (ELF type 1)", self.check(elf(kind=1))[0])

    def test_this_machines_python_is_read_as_elf(self):
        problems, description = package_check.elf_problems(os.path.realpath(sys.executable), "x86_64")
        self.assertNotIn("it is not an ELF file", problems)
        self.assertIn("ELF", description)


if __name__ == "__main__":
    unittest.main()
