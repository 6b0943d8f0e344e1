#!/usr/bin/env python3
"""Measures what REDIS_MIN_REPLICAS_ACK costs a publish, on the local Redis Cluster.

Starts the release binary on the cluster of scripts/redis-cluster.sh (3 masters, a replica
each) once with REDIS_MIN_REPLICAS_ACK=0 and once with 1, in the same run, and for each has
--clients threads publish small messages to one queue for --seconds. Prints publishes per
second and the p50/p99 latency of each.

    cargo build --release
    scripts/redis-cluster.sh start
    scripts/replica-ack.py --seconds 20

Needs PostgreSQL as scripts/ensure-deps.sh provides it; only the Python standard library,
psql and redis-cli.
"""

import argparse
import os
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import percentile, service  # noqa: E402

BASE = int(os.environ.get("REDIS_CLUSTER_BASE_PORT", "7100"))
PORTS = [BASE + n for n in range(6)]


def remove_cluster_keys(prefix: str) -> None:
    for port in PORTS:
        keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}*"],
                              capture_output=True, text=True).stdout.split()
        for key in keys:
            subprocess.run(["redis-cli", "-p", str(port), "UNLINK", key], capture_output=True)


def measure(binary: str, replicas: int, clients: int, seconds: float) -> tuple:
    env = {"REDIS_CLUSTER_NODES": ",".join(f"127.0.0.1:{p}" for p in PORTS),
           "REDIS_MIN_REPLICAS_ACK": str(replicas)}
    with service(binary, env) as running:
        tenant = str(uuid.uuid4())
        running.client().call("POST", "/api/v1/mq/queues", tenant,
                              {"name": "acked", "maxLength": 10_000_000})
        latencies, lock = [], threading.Lock()
        stop_at = time.time() + seconds

        def publish():
            client, mine = running.client(), []
            while time.time() < stop_at:
                began = time.perf_counter()
                client.call("POST", "/api/v1/mq/publish", tenant,
                            {"queue": "acked", "payload": {"n": 1}})
                mine.append(time.perf_counter() - began)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=publish) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        remove_cluster_keys(running.prefix)
        return (len(latencies) / seconds, percentile(latencies, 0.5) * 1000,
                percentile(latencies, 0.99) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/message-queue-service")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    for replicas in (0, 1):
        rate, p50, p99 = measure(args.binary, replicas, args.clients, args.seconds)
        print(f"REDIS_MIN_REPLICAS_ACK={replicas}: {rate:.0f} publishes/s, "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
