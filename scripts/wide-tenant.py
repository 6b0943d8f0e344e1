#!/usr/bin/env python3
"""Measures what one tenant's large setup costs another tenant (issue 26's benchmark).

Starts the release binary on a fresh database and Redis key prefix. A quiet tenant publishes
at --rate msg/s to one queue for --baseline seconds; then a wide tenant creates --queues
queues of 64 partitions with one message each (they stay active: every sweeping worker
visits them), and the quiet tenant publishes again for --seconds (longer than the 30 s
sweeps and safety looks). Prints for both phases the quiet tenant's publish p50/p99 and how
long its messages took to reach `message_records` (p50/p99/max), the wide tenant's first
`GET /api/v1/mq/metrics`, and how long SIGTERM took to stop the service.

    cargo build --release
    scripts/wide-tenant.py                      # 1000 queues x 64 partitions
    scripts/wide-tenant.py --queues 300 --seconds 40

Needs PostgreSQL and Redis as scripts/ensure-deps.sh provides them; only the Python
standard library and psql.
"""

import argparse
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import percentile, service  # noqa: E402


def publish_at_rate(client, tenant: str, queue: str, rate: int, seconds: float) -> list:
    latencies = []
    began = time.time()
    sent = 0
    while time.time() - began < seconds:
        due = began + sent / rate
        if due > time.time():
            time.sleep(due - time.time())
        start = time.perf_counter()
        client.call("POST", "/api/v1/mq/publish", tenant, {"queue": queue, "payload": {"n": sent}})
        latencies.append((time.perf_counter() - start) * 1000)
        sent += 1
    return latencies


def record_lags(running, queue_name: str, tenant: str, expected: int) -> list:
    """Seconds from publish to record, once every message is recorded (or 60 s passed)."""
    sql_count = (f"SELECT count(*) FROM message_records r JOIN message_topics t ON t.id = r.topic_id "
                 f"WHERE t.tenant_id = '{tenant}' AND t.name = '{queue_name}'")
    for _ in range(600):
        if int(running.psql(sql_count) or 0) >= expected:
            break
        time.sleep(0.1)
    rows = running.psql(
        f"SELECT extract(epoch FROM r.updated_at - r.published_at) FROM message_records r "
        f"JOIN message_topics t ON t.id = r.topic_id "
        f"WHERE t.tenant_id = '{tenant}' AND t.name = '{queue_name}'")
    return [float(line) for line in rows.splitlines() if line]


def report(label: str, latencies: list, lags: list, expected: int) -> None:
    print(f"{label}: {len(latencies)} publishes, p50 {percentile(latencies, 0.5):.2f} ms, "
          f"p99 {percentile(latencies, 0.99):.2f} ms; recorded {len(lags)}/{expected}, "
          f"publish->record p50 {percentile(lags, 0.5):.3f} s, p99 {percentile(lags, 0.99):.3f} s, "
          f"max {max(lags, default=float('nan')):.3f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--baseline", type=float, default=10)
    parser.add_argument("--seconds", type=float, default=70)
    parser.add_argument("--binary", default="target/release/message-queue-service")
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    # Management limits off: the setup is made as fast as it can be.
    env = {"TENANT_CHANGE_RPS": "0", "TENANT_MONITORING_RPS": "0",
           "TENANT_MAX_QUEUES": str(max(1000, args.queues + 10))}
    with service(args.binary, env) as running:
        client = running.client()
        quiet, wide = str(uuid.uuid4()), str(uuid.uuid4())
        for name in ("before", "after"):
            client.call("POST", "/api/v1/mq/queues", quiet, {"name": name})

        latencies = publish_at_rate(client, quiet, "before", args.rate, args.baseline)
        report("no other setup", latencies, record_lags(running, "before", quiet, len(latencies)),
               len(latencies))

        began = time.time()
        for n in range(args.queues):
            client.call("POST", "/api/v1/mq/queues", wide,
                        {"name": f"wide-{n}", "partitionCount": args.partitions})
            client.call("POST", "/api/v1/mq/publish", wide,
                        {"queue": f"wide-{n}", "payload": {"n": n}})
        print(f"wide tenant: {args.queues} queues x {args.partitions} partitions, one message each, "
              f"made in {time.time() - began:.1f} s", flush=True)
        start = time.perf_counter()
        client.call("GET", "/api/v1/mq/metrics", wide)
        print(f"wide tenant's GET /api/v1/mq/metrics: {(time.perf_counter() - start) * 1000:.0f} ms",
              flush=True)

        latencies = publish_at_rate(client, quiet, "after", args.rate, args.seconds)
        report(f"beside {args.queues} x {args.partitions}", latencies,
               record_lags(running, "after", quiet, len(latencies)), len(latencies))
        print(f"SIGTERM to exit: {running.stop():.2f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
