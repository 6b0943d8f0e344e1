#!/usr/bin/env bash
# Checks that both compose setups are valid: the default one (secrets from the environment,
# here none: it must still parse) and the development override. Uses `docker compose`, or
# `docker-compose` (Debian's package, installed when neither is present).
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  if ! command -v docker-compose >/dev/null; then
    echo "check-compose: installing docker-compose to validate the compose files" >&2
    if [ "$(id -u)" -eq 0 ]; then as_root=(); else as_root=(sudo); fi
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq docker-compose >/dev/null
  fi
  compose=(docker-compose)
fi
env -u JWT_SECRET -u INTERNAL_SERVICE_TOKEN -u POSTGRES_PASSWORD \
  "${compose[@]}" -f docker-compose.yml config >/dev/null
"${compose[@]}" -f docker-compose.yml -f docker-compose.dev.yml config >/dev/null
echo "check-compose: docker-compose.yml and its development override are valid"
