#!/usr/bin/python3
"""novalike: the Python twin of examples/novalike, an OpenStack-style service
that embeds a phasecast agent.

It keeps an "instances" table whose name and display_name columns are being
replaced by common_name, and runs workers that read and write it through
SQLAlchemy, each query inside a guard and built from the guard's pinned
snapshot (phasecast.sqlalchemy: removed_in, query_options, writable,
engine_url). The model knows every column the table has ever had (the
multi-schema version of the model); the snapshot says which are still in use.

On SIGTERM or SIGINT it stops the workers, then the agent, prints one JSON
line {"service", "id", "queries", "failed", "refused", "epoch"} (the keys of
the Go service's Result) and exits 0. Flags and environment variables are
the Go command's (examples/novalike/cmd/novalike); --id, --hold-guard and
--ready-file are this one's own.

Run it with Debian's /usr/bin/python3 and PYTHONPATH naming the repository's
python/ directory:

    PYTHONPATH=python /usr/bin/python3 python/examples/novalike.py \\
        --table instances --state-pub state.pub
"""

from __future__ import annotations

import argparse
import base64
import binascii
import faulthandler
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
from typing import Any, Dict, List, Optional

from sqlalchemy import BigInteger, Column, Text, create_engine, insert
from sqlalchemy.orm import Session, declarative_base

import phasecast
from phasecast.sqlalchemy import engine_url, query_options, removed_in, writable

# The defaults of internal/config, and the variables that override them.
ENV_DATABASE_URL = "PHASECAST_DATABASE_URL"
ENV_AMQP_URL = "PHASECAST_AMQP_URL"
ENV_SCHEMA = "PHASECAST_SCHEMA"
ENV_EXCHANGE_PREFIX = "PHASECAST_EXCHANGE_PREFIX"
ENV_STATE_PUB = "PHASECAST_STATE_PUB"
ENV_STATUS_MAC = "PHASECAST_STATUS_MAC"
DEFAULT_DATABASE_URL = "postgres://postgres@localhost:5432/postgres?sslmode=disable"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_SCHEMA = "phasecast"
DEFAULT_EXCHANGE_PREFIX = "phasecast"

# Every column the model knows, old and new, as the Go service's Columns.
COLUMNS = ["id", "name", "display_name", "common_name", "host"]

# Each worker's think time between queries, so that a fleet of instances on
# one machine loads it like real services rather than spinning (the Go
# service's default Pause).
PAUSE = 0.005
# How long a worker waits after the agent refused a unit of work.
REFUSED_PAUSE = 0.02
# Bounds the agent's graceful stop once the workers are done.
STOP_GRACE = 10.0
# Bounds the agent's start.
START_TIMEOUT = 30.0
# The first failures kept and logged, each on a line of its own that
# starts so after the log's prefix (the Go fleet reads them back).
KEEP_FAILURES = 5
FAILURE_MARK = "query failed: "

log = logging.getLogger("novalike")


def env(name: str, default: str) -> str:
    """The environment variable name if set and not empty, else default."""
    return os.environ.get(name) or default


def parse_duration(text: str) -> float:
    """Seconds of a Go-style duration: 500ms, 2s, 1m30s, 1.5h, or plain seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    total, number, i = 0.0, "", 0
    while i < len(text):
        c = text[i]
        if c.isdigit() or c == ".":
            number += c
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else c
        if unit not in units or not number:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}")
        total += float(number) * units[unit]
        number, i = "", i + len(unit)
    if number:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: missing unit")
    return total


def env_key(name: str) -> Optional[bytes]:
    """The key the environment variable name holds in base64, as the Go
    command reads it when no file is named; None when it is not set. Errors
    name the variable, never the key."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"environment variable {name}: not valid base64") from None
    if not raw:
        raise ValueError(f"environment variable {name}: value decodes to nothing")
    return raw


def split_table(table: str) -> tuple:
    """(schema or None, name) of a table spelled as in the release manifest."""
    schema, _, name = table.rpartition(".")
    return (schema or None, name)


def sqlalchemy_url(url: str) -> str:
    """url for SQLAlchemy, which spells PostgreSQL's scheme postgresql://."""
    if url.startswith("postgres://"):
        return "postgresql://" + url[len("postgres://"):]
    return url


