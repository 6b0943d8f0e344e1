#!/usr/bin/env python3
"""A property-based run of schemathesis against the live service: every operation of
openapi.json with generated valid and invalid input, checked for no 5xx, documented statuses
and content types, and answers that fit their schemas.

    scripts/api-fuzz.py [BINARY] [--max-examples N]

BINARY defaults to the debug build (target/debug/message-queue-service, built by the test
suite). schemathesis is installed into target/tools/venv on first use."""

import argparse
import os
import subprocess
import sys
import uuid

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, "target", "tools", "venv")
SCHEMATHESIS = os.path.join(VENV, "bin", "schemathesis")
VERSION = "4.32.5"
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


def step(text: str) -> None:
    print(f"api-fuzz: {text}", flush=True)


def install() -> None:
    if os.path.exists(SCHEMATHESIS):
        return
    step(f"installing schemathesis {VERSION} into {VENV} (once; about a minute)")
    subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", f"schemathesis=={VERSION}"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary", nargs="?", default=os.path.join(ROOT, "target", "debug", "message-queue-service"))
    parser.add_argument("--max-examples", type=int, default=30)
    # A fixed seed keeps the suite repeatable; pass another to explore.
    parser.add_argument("--seed", type=int, default=20261206)
    args = parser.parse_args()
    if not os.path.exists(args.binary):
        print(f"api-fuzz: no binary at {args.binary}; run `cargo build` first", file=sys.stderr)
        return 2
    install()
    tenant = str(uuid.uuid4())
    # Limits off: the run sends thousands of requests as one tenant within seconds.
    env = {"MQ_DEV_MODE": "1", "TENANT_CHANGE_RPS": "0", "TENANT_MONITORING_RPS": "0", "RUST_LOG": "warn"}
    step("starting the service on a fresh database and key prefix")
    with harness.service(args.binary, env) as service:
        client = service.client()
        # Something for the generated names and ids to find.
        client.call("POST", "/api/v1/mq/queues", tenant, {"name": "orders"})
        client.call("POST", "/api/v1/mq/subscriptions", tenant,
                    {"queue": "orders", "consumerGroup": "g", "consumerName": "c",
                     "subscriptionType": "redis_consumer"})
        client.call("POST", "/api/v1/mq/publish", tenant, {"queue": "orders", "payload": {"n": 1}})
        base = f"http://127.0.0.1:{service.port}"
        step(f"schemathesis against {base} (seed {args.seed}, {args.max_examples} examples per operation)")
        command = [
            SCHEMATHESIS, "run", f"{base}/api/v1/mq/openapi.json", "--url", base,
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(args.max_examples),
            "--seed", str(args.seed),
            "--workers", "2",
            "--request-timeout", "30",
            "--suppress-health-check", "all",
            "--generation-database", "none",
            "--no-color",
            "-H", f"Authorization: Bearer {harness.token(tenant)}",
            "-H", f"X-Service-Token: {harness.SERVICE_TOKEN}",
        ]
        # schemathesis keeps a cache of its findings in its working directory.
        result = subprocess.run(command, cwd=os.path.dirname(VENV))
        if service.process.poll() is not None:
            step("the service exited during the run")
            return 1
    step("passed" if result.returncode == 0 else f"failed (schemathesis exit code {result.returncode})")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
