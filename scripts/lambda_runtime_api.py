#!/usr/bin/env python3
"""A local AWS Lambda Runtime API that serves one invocation, so that a built `bootstrap` can be
started as Lambda starts it and asked to answer one event, with nothing but this machine.

Standard library only. scripts/package uses it (through scripts/package_check.py) on every
function `sam build` produced; `--self-test` runs fake bootstraps written in Python against it, so
its logic is tested without a Rust build (scripts/test runs that).

The API is the one Lambda documents for custom runtimes (version 2018-06-01):

    GET  /2018-06-01/runtime/invocation/next          the event, with the Lambda-Runtime-* headers
    POST /2018-06-01/runtime/invocation/{id}/response  the function's answer
    POST /2018-06-01/runtime/invocation/{id}/error     the function's error ({errorType, errorMessage})
    POST /2018-06-01/runtime/init/error                the runtime could not start

The first `next` gets the event; a later one is held open, as Lambda holds it between
invocations, until the child is killed. As a module:

    result = invoke_once(["./bootstrap"], {"Records": []}, function_name="Processor", env={...})
    result.kind      # "response", "error", "init_error", "exit" (died first) or "timeout"

Usage:
    scripts/lambda_runtime_api.py --self-test
    scripts/lambda_runtime_api.py BOOTSTRAP EVENT_JSON [--timeout S] [--env NAME=VALUE ...]
"""

import argparse
import dataclasses
import http.server
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

PREFIX = "/2018-06-01/runtime"
NEXT = f"{PREFIX}/invocation/next"
INIT_ERROR = f"{PREFIX}/init/error"
ANSWER = re.compile(rf"^{re.escape(PREFIX)}/invocation/([^/]+)/(response|error)$")

REGION = "us-east-1"
ACCOUNT = "123456789012"


@dataclasses.dataclass
class Result:
    """How one invocation ended."""

    kind: str  # "response" | "error" | "init_error" | "exit" | "timeout"
    payload: object = None  # the response body (JSON if it parses), or the error document
    error_type: str = ""  # the Lambda-Runtime-Function-Error-Type header of an error
    exit_code: object = None  # the child's exit status, when it ended by itself
    came_back: bool = False  # after answering, the runtime asked for the next event (its loop goes on)
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    requests: list = dataclasses.field(default_factory=list)  # "METHOD path" in order

    def describe(self):
        after = ""
        if self.kind in ("response", "error"):
            if self.exit_code is not None:
                after = f", then exited with status {self.exit_code}"
            elif not self.came_back:
                after = ", then never asked for the next event"
        if self.kind == "response":
            return f"answered {json.dumps(self.payload)[:400]}{after}"
        if self.kind in ("error", "init_error"):
            what = "an init error" if self.kind == "init_error" else "a function error"
            return f"reported {what} ({self.error_type or 'no type'}): {json.dumps(self.payload)[:400]}{after}"
        if self.kind == "exit" and isinstance(self.exit_code, str):
            return f"could not be started ({self.exit_code})"
        if self.kind == "exit":
            return f"exited with status {self.exit_code} before answering"
        return f"gave no answer within {self.seconds:.0f} s"


def _trace_id():
    return f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)};Parent={secrets.token_hex(8)};Sampled=0"