def make_model(table: str) -> Any:
    """The mapped class of the instances table: every column the model ever
    had, those release L removes marked so. Its full name (schema.name) is
    the table as the release manifest and the agent's tables spell it."""
    schema, name = split_table(table)
    return type("Instance", (declarative_base(),), {
        "__tablename__": name,
        "__table_args__": {"schema": schema},
        "id": Column(BigInteger, primary_key=True),
        "name": removed_in("L", Column(Text)),
        "display_name": removed_in("L", Column(Text)),
        "common_name": Column(Text),
        "host": Column(Text),
    })


class Service:
    """One running instance: an agent and N workers."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.table = args.table
        self.model = make_model(args.table)
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # guards the counters and failures
        self.queries = self.failed = self.refused = 0
        self.failures: List[str] = []
        self.threads: List[threading.Thread] = []
        self.host = socket.gethostname()
        self.agent = phasecast.Agent(phasecast.Config(
            service=args.service,
            releases=args.releases,
            amqp_url=args.amqp_url,
            schema=args.schema,
            exchange_prefix=args.exchange_prefix,
            database_url=args.database_url,
            # A file named wins over the variable, as in the Go command;
            # the agent reads the file.
            state_pub=None if args.state_pub else env_key(ENV_STATE_PUB),
            state_pub_file=args.state_pub or None,
            status_mac=None if args.status_mac else env_key(ENV_STATUS_MAC),
            status_mac_file=args.status_mac or None,
            insecure=args.insecure,
            tables={args.table: COLUMNS},
            id=args.id or None,
        ))
        # The service's sessions carry the agent's application_name, so the
        # contract runner tells them from sessions nobody vouches for.
        self.engine = create_engine(
            engine_url(sqlalchemy_url(args.database_url), self.agent),
            pool_size=args.workers + 1, max_overflow=0, pool_pre_ping=False,
            future=True)

    def start(self) -> None:
        """Start the agent, then the workers: serve only once the agent holds
        the current state."""
        self.agent.start(timeout=START_TIMEOUT)
        for i in range(self.args.workers):
            t = threading.Thread(target=self.work, name=f"worker-{i}")
            t.start()
            self.threads.append(t)
        if self.args.hold_guard > 0:
            t = threading.Thread(target=self.hold_guard, name="hold-guard")
            t.start()
            self.threads.append(t)

    def stop(self) -> Dict[str, Any]:
        """Stop the workers, then the agent, and report."""
        self.stopping.set()
        for t in self.threads:
            t.join()
        try:
            self.agent.stop(grace=STOP_GRACE)
        finally:
            self.engine.dispose()
        return self.result()

    def result(self) -> Dict[str, Any]:
        with self.lock:
            return {
                "service": self.args.service,
                "id": self.agent.id,
                "queries": self.queries,
                "failed": self.failed,
                "refused": self.refused,
                "epoch": self.agent.snapshot().epoch,
            }

    def work(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.agent.guard() as snap:
                    self.query(snap)
            except phasecast.Stale:
                # Fenced with no store to re-sync from: refuse the work
                # rather than risk naming a dropped column.
                with self.lock:
                    self.refused += 1
                self.stopping.wait(REFUSED_PAUSE)
                continue
            except Exception as exc:  # every failed query counts
                if not self.stopping.is_set():
                    with self.lock:
                        self.failed += 1
                        keep = len(self.failures) < KEEP_FAILURES
                        if keep:
                            self.failures.append(one_line(exc))
                    if keep:
                        # The first few only: without the gate, thousands fail.
                        log.warning("%s%s", FAILURE_MARK, one_line(exc))
            else:
                with self.lock:
                    self.queries += 1
            self.stopping.wait(PAUSE)

    def query(self, snap: Any) -> None:
        """One read or write naming only the snapshot's columns."""
        model = self.model
        with Session(self.engine, future=True) as session:
            if random.randrange(3) == 0:
                name = f"vm-{random.randrange(1_000_000)}"
                row = {"name": name, "display_name": name, "common_name": name, "host": self.host}
                session.execute(insert(model).values(**writable(snap, model, row)))
                session.commit()
            else:
                rows = (session.query(model)
                        .options(*query_options(snap, model))
                        .order_by(model.id.desc())
                        .limit(5)
                        .all())
                for _ in rows:
                    pass

    def hold_guard(self) -> None:
        """Hold one guard open for --hold-guard, as a long request would: the
        agent cannot acknowledge a newer state until it ends. Stopping ends
        it early."""
        try:
            with self.agent.guard():
                log.info("holding a guard for %.1fs", self.args.hold_guard)
                self.stopping.wait(self.args.hold_guard)
        except phasecast.Stale:
            log.warning("could not hold a guard: the agent is fenced")


