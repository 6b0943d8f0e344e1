#!/usr/bin/env bash
# A local Redis Cluster for tests and benchmarks: 3 masters with one replica each, on six
# ports from REDIS_CLUSTER_BASE_PORT (default 7100). Nothing is kept on disk.
#
#   scripts/redis-cluster.sh start   # starts it (or reuses one that is up); prints the seeds
#   scripts/redis-cluster.sh stop    # stops the six servers it started
set -euo pipefail
cd "$(dirname "$0")/.."

base=${REDIS_CLUSTER_BASE_PORT:-7100}
dir="$PWD/.local/redis-cluster"
ports=$(seq "$base" $((base + 5)))
seeds=$(for port in $ports; do printf '127.0.0.1:%s,' "$port"; done)
seeds=${seeds%,}

cluster_ok() {
  timeout 5 redis-cli -p "$base" cluster info 2>/dev/null | grep -q '^cluster_state:ok'
}

start() {
  command -v redis-server >/dev/null || {
    echo "redis-cluster: redis-server is not installed" >&2
    exit 1
  }
  if cluster_ok; then
    echo "$seeds"
    return
  fi
  mkdir -p "$dir"
  echo "redis-cluster: starting 6 nodes on ports $base-$((base + 5)) (logs in $dir)" >&2
  for port in $ports; do
    if ! timeout 2 redis-cli -p "$port" ping >/dev/null 2>&1; then
      # A replica writes the snapshot it syncs from to its dbfilename even with --save '':
      # a file per node, removed here, so a restarted node starts empty and can join.
      rm -f "$dir/nodes-$port.conf" "$dir/dump-$port.rdb"
      # A node times out after 2 s: a failover in a test takes seconds, not the default 15.
      redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
        --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
        --cluster-node-timeout 2000 --save '' --appendonly no \
        --dir "$dir" --dbfilename "dump-$port.rdb" \
        --pidfile "$dir/redis-$port.pid" --logfile "$dir/redis-$port.log"
    fi
  done
  for port in $ports; do
    for _ in $(seq 1 50); do
      timeout 2 redis-cli -p "$port" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  echo "redis-cluster: creating the cluster (3 masters, 3 replicas)" >&2
  # shellcheck disable=SC2046
  timeout 60 redis-cli --cluster create $(for port in $ports; do echo "127.0.0.1:$port"; done) \
    --cluster-replicas 1 --cluster-yes >"$dir/create.log" 2>&1 || {
    cat "$dir/create.log" >&2
    echo "redis-cluster: creating failed; 'scripts/redis-cluster.sh stop' and start again" \
      "(a node left from an earlier cluster refuses to join a new one)" >&2
    exit 1
  }
  for _ in $(seq 1 100); do
    if cluster_ok; then
      echo "$seeds"
      return
    fi
    sleep 0.2
  done
  echo "redis-cluster: the cluster did not become ready; see $dir/redis-$base.log" >&2
  exit 1
}

stop() {
  for port in $ports; do
    if [ -f "$dir/redis-$port.pid" ]; then
      kill "$(cat "$dir/redis-$port.pid")" 2>/dev/null || true
      rm -f "$dir/redis-$port.pid"
    fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