class RuntimeApi:
    """The Runtime API for one event, on 127.0.0.1 and a free port, in a background thread."""

    def __init__(self, event, function_name, deadline_seconds):
        self.event = event if isinstance(event, bytes) else json.dumps(event).encode()
        self.request_id = str(uuid.uuid4())
        self.function_arn = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:{function_name}"
        self.deadline_seconds = deadline_seconds
        self.answered = threading.Event()  # a response, an error or an init error arrived
        self.closing = threading.Event()  # releases a held `next`
        self.came_back = threading.Event()  # a second `next` arrived
        self.result = None
        self.requests = []
        self._lock = threading.Lock()
        self._served = False
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the Rust runtime client expects

            def log_message(self, *args):
                pass

            def do_GET(self):
                api._record(self)
                if self.path != NEXT:
                    return self._send(404, {"errorType": "NotFound", "errorMessage": f"no route {self.path}"})
                with api._lock:
                    first, api._served = not api._served, True
                if not first:
                    # Lambda holds `next` until the following invocation; here there is none.
                    api.came_back.set()
                    api.closing.wait()
                    self.close_connection = True
                    return
                deadline_ms = int((time.time() + api.deadline_seconds) * 1000)
                self._send(200, api.event, {
                    "Lambda-Runtime-Aws-Request-Id": api.request_id,
                    "Lambda-Runtime-Deadline-Ms": str(deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": api.function_arn,
                    "Lambda-Runtime-Trace-Id": _trace_id(),
                })

            def do_POST(self):
                api._record(self)
                body = self._body()
                error_type = self.headers.get("Lambda-Runtime-Function-Error-Type", "")
                if self.path == INIT_ERROR:
                    api._finish(Result("init_error", _json_or_text(body), error_type))
                    return self._send(202, {"status": "OK"})
                match = ANSWER.match(self.path)
                if not match:
                    return self._send(404, {"errorType": "NotFound", "errorMessage": f"no route {self.path}"})
                if match.group(1) != api.request_id:
                    return self._send(400, {"errorType": "InvalidRequestID",
                                            "errorMessage": f"unknown request id {match.group(1)}"})
                if match.group(2) == "response":
                    api._finish(Result("response", _json_or_text(body)))
                else:
                    api._finish(Result("error", _json_or_text(body), error_type))
                self._send(202, {"status": "OK"})

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status, body, headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="lambda-runtime-api", daemon=True)
        self._thread.start()

    def _record(self, handler):
        with self._lock:
            self.requests.append(f"{handler.command} {handler.path}")

    def _finish(self, result):
        with self._lock:
            if self.result is None:
                self.result = result
        self.answered.set()

    def close(self):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # A killed child leaves its connections reset; anything else is a bug worth seeing.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _json_or_text(body):
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def lambda_environment(function_name, api_address, task_root, memory_mb=128):
    """The variables Lambda defines for a function on an OS-only runtime (provided.al2023), with a
    fake region and fake credentials: nothing here reaches AWS."""
    return {
        "_HANDLER": "bootstrap",
        "AWS_LAMBDA_RUNTIME_API": api_address,
        "AWS_LAMBDA_FUNCTION_NAME": function_name,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function_name}",
        "AWS_LAMBDA_LOG_STREAM_NAME": time.strftime("%Y/%m/%d/[$LATEST]") + secrets.token_hex(16),
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "AWS_SESSION_TOKEN": "local-runtime-api-session",
        "LAMBDA_TASK_ROOT": task_root,
        "LAMBDA_RUNTIME_DIR": task_root,
        "TZ": ":UTC",
        "LANG": "en_US.UTF-8",
        "PATH": "/usr/local/bin:/usr/bin:/bin",
    }


def invoke_once(command, event, function_name="function", env=None, timeout=20.0, memory_mb=128, cwd=None,
                settle=2.0, deadline=None):
    """Starts `command` (a built bootstrap) as Lambda would, gives it `event`, and waits at most
    `timeout` seconds for its answer, then at most `settle` seconds for it to ask for the next
    event (or to exit); then kills it. The child's environment is Lambda's (see
    `lambda_environment`) plus `env`, and nothing of this process's own. The event's deadline is
    `deadline` seconds away (the function's Timeout), or `timeout`."""
    command = [command] if isinstance(command, str) else list(command)
    if os.sep in command[0]:
        command[0] = os.path.abspath(command[0])  # the child starts in its task root
    task_root = cwd or os.path.dirname(os.path.abspath(command[0]))
    api = RuntimeApi(event, function_name, deadline or timeout)
    child_env = lambda_environment(function_name, api.address, task_root, memory_mb)
    child_env.update({k: str(v) for k, v in (env or {}).items()})
    out = tempfile.TemporaryFile()
    err = tempfile.TemporaryFile()
    started = time.monotonic()
    exit_code = None
    try:
        try:
            child = subprocess.Popen(command, cwd=task_root, env=child_env, stdin=subprocess.DEVNULL,
                                     stdout=out, stderr=err, start_new_session=True)
        except OSError as e:
            child = None
            result = Result("exit", exit_code=str(e))
        while child is not None:
            if api.answered.wait(0.05):
                break
            exit_code = child.poll()
            if exit_code is not None:
                # It may have answered just before it ended.
                api.answered.wait(0.2)
                break
            if time.monotonic() - started > timeout:
                break
        if child is not None:
            seconds = time.monotonic() - started
            if api.answered.is_set():
                settled = time.monotonic() + settle
                while not api.came_back.wait(0.05) and child.poll() is None and time.monotonic() < settled:
                    pass
            if child.poll() is None:
                _kill(child)
            else:
                exit_code = child.returncode
            result = api.result or Result("exit" if exit_code is not None else "timeout", exit_code=exit_code)
            result.seconds = seconds
            result.exit_code = exit_code
            result.came_back = api.came_back.is_set()
    finally:
        api.close()
    result.requests = list(api.requests)
    for stream, name in ((out, "stdout"), (err, "stderr")):
        stream.seek(0)
        setattr(result, name, stream.read().decode("utf-8", "replace"))
        stream.close()
    return result


