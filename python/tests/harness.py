"""The tests' environment: the real PostgreSQL and RabbitMQ, and the real
Go broadcaster, driven through the phasecast CLI.

Each Env has its own store schema, application schema and AMQP exchange
prefix, its own keys ('phasecast keys generate'), lets the tests' broker
user and database role enrol agents ('phasecast agents allow', as Go's
testenv.AllowTestPrincipals does) and runs its own 'phasecast broadcast'
process. A missing server, binary or package fails the test loudly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import psycopg2

HERE = os.path.dirname(os.path.abspath(__file__))
PYROOT = os.path.dirname(HERE)
REPO = os.path.dirname(PYROOT)
sys.path.insert(0, PYROOT)

DATABASE_URL = os.environ.get("PHASECAST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")
AMQP_URL = os.environ.get("PHASECAST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PYTHON = "/usr/bin/python3"

_bin_lock = threading.Lock()
_bin_path = None


def phasecast_bin() -> str:
    """The phasecast binary: $PHASECAST_BIN, or built once from this
    checkout into a temporary directory."""
    global _bin_path
    with _bin_lock:
        if _bin_path:
            return _bin_path
        env_bin = os.environ.get("PHASECAST_BIN")
        if env_bin:
            if not os.access(env_bin, os.X_OK):
                raise AssertionError(f"PHASECAST_BIN={env_bin} is not an executable")
            _bin_path = env_bin
            return env_bin
        go = shutil.which("go") or "/usr/local/go/bin/go"
        out = os.path.join(tempfile.mkdtemp(prefix="phasecast-pytest-"), "phasecast")
        res = subprocess.run([go, "build", "-o", out, "./cmd/phasecast"], cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            raise AssertionError(f"building the phasecast binary failed:\n{res.stderr}")
        _bin_path = out
        return out


def name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(5)}"


def db():
    conn = psycopg2.connect(DATABASE_URL, connect_timeout=5)
    conn.autocommit = True
    return conn


class Env:
    """One test's store, application schema, prefix, keys and broadcaster."""

    def __init__(self, test: unittest.TestCase, lease: str = "4s", beacon: str = "1s", broadcast: bool = True):
        self.test = test
        self.schema = name("pyst")
        self.app = name("pyapp")
        self.prefix = name("pypx")
        self.dir = tempfile.mkdtemp(prefix="phasecast-pyenv-")
        self.lease = lease
        self.beacon = beacon
        self.proc = None
        self.log_path = os.path.join(self.dir, "broadcast.log")
        test.addCleanup(self.close)
        self.cli("keys", "generate", "--dir", self.dir)
        self.state_pub = os.path.join(self.dir, "state.pub")
        self.status_mac = os.path.join(self.dir, "status.mac")
        self.cli("migrate")
        self.cli("agents", "allow", "*", "--amqp-user", "guest")
        self.cli("agents", "allow", "*", "--db-role", "postgres")
        with db() as c, c.cursor() as cur:
            cur.execute(f'CREATE SCHEMA "{self.app}"')
            cur.execute(f'CREATE TABLE "{self.app}".instances (id int PRIMARY KEY, name text, '
                        f'display_name text, common_name text)')
        if broadcast:
            self.start_broadcaster()

    # ------------------------------------------------------------ the CLI

    def global_flags(self):
        return ["--database-url", DATABASE_URL, "--amqp-url", AMQP_URL, "--schema", self.schema,
                "--exchange-prefix", self.prefix, "--log-level", "warn"]

    def cli(self, *args, check=True):
        res = subprocess.run([phasecast_bin(), *args, *self.global_flags()], capture_output=True, text=True,
                             timeout=60)
        if check and res.returncode != 0:
            raise AssertionError(f"phasecast {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def start_broadcaster(self):
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [phasecast_bin(), "broadcast", *self.global_flags(), "--state-key", os.path.join(self.dir, "state.key"),
             "--status-mac", self.status_mac, "--lease", self.lease, "--beacon-interval", self.beacon,
             "--poll-interval", "200ms"], stdout=log, stderr=log)
        log.close()

    def stop_broadcaster(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def release(self, release="L", removed=None):
        """Register release with its removals, in expand."""
        removed = removed if removed is not None else [("instances", ["name", "display_name"])]
        lines = [f"release: {release}", "removed:"]
        for table, cols in removed:
            lines.append(f"  - table: {self.app}.{table}")
            if cols:
                lines.append("    columns: [" + ", ".join(cols) + "]")
        path = os.path.join(self.dir, f"{release}.yaml")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.cli("release", "apply", path)

    def flip(self, release, phase, *extra):
        return self.cli("flip", release, phase, "--json", *extra)

    def epoch(self) -> int:
        with db() as c, c.cursor() as cur:
            cur.execute(f'SELECT value FROM "{self.schema}".epoch')
            return cur.fetchone()[0]

    def agent_row(self, agent_id):
        with db() as c, c.cursor() as cur:
            cur.execute(f'SELECT incarnation, applied_epoch, drained_epoch, lease_expires_at > now(), app_name, '
                        f'vouched_by FROM "{self.schema}".agents WHERE id = %s', (agent_id,))
            r = cur.fetchone()
        if r is None:
            return None
        return dict(zip(("incarnation", "applied_epoch", "drained_epoch", "live", "app_name", "vouched_by"), r))

    def wait_row(self, agent_id, pred, timeout=15.0, what="the agent's row"):
        end = time.monotonic() + timeout
        row = None
        while time.monotonic() < end:
            row = self.agent_row(agent_id)
            if row is not None and pred(row):
                return row
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last row: {row}; "
                             f"broadcaster log tail:\n{self.log_tail()}")

    def log_tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def config(self, **kw):
        from phasecast import Config

        base = dict(service="novalike", releases=["L"], amqp_url=AMQP_URL, schema=self.schema,
                    exchange_prefix=self.prefix, state_pub_file=self.state_pub, status_mac_file=self.status_mac,
                    tables={f"{self.app}.instances": ["id", "name", "display_name", "common_name"]},
                    heartbeat=0.5)
        base.update(kw)
        return Config(**base)

    def close(self):
        self.stop_broadcaster()
        try:
            with db() as c, c.cursor() as cur:
                cur.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
                cur.execute(f'DROP SCHEMA IF EXISTS "{self.app}" CASCADE')
        finally:
            delete_topology(self.prefix)
            shutil.rmtree(self.dir, ignore_errors=True)


def delete_topology(prefix):
    import amqp
    from urllib.parse import urlsplit

    u = urlsplit(AMQP_URL)
    conn = amqp.Connection(f"{u.hostname}:{u.port or 5672}", userid=u.username or "guest",
                           password=u.password or "guest", connect_timeout=5)
    conn.connect()
    try:
        ch = conn.channel()
        ch.queue_delete(prefix + ".status")
        for x in (".state", ".grant"):
            ch.exchange_delete(prefix + x)
    finally:
        conn.close()


def wait_for(pred, timeout=10.0, what="a condition", interval=0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
