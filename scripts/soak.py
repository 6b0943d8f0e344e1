#!/usr/bin/env python3
"""Soak: mixed traffic over two instances for minutes, showing RSS, latency and Redis memory
stay flat (issue 14's soak benchmark; a measurement, not a test).

Starts two instances of the release binary on one database and key prefix, a queue of 4
partitions with a pull subscription and a webhook subscription (to a local receiver), and
for --minutes publishes at --rate msg/s in all (half through each instance, with the send
time in the payload) while a puller on each instance pulls and acks and the receiver takes
the pushes. Each minute it prints, per instance, RSS; per consumer, the p50/p99 of publish
-> delivery latency; Redis used_memory; and the publishes that minute (achieved rate, and
any non-201 answers).

    cargo build --release
    scripts/soak.py                     # 10 minutes at 1000 msg/s
    scripts/soak.py --minutes 2 --rate 500

Needs PostgreSQL and Redis as scripts/ensure-deps.sh provides them; only the Python
standard library, psql and redis-cli.
"""

import argparse
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Client, free_port, percentile, rss_mb, service  # noqa: E402


class Window:
    """Latencies and counts of the current minute, shared by the threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        self.pulled, self.pushed, self.published, self.refused = [], [], 0, {}

    def take(self):
        with self.lock:
            taken = (self.pulled, self.pushed, self.published, self.refused)
            self.reset()
            return taken


def receiver(window: Window) -> http.server.ThreadingHTTPServer:
    class Hook(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint would

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            sent = (body.get("payload") or {}).get("t")
            if sent is not None:
                with window.lock:
                    window.pushed.append(time.time() - sent)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Hook)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def publisher(port: int, tenant: str, rate: float, stop_at: float, window: Window) -> None:
    client = Client(port)
    interval, next_at = 1.0 / rate, time.time()
    while time.time() < stop_at:
        try:
            client.call("POST", "/api/v1/mq/publish", tenant,
                        {"queue": "soak", "payload": {"t": time.time()}}, expect=(201,))
            with window.lock:
                window.published += 1
        except Exception as error:  # noqa: BLE001 - a thread that dies would lower the rate unseen
            text = str(error)
            status = text.split(": ", 1)[1].split()[0] if isinstance(error, RuntimeError) else type(error).__name__
            with window.lock:
                window.refused[status] = window.refused.get(status, 0) + 1
            client = Client(port)
        next_at += interval
        delay = next_at - time.time()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1:
            next_at = time.time()  # behind by over a second: do not burst to catch up


def puller(port: int, tenant: str, subscription: str, stop_at: float, window: Window) -> None:
    client = Client(port)
    while time.time() < stop_at:
        try:
            pulled = client.call("POST", f"/api/v1/mq/subscriptions/{subscription}/pull", tenant,
                                 {"maxMessages": 100, "waitMs": 1000})
        except Exception:  # noqa: BLE001
            client = Client(port)
            time.sleep(0.1)
            continue
        messages = pulled.get("messages") or []
        now = time.time()
        with window.lock:
            window.pulled.extend(now - m["payload"]["t"] for m in messages)
        if messages:
            try:
                client.call("POST", f"/api/v1/mq/subscriptions/{subscription}/ack", tenant,
                            {"ackIds": [m["ackId"] for m in messages]})
            except Exception:  # noqa: BLE001
                client = Client(port)


def redis_memory_mb() -> float:
    """The whole Redis server's used_memory (at REDIS_URL), not only the soak's keys."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    info = subprocess.run(["redis-cli", "-u", url, "info", "memory"],
                          capture_output=True, text=True).stdout
    for line in info.splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1]) / 1e6
    return float("nan")


def ms(values, fraction) -> str:
    return f"{percentile(values, fraction) * 1000:7.1f}" if values else "      -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", default="target/release/message-queue-service")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1000, help="publishes per second in all")
    parser.add_argument("--publishers", type=int, default=8)
    args = parser.parse_args()
    os.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    window = Window()
    hook = receiver(window)
    # Rate limits off: the soak is one tenant at the whole rate.
    env = {"TENANT_RATE_LIMIT_RPS": "0", "TENANT_RATE_LIMIT_BYTES_PER_SEC": "0"}
    with service(args.binary, env) as first, service(args.binary, env, share=first) as second:
        tenant = str(uuid.uuid4())
        client = first.client()
        client.call("POST", "/api/v1/mq/queues", tenant,
                    {"name": "soak", "partitionCount": 4, "maxLength": 1_000_000})
        pull = client.call("POST", "/api/v1/mq/subscriptions", tenant, {
            "queue": "soak", "consumerGroup": "pull", "consumerName": "p",
            "subscriptionType": "redis_consumer"})["id"]
        client.call("POST", "/api/v1/mq/subscriptions", tenant, {
            "queue": "soak", "consumerGroup": "hook", "consumerName": "h",
            "subscriptionType": "webhook",
            "handlerConfig": {"url": f"http://127.0.0.1:{hook.server_address[1]}/hook"}})
        stop_at = time.time() + args.minutes * 60
        instances = [first, second]
        threads = [threading.Thread(target=publisher, args=(
            instances[n % 2].port, tenant, args.rate / args.publishers, stop_at, window))
            for n in range(args.publishers)]
        threads += [threading.Thread(target=puller, args=(i.port, tenant, pull, stop_at, window))
                    for i in instances]
        for thread in threads:
            thread.start()
        print("minute  RSS A MB  RSS B MB  Redis MB  published/s  pull p50/p99 ms   "
              "webhook p50/p99 ms  refused", flush=True)
        minute = 0
        while time.time() < stop_at:
            began = time.time()
            time.sleep(min(60, max(0, stop_at - time.time())))
            minute += 1
            pulled, pushed, published, refused = window.take()
            elapsed = max(time.time() - began, 1e-3)
            print(f"{minute:6d}  {rss_mb(first.process.pid):8.1f}  {rss_mb(second.process.pid):8.1f}"
                  f"  {redis_memory_mb():8.1f}  {published / elapsed:11.0f}  {ms(pulled, .5)} {ms(pulled, .99)}"
                  f"    {ms(pushed, .5)} {ms(pushed, .99)}     {refused or '-'}", flush=True)
        for thread in threads:
            thread.join()
    hook.shutdown()


if __name__ == "__main__":
    main()