def _kill(child):
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


# ------------------------------------------------------------------------------------ self-test

# A fake bootstrap: a Python program that talks to the Runtime API as a runtime client does, over
# one keep-alive connection. Its behaviour is chosen by FAKE_MODE.
FAKE_BOOTSTRAP = r'''
import http.client, json, os, sys
mode = os.environ["FAKE_MODE"]
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
conn = http.client.HTTPConnection(host, int(port), timeout=30)
def post(path, body, headers={}, chunked=False):
    data = json.dumps(body).encode()
    if chunked:
        conn.request("POST", path, body=iter([data[:5], data[5:]]), headers=headers, encode_chunked=True)
    else:
        conn.request("POST", path, body=data, headers=headers)
    reply = conn.getresponse(); reply.read()
    return reply.status
if mode == "crash":
    print("thread 'main' panicked at src/main.rs:1:1: no table", file=sys.stderr)
    sys.exit(101)
if mode == "init_error":
    post("/2018-06-01/runtime/init/error", {"errorType": "Config", "errorMessage": "TABLE_NAME is not set"},
         {"Lambda-Runtime-Function-Error-Type": "Runtime.InitError"})
    sys.exit(1)
while True:
    conn.request("GET", "/2018-06-01/runtime/invocation/next")
    reply = conn.getresponse()
    event = json.loads(reply.read())
    request_id = reply.getheader("Lambda-Runtime-Aws-Request-Id")
    seen = {h: reply.getheader(h) for h in ("Lambda-Runtime-Deadline-Ms", "Lambda-Runtime-Invoked-Function-Arn",
                                            "Lambda-Runtime-Trace-Id")}
    if mode == "silent":
        continue
    if mode == "error":
        status = post(f"/2018-06-01/runtime/invocation/{request_id}/error",
                      {"errorType": "&str", "errorMessage": "table unavailable: connection refused"},
                      {"Lambda-Runtime-Function-Error-Type": "unhandled"})
        continue
    if mode == "wrong_id":
        status = post("/2018-06-01/runtime/invocation/not-the-id/response", {})
        print(f"status {status}", file=sys.stderr)
        sys.exit(2)
    env = {k: os.environ.get(k) for k in ("AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                                          "AWS_LAMBDA_FUNCTION_VERSION", "AWS_REGION", "AWS_ACCESS_KEY_ID",
                                          "TABLE_NAME", "HOME_OF_CALLER", "LAMBDA_TASK_ROOT")}
    print(json.dumps({"log": "answering"}), flush=True)
    status = post(f"/2018-06-01/runtime/invocation/{request_id}/response",
                  {"event": event, "headers": seen, "env": env, "cwd": os.getcwd()}, chunked=(mode == "chunked"))
    if mode == "answer_and_exit":
        sys.exit(0)
'''


