#!/usr/bin/env bash
# Whether the record writer keeps up with a saturating publish load: for each service binary
# given (default: the release build), starts it as scripts/bench.sh does (rate limits off, a
# database and Redis key prefix of its own), runs the same wrk publish load as bench.sh
# (-t2 -c50, 256 B payload) for RECORD_LAG_SECONDS (10), then prints the rate, the p99, the
# share of the messages whose record was already written when the load stopped, and how
# long after it the last one was. Give two binaries twice (a b a b) for an alternating A/B.
#
#   scripts/record-lag.sh [binary ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

port=${RECORD_LAG_PORT:-3021}
seconds=${RECORD_LAG_SECONDS:-10}
server=${BENCH_DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
database=mq_record_lag
prefix=record-lag:
[ $# -gt 0 ] || set -- target/release/message-queue-service
command -v wrk >/dev/null || { echo "wrk is missing (scripts/bench.sh installs it)" >&2; exit 1; }
scripts/ensure-deps.sh >/dev/null

work=$(mktemp -d)
service_pid=
clean() {
  [ -n "$service_pid" ] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null || true
  service_pid=
  redis-cli -u "$redis_url" --scan --pattern "${prefix}*" | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null
  psql "$server/postgres" -qc "drop database if exists $database with (force)" >/dev/null 2>&1
}
trap 'clean; rm -rf "$work"' EXIT

token=$(write_publish_lua "$work/publish.lua")
records="SELECT count(*) FROM message_records r JOIN message_topics t ON t.id = r.topic_id WHERE t.name = 'wrk'"

for binary in "$@"; do
  clean
  psql "$server/postgres" -qc "create database $database" >/dev/null
  start_service "$port" "$server/$database" "$prefix" "$work/service.log" "$binary"
  service_pid=$started_pid
  curl -fs -o /dev/null -X POST "http://127.0.0.1:$port/api/v1/mq/queues" -H "authorization: Bearer $token" \
    -H 'content-type: application/json' -d '{"name":"wrk","partitionCount":4,"maxLength":100000000}'
  wrk -t2 -c50 -d"${seconds}s" --latency -s "$work/publish.lua" "http://127.0.0.1:$port/api/v1/mq/publish" >"$work/wrk.out"
  stopped=$(date +%s.%N)
  published=$(awk '/requests in/ { print $1 }' "$work/wrk.out")
  at_end=$(psql "$server/$database" -tAc "$records")
  count=$at_end
  while [ "$count" -lt "$published" ]; do
    awk -v now="$(date +%s.%N)" -v t="$stopped" 'BEGIN { exit !(now - t > 60) }' && break
    sleep 0.1
    count=$(psql "$server/$database" -tAc "$records")
  done
  after=$(awk -v now="$(date +%s.%N)" -v t="$stopped" 'BEGIN { printf "%.2f", now - t }')
  printf '%s %s: %s req/s, p99 %s; %s published, %s%% recorded when the load stopped, %s after %s s\n' \
    "$(date -u +%H:%M:%S)" "$binary" "$(awk '/Requests\/sec/ { print $2 }' "$work/wrk.out")" \
    "$(awk '$1 == "99%" { print $2 }' "$work/wrk.out")" "$published" \
    "$(awk -v a="$at_end" -v b="$published" 'BEGIN { printf "%.0f", 100 * a / b }')" \
    "$([ "$count" -ge "$published" ] && echo "all" || echo "only $count")" "$after"
done
