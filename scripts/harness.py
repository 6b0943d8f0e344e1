"""What the measuring scripts share: a release binary of the service on a fresh database
and Redis key prefix, development tokens, and a small HTTP client (standard library only)."""

import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import socket
import subprocess
import time
import uuid

SECRET = "measure-jwt-secret-0123456789abcdef0123456789"
SERVICE_TOKEN = "measure-service-token-0123456789abcdef0123"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def token(tenant: str) -> str:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"tenant_id": tenant, "sub": "measure", "exp": int(time.time()) + 3600}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Client:
    def __init__(self, port: int):
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.tokens = {}

    def call(self, method: str, path: str, tenant: str, body=None, expect=(200, 201, 204)):
        bearer = self.tokens.get(tenant) or self.tokens.setdefault(tenant, token(tenant))
        headers = {"authorization": f"Bearer {bearer}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        self.connection.request(method, path, body=data, headers=headers)
        response = self.connection.getresponse()
        text = response.read()
        if response.status not in expect:
            raise RuntimeError(f"{method} {path}: {response.status} {text[:300]!r}")
        return json.loads(text) if text else None


class Service:
    """The service on its own database and key prefix; `psql` runs SQL against that database."""

    def __init__(self, binary: str, env: dict, share: "Service | None" = None):
        server_url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
        self.server_url = server_url
        # A second instance of one deployment shares the first's database and key prefix;
        # the first removes them.
        self.owner = share is None
        if share is None:
            self.database = f"measure_{uuid.uuid4().hex[:12]}"
            self.database_url = f"{server_url.rsplit('/', 1)[0]}/{self.database}"
            self.prefix = f"measure:{uuid.uuid4().hex[:12]}:"
            subprocess.run(["psql", server_url, "-qc", f'CREATE DATABASE "{self.database}"'], check=True)
        else:
            self.database, self.database_url, self.prefix = share.database, share.database_url, share.prefix
        self.port = free_port()
        full_env = dict(os.environ,
                        PORT=str(self.port), DATABASE_URL=self.database_url,
                        REDIS_URL=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
                        REDIS_KEY_PREFIX=self.prefix, JWT_SECRET=SECRET,
                        INTERNAL_SERVICE_TOKEN=SERVICE_TOKEN,
                        TENANT_RATE_LIMIT_RPS="0", TENANT_RATE_LIMIT_BYTES_PER_SEC="0",
                        RUST_LOG="error")
        full_env.update(env)
        self.process = subprocess.Popen([binary], env=full_env, stdout=subprocess.DEVNULL)
        try:
            self.wait_healthy()
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def wait_healthy(self) -> None:
        for _ in range(150):
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/api/v1/mq/health")
                if connection.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service did not become healthy")

    def client(self) -> Client:
        return Client(self.port)

    def psql(self, sql: str) -> str:
        return subprocess.run(["psql", self.database_url, "-Atqc", sql],
                              capture_output=True, text=True, check=True).stdout.strip()

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM, then how long the service took to exit (seconds)."""
        if self.process.poll() is not None:
            return 0.0
        began = time.time()
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return time.time() - began

    def remove(self) -> None:
        self.stop()
        if not self.owner:
            return
        subprocess.run(["psql", self.server_url, "-qc",
                        f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)'])
        keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{self.prefix}*"],
                              capture_output=True, text=True).stdout.split()
        for start in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "UNLINK", *keys[start:start + 500]], capture_output=True)


@contextlib.contextmanager
def service(binary: str, env: dict | None = None, share: Service | None = None):
    running = Service(binary, env or {}, share)
    try:
        yield running
    finally:
        running.remove()


def percentile(values, fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
