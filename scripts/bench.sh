#!/usr/bin/env bash
# The side-by-side, in one run on this machine: the Redis ceiling (redis-benchmark XADD at
# -c 50), the HTTP floor (benches/floor.rs: the least any HTTP service answering the same
# publish does, under the same wrk load) and the service's own figures, each printed with
# its ratio to both.
#
# Starts the service itself (release build, rate limits off, a database and Redis key prefix
# of its own) and removes all of it afterwards. Nothing else should use the Redis meanwhile:
# the idle step counts every command the server processes.
#
# Settings (environment): BENCH_PORT (3011), BENCH_LOAD_SECONDS (15, each wrk run),
# BENCH_IDLE_COUNTS (0,100,1000,10000), BENCH_SKIP (space-separated steps to leave out:
# ceiling floor wrk publish webhook consume cross idle).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh

port=${BENCH_PORT:-3011}
load_seconds=${BENCH_LOAD_SECONDS:-15}
idle_counts=${BENCH_IDLE_COUNTS:-0,100,1000,10000}
skip=" ${BENCH_SKIP:-} "
redis_url=${REDIS_URL:-redis://127.0.0.1:6379}
hostport=${redis_url#redis://}
hostport=${hostport%%/*}
redis_host=${hostport%%:*}
redis_port=${hostport##*:}
[ "$redis_port" = "$hostport" ] && redis_port=6379
database_server=${BENCH_DATABASE_SERVER:-postgres://postgres@127.0.0.1:5432}
database=mq_bench
prefix=bench:
work=$(mktemp -d)
log=$work/service.log
summary=$work/summary

say() { printf '\n== %s\n' "$*"; }
wanted() { [[ $skip != *" $1 "* ]]; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f %%", 100 * a / b; else print "n/a" }'; }
# A figure against both references: "x % of XADD, y of the floor".
against() {
  printf '%s of XADD, %s of the floor' "$(ratio "$1" "$ceiling")" \
    "$(awk -v a="$1" -v b="$floor" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }')"
}
record() { printf '%s\n' "$*" | tee -a "$summary"; }

scripts/ensure-deps.sh
if ! command -v wrk >/dev/null; then
  say "installing wrk (the HTTP load generator)"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
  else
    echo "wrk is missing and cannot be installed here (needs apt-get as root); install it and run again" >&2
    exit 1
  fi
fi

say "building (release)"
cargo build --release --locked --bin message-queue-service
cargo bench --locked --no-run --bench publish --bench webhook --bench consume --bench idle \
  --bench floor 2>"$work/build.log" || { cat "$work/build.log"; exit 1; }
floor_binary=$(grep -o 'target/release/deps/floor-[0-9a-f]*' "$work/build.log" | tail -1 || true)

service_pid=
sibling_pid=
floor_pid=
cleanup() {
  for pid in $floor_pid $sibling_pid $service_pid; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  redis-cli -h "$redis_host" -p "$redis_port" --scan --pattern "${prefix}*" 2>/dev/null |
    xargs -r -n 500 redis-cli -h "$redis_host" -p "$redis_port" unlink >/dev/null 2>&1 || true
  psql "$database_server/postgres" -qc "drop database if exists $database with (force)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

say "starting the service on port $port (database $database, key prefix $prefix)"
psql "$database_server/postgres" -qc "drop database if exists $database with (force)" >/dev/null
psql "$database_server/postgres" -qc "create database $database" >/dev/null
redis-cli -h "$redis_host" -p "$redis_port" --scan --pattern "${prefix}*" |
  xargs -r -n 500 redis-cli -h "$redis_host" -p "$redis_port" unlink >/dev/null
start_service "$port" "$database_server/$database" "$prefix" "$log"
service_pid=$started_pid
url=http://127.0.0.1:$port
export BENCH_URL=$url BENCH_SERVICE_PID=$service_pid REDIS_URL=$redis_url

rss_mb() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$service_pid/status"; }
# Samples the service's RSS every 200 ms into $1 until killed.
sample_rss() { while :; do rss_mb >>"$1"; echo >>"$1"; sleep 0.2; done; }
max_of() { sort -n "$1" | tail -1; }

echo "$(date -u +%FT%TZ) on $(nproc) cores, $(redis-server --version | cut -d' ' -f3), service at $url" | tee "$summary"

ceiling=0
if wanted ceiling; then
  say "ceiling: redis-benchmark XADD, 256 B, -c 50"
  payload=$(head -c 256 /dev/zero | tr '\0' x)
  line=$(redis-benchmark -h "$redis_host" -p "$redis_port" -c 50 -n 300000 -q \
    XADD "${prefix}ceiling" MAXLEN '~' 100000 '*' payload "$payload" 2>/dev/null | tr '\r' '\n' | grep 'requests per second' | tail -1)
  ceiling=$(sed -E 's/.*: ([0-9.]+) requests per second.*/\1/' <<<"$line")
  record "redis-benchmark -c 50 XADD 256 B: $ceiling ops/s (the ceiling) [${line##*per second, }]"
  redis-cli -h "$redis_host" -p "$redis_port" unlink "${prefix}ceiling" >/dev/null
fi

# The same request for the floor and the service: 256 B of payload, one bearer token.
token=$(write_publish_lua "$work/publish.lua")
# Runs wrk -c 50 against base URL $1, its report into $2.
wrk_publish() {
  wrk -t2 -c50 -d"${load_seconds}s" --latency -s "$work/publish.lua" "$1/api/v1/mq/publish" >"$2"
}

floor=0
if wanted floor; then
  say "floor: benches/floor.rs (JWT, JSON, one EVALSHA XADD, the same crates), wrk -c 50 for ${load_seconds} s"
  if [ -z "$floor_binary" ] || [ ! -x "$floor_binary" ]; then
    echo "the floor's binary was not found in cargo's output (target/release/deps/floor-*): is CARGO_TARGET_DIR set? BENCH_SKIP=floor leaves it out" >&2
    exit 1
  fi
  floor_port=$((port + 2))
  FLOOR_PORT=$floor_port FLOOR_PREFIX="${prefix}floor:" REDIS_URL=$redis_url "$floor_binary" >"$work/floor.log" 2>&1 &
  floor_pid=$!
  for _ in $(seq 50); do
    grep -q listening "$work/floor.log" && break
    kill -0 "$floor_pid" 2>/dev/null || { echo "the floor did not start:" >&2; cat "$work/floor.log" >&2; exit 1; }
    sleep 0.1
  done
  wrk_publish "http://127.0.0.1:$floor_port" "$work/floor.out"
  kill -INT "$floor_pid" && wait "$floor_pid" 2>/dev/null || true
  floor_pid=
  floor=$(awk '/Requests\/sec/ { print $2 }' "$work/floor.out")
  record "floor POST /publish wrk -c 50: $floor req/s = $(ratio "$floor" "$ceiling") of XADD; p50 $(awk '$1 == "50%" { print $2 }' "$work/floor.out") p99 $(awk '$1 == "99%" { print $2 }' "$work/floor.out"); non-2xx $(awk '/Non-2xx/ { print $NF }' "$work/floor.out")"
fi

if wanted wrk; then
  say "POST /publish, 256 B, 4 partitions, wrk -c 50 for ${load_seconds} s"
  curl -fs -o /dev/null -X POST "$url/api/v1/mq/queues" -H "authorization: Bearer $token" \
    -H 'content-type: application/json' -d '{"name":"wrk","partitionCount":4,"maxLength":100000000}'
  sample_rss "$work/rss-wrk" & sampler=$!
  wrk_publish "$url" "$work/wrk.out"
  kill $sampler
  rps=$(awk '/Requests\/sec/ { print $2 }' "$work/wrk.out")
  p99=$(awk '$1 == "99%" { print $2 }' "$work/wrk.out")
  p50=$(awk '$1 == "50%" { print $2 }' "$work/wrk.out")
  non2xx=$(awk '/Non-2xx/ { print $NF }' "$work/wrk.out")
  record "POST /publish wrk -c 50: $rps req/s = $(against "$rps"); p50 $p50 p99 $p99; non-2xx ${non2xx:-0}; RSS max $(max_of "$work/rss-wrk") MB"
fi

run_bench() {
  local name=$1
  shift
  say "cargo bench --bench $name"
  env "$@" cargo bench --locked --bench "$name" 2>/dev/null | tee "$work/$name.out"
}

if wanted publish; then
  run_bench publish
  for label in single "batch of"; do
    line=$(grep "^$label" "$work/publish.out")
    rate=$(sed -E 's/.* = ([0-9]+) msg\/s.*/\1/' <<<"$line")
    record "bench publish $label: $rate msg/s = $(against "$rate") [${line#*; }]"
  done
fi

# A delivery benchmark: latency at a fixed rate, then sustained throughput, with RSS sampled.
# Arguments: the benchmark, the start of its latency line, of its throughput line, a label.
delivery_bench() {
  local name=$1 latency_line=$2 sustained_line=$3 label=$4 sampler latency rate
  sample_rss "$work/rss-$name" & sampler=$!
  run_bench "$name"
  kill $sampler
  latency=$(grep "^$latency_line" "$work/$name.out")
  rate=$(grep "^$sustained_line" "$work/$name.out" | sed -E 's/.* = ([0-9]+) msg\/s.*/\1/')
  record "bench $name at 1000 msg/s: ${latency#*; }"
  record "bench $name $label: $rate msg/s = $(against "$rate"); RSS max $(max_of "$work/rss-$name") MB"
}
wanted webhook && delivery_bench webhook 'publish -> webhook' 'sustained delivery' sustained
wanted consume && delivery_bench consume 'publish -> pull' 'sustained publish' 'sustained publish+pull+ack'

if wanted cross; then
  say "a second instance on port $((port + 1)): publishes on the first, consumers on the second"
  start_service $((port + 1)) "$database_server/$database" "$prefix" "$work/sibling.log"
  sibling_pid=$started_pid
  run_bench consume BENCH_CONSUMER_URL="http://127.0.0.1:$((port + 1))" BENCH_THROUGHPUT_MESSAGES=50000
  latency=$(grep '^publish -> pull' "$work/consume.out")
  rate=$(grep '^sustained publish' "$work/consume.out" | sed -E 's/.* = ([0-9]+) msg\/s.*/\1/')
  record "bench consume across instances at 1000 msg/s: ${latency#*; }"
  record "bench consume across instances, sustained publish+pull+ack: $rate msg/s = $(against "$rate")"
  kill "$sibling_pid" && wait "$sibling_pid" 2>/dev/null || true
  sibling_pid=
fi

if wanted idle; then
  run_bench idle BENCH_IDLE_COUNTS="$idle_counts"
  grep '^idle' "$work/idle.out" | while IFS= read -r line; do record "$line"; done
fi

say "summary"
cat "$summary"
if grep -qiE 'panicked|error' "$log"; then
  echo "the service logged errors meanwhile:" >&2
  grep -iE 'panicked|error' "$log" | tail -5 >&2
fi
