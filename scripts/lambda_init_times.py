#!/usr/bin/env python3
"""Each Lambda binary's size and init time, as docs/PERFORMANCE.md reports them.

Init time is what Lambda's cold start adds for our code: from the process's start to its first
`GET /runtime/invocation/next`, with the function's environment from template.yaml and every
AWS endpoint a closed loopback port (as scripts/package_check.py runs them). Each binary is
started --runs times; the median and the spread are printed, with the binary's size on disk.

Usage: scripts/lambda_init_times.py [--binaries target/release] [--runs 7] [--template template.yaml]
(build first: cargo build --release --bins -p <the crates that hold them>)
"""

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import lambda_runtime_api  # noqa: E402
import package_check  # noqa: E402


def init_time(binary, env, name):
    """Seconds from spawn to the first `next`, or None if it never asked."""
    api = lambda_runtime_api.RuntimeApi(b"{}", name, 10)
    child_env = lambda_runtime_api.lambda_environment(name, api.address, str(binary.parent))
    child_env.update(env)
    started = time.monotonic()
    child = subprocess.Popen([str(binary)], cwd=str(binary.parent), env=child_env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while not api.requests:
            if child.poll() is not None or time.monotonic() - started > 10:
                return None
            time.sleep(0.0002)
        return time.monotonic() - started
    finally:
        child.kill()
        child.wait()
        api.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binaries", default="target/release")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--template", default="template.yaml")
    args = parser.parse_args()
    template = package_check.load_template(args.template)
    keeper, port = package_check.closed_port()
    print("| function | binary | size | init time (median of %d) | min–max |" % args.runs)
    print("|---|---|---|---|---|")
    failed = False
    try:
        for name, function in package_check.functions(template).items():
            binary_name = function.get("Metadata", {}).get("BuildProperties", {}).get("Binary", "?")
            binary = pathlib.Path(args.binaries).resolve() / binary_name
            if not binary.exists():
                print(f"| {name} | {binary_name} | missing: {binary} | | |")
                failed = True
                continue
            with tempfile.TemporaryDirectory(prefix=f"init-{binary_name}-") as work:
                env = package_check.environment(template, name, function, port, work)
                for empty in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
                    pathlib.Path(env[empty]).touch()
                times = [init_time(binary, env, name) for _ in range(args.runs)]
            if None in times:
                print(f"| {name} | {binary_name} | | never asked for an event | |")
                failed = True
                continue
            size = os.path.getsize(binary) / (1 << 20)
            ms = sorted(t * 1000 for t in times)
            print(f"| {name} | {binary_name} | {size:.1f} MiB | {statistics.median(ms):.1f} ms | "
                  f"{ms[0]:.1f}–{ms[-1]:.1f} ms |")
    finally:
        keeper.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
