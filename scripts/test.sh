#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL and Redis, bringing them up when needed.
# Each test creates (and drops) its own database on the server at DATABASE_URL and uses its
# own Redis key prefix, so the suite runs in parallel. Extra arguments go to `cargo test`.
# After the Rust suite (on the single Redis), two checks of the live binary: schemathesis
# against its OpenAPI description (scripts/api-fuzz.py) and the console in Debian's chromium
# (scripts/console-test.py); each installs what it needs on first use.
#
#   scripts/test.sh            # against the single Redis at REDIS_URL
#   scripts/test.sh --cluster  # against a local Redis Cluster of 3 masters and 3 replicas
#                              # (scripts/redis-cluster.sh; TEST_REDIS_CLUSTER=1 does the same)
#   TEST_SKIP_LIVE=1 scripts/test.sh   # the Rust suite only
set -euo pipefail
cd "$(dirname "$0")/.."
cluster="${TEST_REDIS_CLUSTER:-}"
if [ "${1:-}" = "--cluster" ]; then
  cluster=1
  shift
fi
export DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
ENSURE_REDIS_SERVER_BINARY=1 scripts/ensure-deps.sh
if [ -n "$cluster" ]; then
  # The tests that cut Redis with a TCP proxy still use the single Redis at REDIS_URL.
  REDIS_CLUSTER_NODES=$(scripts/redis-cluster.sh start | sed 's|redis://||g')
  export REDIS_CLUSTER_NODES
else
  unset REDIS_CLUSTER_NODES
fi
cargo test --locked "$@"
if [ -z "$cluster" ] && [ -z "${TEST_SKIP_LIVE:-}" ]; then
  echo "== schemathesis against the live service (scripts/api-fuzz.py)"
  scripts/api-fuzz.py
  echo "== the console in a browser (scripts/console-test.py)"
  scripts/console-test.py
fi
