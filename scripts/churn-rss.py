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
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import rss_mb, free_port, service  # noqa: E402


def cycle(client, webhook_port: int) -> None:
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

    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # Pushes go to a closed port: they fail and are retried, as a dead endpoint's would.
    webhook_port = free_port()
    with service(args.binary) as running:
        pid = running.process.pid
        client = running.client()
        started = rss_mb(pid)
        for _ in range(args.warmup):
            cycle(client, webhook_port)
        warm = rss_mb(pid)
        print(f"RSS at start {started:.1f} MB; after {args.warmup} warm-up cycles {warm:.1f} MB")
        began = time.time()
        for n in range(1, args.cycles + 1):
            cycle(client, webhook_port)
            if n % 250 == 0 or n == args.cycles:
                print(f"after {n:5d} cycles ({time.time() - began:5.0f} s): RSS {rss_mb(pid):.1f} MB")
        after = rss_mb(pid)
        print(f"growth over {args.cycles} cycles: {after - warm:+.1f} MB (budget {args.budget_mb} MB)")
        idled = 0
        while idled < args.idle:
            step = min(10, args.idle - idled)
            time.sleep(step)
            idled += step
            if idled % 30 == 0 or idled == args.idle:
                print(f"after {idled} s idle: RSS {rss_mb(pid):.1f} MB ({rss_mb(pid) - warm:+.1f} MB)")
        return 0 if after - warm <= args.budget_mb else 1


if __name__ == "__main__":
    sys.exit(main())
