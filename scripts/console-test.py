#!/usr/bin/env python3
"""The operator console in a real browser: starts the service (development mode) on a fresh
database and key prefix, then runs tests/console/console.test.mjs with playwright-core
driving Debian's chromium. Installs what it needs: the chromium package (apt-get, as root)
and the npm packages pinned in tests/console/package-lock.json.

    scripts/console-test.py [BINARY]"""

import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import harness  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests", "console")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def step(text: str) -> None:
    print(f"console-test: {text}", flush=True)


def install() -> None:
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0:
            sys.exit(f"console-test: {CHROMIUM} is missing: install Debian's chromium package (apt-get install chromium)")
        step("installing Debian's chromium package (once; a few minutes)")
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), stdout=subprocess.DEVNULL)
    if shutil.which("npm") is None:
        sys.exit("console-test: npm is missing: install Node.js 20 or later")
    if not os.path.exists(os.path.join(TESTS, "node_modules", "playwright-core")):
        step("installing playwright-core (npm ci, once)")
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=TESTS, check=True)


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "debug", "message-queue-service")
    if not os.path.exists(binary):
        sys.exit(f"console-test: no binary at {binary}; run `cargo build` first")
    install()
    step("starting the service in development mode")
    with harness.service(binary, {"MQ_DEV_MODE": "1", "TENANT_CHANGE_RPS": "0", "TENANT_MONITORING_RPS": "0"}) as service:
        env = dict(os.environ, BASE_URL=f"http://127.0.0.1:{service.port}", CHROMIUM=CHROMIUM,
                   SCREENSHOTS=os.path.join(ROOT, "target", "console"))
        result = subprocess.run(["node", os.path.join(TESTS, "console.test.mjs")], env=env, cwd=ROOT)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
