# Shared by scripts/bench.sh and scripts/record-lag.sh (sourced, run from the repository root).

# Starts a service binary ($5, default the release build) on port $1 with database URL $2,
# key prefix $3 and rate limits off, logging to $4, as .env.example configures it otherwise;
# sets $started_pid once it answers its health check.
start_service() {
  local port=$1 database_url=$2 prefix=$3 log=$4 binary=${5:-target/release/message-queue-service}
  (
    while IFS= read -r line || [ -n "$line" ]; do
      [[ $line =~ ^[[:space:]]*([A-Z_][A-Z0-9_]*)=(.*)$ ]] && export "${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
    done < .env.example
    export PORT=$port DATABASE_URL="$database_url" REDIS_URL="${redis_url:-redis://127.0.0.1:6379}" \
      REDIS_KEY_PREFIX=$prefix TENANT_RATE_LIMIT_RPS=0 TENANT_RATE_LIMIT_BYTES_PER_SEC=0 \
      TENANT_CHANGE_RPS=0 TENANT_MONITORING_RPS=0 \
      TENANT_MAX_QUEUES=100000 TENANT_MAX_BYTES=0 RUST_LOG=warn
    exec "$binary"
  ) >"$log" 2>&1 &
  started_pid=$!
  for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/api/v1/mq/health" >/dev/null 2>&1 && return
    kill -0 "$started_pid" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.2
  done
  echo "the service on port $port did not answer its health check within 20 s" >&2
  kill "$started_pid" 2>/dev/null
  exit 1
}

# Writes to $1 the wrk script of the benchmarks' publish: a 256 B payload into queue "wrk"
# with a fresh tenant's HS256 bearer token (the development secret of .env.example unless
# JWT_SECRET is set); prints the token.
write_publish_lua() {
  local token
  token=$(python3 - <<'PY'
import base64, hashlib, hmac, json, os, time, uuid
secret = os.environ.get("JWT_SECRET", "dev-only-jwt-secret-change-me-0123456789abcdef").encode()
b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"tenant_id": str(uuid.uuid4()), "sub": "bench", "exp": int(time.time()) + 3600}).encode())
sig = b64(hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest())
print(f"{head}.{body}.{sig}")
PY
)
  local data
  data=$(head -c 245 /dev/zero | tr '\0' x)
  cat >"$1" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
wrk.body = '{"queue":"wrk","payload":{"data":"$data"}}'
LUA
  printf '%s\n' "$token"
}