def self_test():
    import unittest

    work = tempfile.mkdtemp(prefix="lambda-runtime-api-")
    fake = os.path.join(work, "bootstrap.py")
    with open(fake, "w") as f:
        f.write(FAKE_BOOTSTRAP)

    def run(mode, timeout=10.0, event=None, **env):
        return invoke_once([sys.executable, fake], {"Records": []} if event is None else event,
                           function_name="FakeFunction", env={"FAKE_MODE": mode, **env}, timeout=timeout,
                           memory_mb=256, cwd=work)

    class RuntimeApiTest(unittest.TestCase):
        def test_a_response_with_the_event_headers_and_lambdas_environment(self):
            os.environ["HOME_OF_CALLER"] = "must not leak"
            before = time.time() * 1000
            r = run("answer", TABLE_NAME="roomcast-test")
            later = invoke_once([sys.executable, fake], {}, env={"FAKE_MODE": "answer"}, timeout=5, deadline=60, cwd=work)
            self.assertTrue(55_000 < int(later.payload["headers"]["Lambda-Runtime-Deadline-Ms"]) - time.time() * 1000
                            <= 60_000, "the deadline is the function's Timeout when given")
            self.assertEqual(r.kind, "response", r.describe() + r.stderr)
            answer = r.payload
            self.assertEqual(answer["event"], {"Records": []})
            deadline = int(answer["headers"]["Lambda-Runtime-Deadline-Ms"])
            self.assertTrue(before + 9000 < deadline < time.time() * 1000 + 11000, "deadline: epoch ms + timeout")
            self.assertEqual(answer["headers"]["Lambda-Runtime-Invoked-Function-Arn"],
                             f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:FakeFunction")
            self.assertTrue(answer["headers"]["Lambda-Runtime-Trace-Id"].startswith("Root=1-"))
            env = answer["env"]
            self.assertEqual((env["AWS_LAMBDA_FUNCTION_NAME"], env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"],
                              env["AWS_LAMBDA_FUNCTION_VERSION"], env["AWS_REGION"]),
                             ("FakeFunction", "256", "$LATEST", REGION))
            self.assertTrue(env["AWS_ACCESS_KEY_ID"])
            self.assertEqual(env["TABLE_NAME"], "roomcast-test", "the caller's env reaches the function")
            self.assertIsNone(env["HOME_OF_CALLER"], "this process's own environment does not")
            self.assertEqual((env["LAMBDA_TASK_ROOT"], answer["cwd"]), (work, work))
            self.assertIn('"answering"', r.stdout)
            self.assertEqual(r.requests[:2], ["GET /2018-06-01/runtime/invocation/next",
                                              f"POST /2018-06-01/runtime/invocation/{_request_id(r)}/response"])
            # The runtime asked for the next event, which was held until the child was killed.
            self.assertEqual(r.requests[2:], ["GET /2018-06-01/runtime/invocation/next"])
            self.assertTrue(r.came_back)
            self.assertIsNone(r.exit_code, "killed, not ended by itself")
            self.assertLess(r.seconds, 5)

        def test_a_chunked_response(self):
            r = run("chunked")
            self.assertEqual(r.kind, "response", r.describe() + r.stderr)
            self.assertEqual(r.payload["event"], {"Records": []})

        def test_a_child_that_answers_then_exits_answered_but_did_not_come_back(self):
            r = run("answer_and_exit")
            self.assertEqual((r.kind, r.exit_code, r.came_back), ("response", 0, False), r.describe() + r.stderr)
            self.assertIn("then exited with status 0", r.describe())

        def test_a_function_error(self):
            r = run("error")
            self.assertEqual(r.kind, "error", r.describe() + r.stderr)
            self.assertEqual(r.error_type, "unhandled")
            self.assertEqual(r.payload["errorMessage"], "table unavailable: connection refused")
            self.assertTrue(r.came_back)

        def test_an_init_error(self):
            r = run("init_error")
            self.assertEqual(r.kind, "init_error", r.describe())
            self.assertEqual(r.error_type, "Runtime.InitError")
            self.assertEqual(r.payload["errorMessage"], "TABLE_NAME is not set")

        def test_a_crash_is_an_exit_with_its_stderr(self):
            r = run("crash")
            self.assertEqual((r.kind, r.exit_code), ("exit", 101), r.describe())
            self.assertIn("panicked", r.stderr)

        def test_an_answer_for_another_request_is_refused(self):
            r = run("wrong_id")
            self.assertEqual((r.kind, r.exit_code), ("exit", 2), r.describe())
            self.assertIn("status 400", r.stderr)

        def test_no_answer_is_a_timeout_and_the_child_is_killed(self):
            r = run("silent", timeout=1.5)
            self.assertEqual(r.kind, "timeout", r.describe())
            self.assertTrue(1.5 <= r.seconds < 4, r.seconds)

        def test_a_missing_bootstrap_is_an_exit(self):
            r = invoke_once([os.path.join(work, "no-such-bootstrap")], {}, timeout=2)
            self.assertEqual(r.kind, "exit")
            self.assertIn("could not be started", r.describe())

    suite = unittest.defaultTestLoader.loadTestsFromTestCase(RuntimeApiTest)
    outcome = unittest.TextTestRunner(verbosity=2).run(suite)
    shutil.rmtree(work, ignore_errors=True)
    failed = len(outcome.failures) + len(outcome.errors)
    print(f"self-test: {outcome.testsRun - failed} passed, {failed} failed")
    return 0 if outcome.wasSuccessful() else 1


def _request_id(result):
    for line in result.requests:
        match = ANSWER.match(line.split(" ", 1)[1])
        if match:
            return match.group(1)
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true", help="run fake bootstraps against the API")
    parser.add_argument("bootstrap", nargs="?", help="the executable to start")
    parser.add_argument("event", nargs="?", help="the event, as JSON")
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--name", default="function", help="AWS_LAMBDA_FUNCTION_NAME")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    if not args.bootstrap or args.event is None:
        parser.error("give a BOOTSTRAP and an EVENT, or --self-test")
    env = dict(pair.split("=", 1) for pair in args.env)
    result = invoke_once([os.path.abspath(args.bootstrap)], json.loads(args.event), args.name, env, args.timeout)
    print(json.dumps(dataclasses.asdict(result), indent=2))
    return 0 if result.kind in ("response", "error") else 1


if __name__ == "__main__":
    sys.exit(main())
