#!/usr/bin/env bash
# Runs the whole test suite against real PostgreSQL and Redis, bringing them up when needed.
# Each test creates (and drops) its own database on the server at DATABASE_URL and uses its
# own Redis key prefix, so the suite runs in parallel. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
ENSURE_REDIS_SERVER_BINARY=1 scripts/ensure-deps.sh
exec cargo test --locked "$@"
