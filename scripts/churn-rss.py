#!/usr/bin/env python3
"""Measures whether the service's memory follows what exists, not what ever existed.

Starts the release binary on a fresh database and Redis key prefix, then repeats a cycle
that a platform with many short-lived tenants produces: a new tenant creates a queue, a
webhook subscription to it, publishes a message, deletes the subscription and the queue.
Prints the service's resident memory (VmRSS) at the start, after a warm-up and every few
hundred cycles, and again after an idle minute (in-process rate windows look back one
minute, latency windows five).

    cargo build --release
    scripts/churn-rss.py                 # 2000 cycles
    scripts/churn-rss.py --cycles 500 --idle 0

Needs PostgreSQL and Redis as scripts/ensure-deps.sh provides them; only the Python
standard library. Exits non-zero when RSS after the cycles is more than --budget-mb above
RSS after the warm-up.
"""

import argparse
import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import uuid

SECRET = "churn-rss-jwt-secret-0123456789abcdef0123456789"
SERVICE_TOKEN = "churn-rss-service-token-0123456789abcdef0123"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(tenant: str) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"tenant_id": tenant, "sub": "churn", "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Client:
    def __init__(self, port: int):
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, tenant: str, body=None, expect=(200, 201, 204)):
        headers = {"authorization": f"Bearer {token(tenant)}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        text = response.read()
        if response.status not in expect:
            raise RuntimeError(f"{method} {path}: {response.status} {text[:300]!r}")
        return json.loads(text) if text else None


def cycle(client: Client, webhook_port: int) -> None:
    tenant = str(uuid.uuid4())
    client.call("POST", "/api/v1/mq/queues", tenant, {"name": "churn"})
    subscription = client.call("POST", "/api/v1/mq/subscriptions", tenant, {
        "queue": "churn", "consumerGroup": "g", "consumerName": "c",
        "subscriptionType": "webhook",
        "handlerConfig": {"url": f"http://127.0.0.1:{webhook_port}/hook"},
    })
    client.call("POST", "/api/v1/mq/publish", tenant, {"queue": "churn", "payload": {"n": 1}})
    client.call("DELETE", f"/api/v1/mq/subscriptions/{subscription['id']}", tenant)
    client.call("DELETE", "/api/v1/mq/queues/churn", tenant)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--idle", type=int, default=70, help="seconds to wait idle before the last reading")
    parser.add_argument("--budget-mb", type=float, default=10.0)
    parser.add_argument("--binary", default="target/release/message-queue-service")
    args = parser.parse_args()

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.chdir(root)
    server_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    database = f"churn_{uuid.uuid4().hex[:12]}"
    base = server_url.rsplit("/", 1)[0]
    subprocess.run(["psql", server_url, "-qc", f'CREATE DATABASE "{database}"'], check=True)
    prefix = f"churn:{uuid.uuid4().hex[:12]}:"
    port = free_port()
    # Pushes go to a closed port: they fail and are retried, as a dead endpoint's would.
    webhook_port = free_port()
    env = dict(os.environ,
               PORT=str(port), DATABASE_URL=f"{base}/{database}",
               REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
               REDIS_KEY_PREFIX=prefix, JWT_SECRET=SECRET, INTERNAL_SERVICE_TOKEN=SERVICE_TOKEN,
               TENANT_RATE_LIMIT_RPS="0", TENANT_RATE_LIMIT_BYTES_PER_SEC="0",
               RUST_LOG="error")
    service = subprocess.Popen([args.binary], env=env, stdout=subprocess.DEVNULL)
    try:
        client = Client(port)
        for _ in range(100):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/api/v1/mq/health")
                if connection.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        started = rss_mb(service.pid)
        for _ in range(args.warmup):
            cycle(client, webhook_port)
        warm = rss_mb(service.pid)
        print(f"RSS at start {started:.1f} MB; after {args.warmup} warm-up cycles {warm:.1f} MB")
        began = time.time()
        for n in range(1, args.cycles + 1):
            cycle(client, webhook_port)
            if n % 250 == 0 or n == args.cycles:
                print(f"after {n:5d} cycles ({time.time() - began:5.0f} s): RSS {rss_mb(service.pid):.1f} MB")
        after = rss_mb(service.pid)
        print(f"growth over {args.cycles} cycles: {after - warm:+.1f} MB (budget {args.budget_mb} MB)")
        if args.idle:
            time.sleep(args.idle)
            print(f"after {args.idle} s idle: RSS {rss_mb(service.pid):.1f} MB "
                  f"({rss_mb(service.pid) - warm:+.1f} MB)")
        return 0 if after - warm <= args.budget_mb else 1
    finally:
        service.terminate()
        service.wait(timeout=30)
        subprocess.run(["psql", server_url, "-qc", f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'])
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{prefix}*"],
                              capture_output=True, text=True).stdout.split()
        for start in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "UNLINK", *keys[start:start + 500]], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
