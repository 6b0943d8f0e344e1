#!/usr/bin/env bash
# Makes sure PostgreSQL and Redis answer at DATABASE_URL and REDIS_URL, starting them when
# they do not: with docker compose when a Docker engine runs, otherwise as local processes
# (installing the Debian packages first when the binaries are missing).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${DATABASE_URL:=postgres://postgres@127.0.0.1:5432/message_queue}"
: "${REDIS_URL:=redis://127.0.0.1:6379}"

# host and port of a URL: scheme://[user[:pass]@]host[:port][/...]
url_host() { local rest=${1#*://}; rest=${rest##*@}; rest=${rest%%/*}; rest=${rest%%\?*}; echo "${rest%%:*}"; }
url_port() {
  local rest=${1#*://}; rest=${rest##*@}; rest=${rest%%/*}; rest=${rest%%\?*}
  if [[ $rest == *:* ]]; then echo "${rest##*:}"; else echo "$2"; fi
}
url_database() {
  local rest=${1#*://}; rest=${rest##*@}
  if [[ $rest == */* ]]; then rest=${rest#*/}; echo "${rest%%\?*}"; fi
}

pg_host=$(url_host "$DATABASE_URL"); pg_port=$(url_port "$DATABASE_URL" 5432)
redis_host=$(url_host "$REDIS_URL"); redis_port=$(url_port "$REDIS_URL" 6379)

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {
  local name=$1 host=$2 port=$3 hint=$4
  for attempt in $(seq 1 60); do
    port_open "$host" "$port" && return 0
    [ "$attempt" = 4 ] && echo "ensure-deps: waiting for $name on $host:$port (up to 30 s)" >&2
    sleep 0.5
  done
  echo "ensure-deps: $name did not come up on $host:$port; $hint" >&2
  exit 1
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  echo "ensure-deps: installing $*" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

start_local_redis() {
  command -v redis-server >/dev/null || apt_install redis-server
  echo "ensure-deps: starting redis-server on port $redis_port" >&2
  mkdir -p .local/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port "$redis_port" \
    --dir "$PWD/.local/redis" --appendonly yes --logfile "$PWD/.local/redis/redis.log"
}

start_local_postgres() {
  if ! command -v pg_ctlcluster >/dev/null || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
    apt_install postgresql
  fi
  local version
  version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
  if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -q "^$version main$"; then
    as_root pg_createcluster "$version" main -p "$pg_port" >/dev/null
    # Development only: local connections without a password, like the project's machines.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    as_root sed -i -E 's/(scram-sha-256|md5|peer)$/trust/' "$hba"
  fi
  echo "ensure-deps: starting PostgreSQL $version cluster 'main'" >&2
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
}

need_pg=0; need_redis=0
port_open "$pg_host" "$pg_port" || need_pg=1
port_open "$redis_host" "$redis_port" || need_redis=1

if [ $need_pg -eq 1 ] || [ $need_redis -eq 1 ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    services=()
    [ $need_pg -eq 1 ] && services+=(postgres)
    [ $need_redis -eq 1 ] && services+=(redis)
    echo "ensure-deps: docker compose (development override) up -d ${services[*]}" >&2
    docker compose -f docker-compose.yml -f docker-compose.dev.yml up -d "${services[@]}"
  else
    [ $need_redis -eq 1 ] && start_local_redis
    [ $need_pg -eq 1 ] && start_local_postgres
  fi
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    hint="see \`docker compose logs\`"
  else
    hint="see .local/redis/redis.log for Redis, \`pg_lsclusters\` and /var/log/postgresql for PostgreSQL"
  fi
  wait_for PostgreSQL "$pg_host" "$pg_port" "$hint"
  wait_for Redis "$redis_host" "$redis_port" "$hint"
fi

# The fault tests start a private redis-server of their own, so the test command needs the
# binary even when the shared Redis runs elsewhere (e.g. in a container).
if [ "${ENSURE_REDIS_SERVER_BINARY:-0}" = 1 ] && ! command -v redis-server >/dev/null; then
  apt_install redis-server
fi

# The service's own database (tests make private ones of their own).
database=$(url_database "$DATABASE_URL")
if [ -n "$database" ] && [ "$database" != postgres ] && command -v psql >/dev/null; then
  server_url="${DATABASE_URL%%\?*}"; server_url="${server_url%/*}/postgres"
  for _ in $(seq 1 20); do psql "$server_url" -qtAc 'SELECT 1' >/dev/null 2>&1 && break; sleep 0.5; done
  if ! psql "$server_url" -qtAc "SELECT 1 FROM pg_database WHERE datname = '$database'" | grep -q 1; then
    psql "$server_url" -qc "CREATE DATABASE \"$database\"" >/dev/null
    echo "ensure-deps: created database $database" >&2
  fi
fi
