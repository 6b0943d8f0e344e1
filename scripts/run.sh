#!/usr/bin/env bash
# Runs the service on PORT (3010), with PostgreSQL and Redis brought up when needed.
# Configuration: the environment first, then .env (created from .env.example on first run)
# for whatever the environment does not set. Arguments go to the binary:
#   scripts/run.sh token --tenant <uuid> --sub <name> [--ttl 1h]   # a development JWT
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .env ] || cp .env.example .env
while IFS= read -r line || [ -n "$line" ]; do
  [[ $line =~ ^[[:space:]]*([A-Z_][A-Z0-9_]*)=(.*)$ ]] || continue
  name=${BASH_REMATCH[1]}
  [ -n "${!name+set}" ] || export "$name=${BASH_REMATCH[2]}"
done < .env
# The token command needs neither PostgreSQL nor Redis.
[ "${1:-}" = token ] || scripts/ensure-deps.sh
exec cargo run --release --bin message-queue-service -- "$@"