def write_ready(path: str, agent_id: str) -> None:
    """Write agent_id to path at once (a rename): whoever waits for the file
    never reads half of it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(agent_id + "\n")
    os.replace(tmp, path)


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def parse_args(argv: List[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="novalike.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Go's flag package takes -flag and --flag alike; so does this.
    add = p.add_argument
    add("--service", "-service", default="novalike", help="service name")
    add("--workers", "-workers", type=int, default=4, help="concurrent workers")
    add("--table", "-table", default="instances", help="the instances table, as spelled in the release manifest")
    add("--database-url", "-database-url", default=env(ENV_DATABASE_URL, DEFAULT_DATABASE_URL),
        help=f"PostgreSQL URL (${ENV_DATABASE_URL})")
    add("--amqp-url", "-amqp-url", default=env(ENV_AMQP_URL, DEFAULT_AMQP_URL),
        help=f"RabbitMQ URL, or a comma-separated list of a cluster's nodes (${ENV_AMQP_URL})")
    add("--schema", "-schema", default=env(ENV_SCHEMA, DEFAULT_SCHEMA), help=f"phasecast's schema (${ENV_SCHEMA})")
    add("--exchange-prefix", "-exchange-prefix", default=env(ENV_EXCHANGE_PREFIX, DEFAULT_EXCHANGE_PREFIX),
        help=f"AMQP name prefix (${ENV_EXCHANGE_PREFIX})")
    add("--releases", "-releases", default="L", help="comma-separated releases this build knows")
    add("--state-pub", "-state-pub", default="",
        help=f"Ed25519 public key file that checks state and grants (${ENV_STATE_PUB} holds the key itself)")
    add("--status-mac", "-status-mac", default="", help=f"HMAC key file for status messages (${ENV_STATUS_MAC})")
    add("--insecure", "-insecure", action="store_true",
        help="run without the state public key: a forged grant would extend this agent's lease, "
             "and without a DB a forged state would be applied")
    add("--id", "-id", default="", help="the agent's ID (default: one of its own, host-pid-random)")
    add("--hold-guard", "-hold-guard", type=parse_duration, default=0.0, metavar="DURATION",
        help="hold one guard open for DURATION (2s, 1m) once serving, delaying every acknowledgement")
    add("--ready-file", "-ready-file", default="", metavar="PATH",
        help="once serving (the agent started, the workers running), write the agent's ID to PATH")
    add("--log-level", "-log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    args.releases = [r for r in args.releases.split(",") if r]
    if args.workers <= 0:
        args.workers = 4
    return args


def main(argv: List[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s {args.service} %(name)s: %(message)s")
    # Blocked before any thread starts, so every thread inherits the mask
    # and the main thread alone takes the signal, in sigwait: a SIGTERM
    # during start-up waits there and still ends in a clean stop.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        svc = Service(args)
    except Exception as exc:
        print(f"novalike: {one_line(exc)}", file=sys.stderr)
        return 1
    try:
        svc.start()
    except Exception as exc:
        print(f"novalike: start agent: {one_line(exc)}", file=sys.stderr)
        try:
            svc.stop()
        except Exception:
            pass  # the start's error is the one to report
        return 1
    if args.ready_file:
        write_ready(args.ready_file, svc.agent.id)
    signal.sigwait(stop_signals)
    # Should the stop hang, every thread's stack goes to stderr and the
    # process exits 1, rather than a supervisor waiting on it for good.
    faulthandler.dump_traceback_later(STOP_GRACE + 20, exit=True)
    try:
        res = svc.stop()
    except Exception as exc:
        print(f"novalike: {one_line(exc)}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(res, separators=(",", ":")) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
