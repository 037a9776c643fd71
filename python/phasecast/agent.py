"""The phasecast agent for Python services: the twin of Go's package agent.

It holds the versioning state for one service process as an immutable
Snapshot, swapped by one attribute assignment and read without a lock,
and keeps it current over AMQP (states from the broadcaster's fanout
exchange, lease grants on the grant exchange), with the store
(PostgreSQL) as the path to the truth when given a database_url. On the
wire it behaves as the Go agent does, so one broadcaster and one contract
runner serve both.

Threads: each running agent owns two, both started by start() and joined
by stop(): "amqp" (dials, declares, drains the connection with a timeout,
handles deliveries, sends the AMQP heartbeats) and "worker" (the lease
timer, the heartbeat statuses, the drain check and its ack, and with a
database the store confirmations). Under eventlet monkey-patching they are
green threads; nothing else changes (psycopg2 calls still block the hub
for their duration unless the service made psycopg2 green).

Fork rule: one agent per process. A child of os.fork() inherits a dead
copy of every agent: the at-fork hook registered here drops the copy's
connection and threads (without a word to the broker: the socket is the
parent's) and fences it, so guard() raises Stale in the child. Call
phasecast.after_fork() (or agent.after_fork()) in the child to start every
agent that was running in the parent again, as a new process: new
incarnation and token, and a new default id (with the child's pid), so
application_name changes too; or create the agent in the child after the
fork. The parent's agents are not touched.
"""

from __future__ import annotations

import datetime
import itertools
import json
import logging
import os
import random
import secrets
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence
from urllib.parse import unquote, urlsplit

from . import redact, wire
from .snapshot import Snapshot
from .store import StatusIgnored, Store, StoreError

__all__ = ["Agent", "Config", "Stale", "AgentError", "new_id", "default_application_name", "after_fork",
           "INSECURE_AGENT_WARNING"]

INSECURE_AGENT_WARNING = ("INSECURE: without the state public key a forged grant would extend this agent's lease, "
                          "and without a DB a forged state would be applied")

DEFAULT_HEARTBEAT = 2.0
DEFAULT_STATUS_CONFIRM_TIMEOUT = 2.0
DEFAULT_LEASE_MARGIN = 1.0
DEFAULT_INITIAL_LEASE = 10.0
DEFAULT_CONFIRM_INTERVAL = 0.1
CONFIRM_BURST = 4
DIAL_TIMEOUT = 5.0
AMQP_HEARTBEAT = 5  # seconds: a dead peer is noticed in seconds
DRAIN_TIMEOUT = 0.25  # the amqp thread's longest wait in drain_events
SENT_RING = 64
MAX_APPLICATION_NAME = 63
GUARD_POLL = 0.01
VERSION = "phasecast-py 0.1"

_log = logging.getLogger("phasecast")

REJECT_REASONS = (wire.REASON_TOO_LARGE, wire.REASON_MALFORMED, wire.REASON_VERSION, wire.REASON_KIND,
                  wire.REASON_INVALID, wire.REASON_UNSIGNED, wire.REASON_BAD_SIGNATURE, "wrong_agent",
                  "unknown_seq", "unconfirmed")


class Stale(Exception):
    """guard() refuses: the agent cannot vouch that its snapshot is current
    (the lease ran out and no re-sync from the store renewed it, or the
    agent is not running). Refuse the unit of work (e.g. answer 503)."""


class AgentError(Exception):
    """start() failed, or the configuration is invalid. Its text never
    holds a password."""


def _hostname() -> str:
    return socket.gethostname() or "unknown"


def new_id(service: str, host: Optional[str] = None) -> str:
    """A fresh default agent id: "<service>-<host>-<pid>-<random4hex>", as
    Go's agent.NewID."""
    return f"{service}-{host or _hostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def default_application_name(agent_id: str) -> str:
    """"phasecast:"+id cut to the 63 bytes PostgreSQL keeps (Go's
    DefaultApplicationName), never splitting a character."""
    b = ("phasecast:" + agent_id).encode("utf-8")[:MAX_APPLICATION_NAME]
    return b.decode("utf-8", "ignore")


def amqp_user(urls: str) -> str:
    """The user the first parseable URL of urls logs in as ("guest" when
    it names none): what statuses carry as user_id."""
    for u in redact.split_urls(urls):
        try:
            parts = urlsplit(u)
        except ValueError:
            continue
        if parts.scheme in ("amqp", "amqps", "pyamqp"):
            return unquote(parts.username) if parts.username else "guest"
    return ""


@dataclass
class Config:
    """Configuration of an Agent. Only service is required; every other
    field defaults as the Go agent's Config does."""

    service: str = ""
    releases: Sequence[str] = ()
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    schema: str = "phasecast"
    exchange_prefix: str = "phasecast"
    database_url: Optional[str] = None
    state_pub: Optional[bytes] = None
    state_pub_file: Optional[str] = None
    status_mac: Optional[bytes] = None
    status_mac_file: Optional[str] = None
    insecure: bool = False
    tables: Mapping[str, Sequence[str]] = field(default_factory=dict)
    id: Optional[str] = None
    lease: Optional[float] = None  # the lease asked of the store before any grant; default 10 s
    heartbeat: Optional[float] = None  # status heartbeat interval; default 2 s
    host: Optional[str] = None
    version: str = VERSION
    application_name: Optional[str] = None
    status_confirm_timeout: float = DEFAULT_STATUS_CONFIRM_TIMEOUT
    lease_margin: float = DEFAULT_LEASE_MARGIN
    confirm_interval: float = DEFAULT_CONFIRM_INTERVAL
    # Runs on the worker thread after a new snapshot is swapped in and
    # before its ack: keep it short. Exceptions are logged.
    on_change: Optional[Callable[[Snapshot, Snapshot], None]] = None
    logger: Optional[logging.Logger] = None


def _validate_ident(name: str) -> Optional[str]:
    if name == "":
        return "identifier is empty"
    if len(name.encode("utf-8", "surrogatepass")) > 63:
        return "identifier is longer than 63 bytes"
    if '"' in name:
        return "identifier contains a double quote"
    if name.strip() != name:
        return "identifier has leading or trailing spaces"
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        return "identifier contains a control character"
    return None


def _is_control(s: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in s)


class _Pending:
    __slots__ = ("tag", "msg_id", "event", "ok", "returned", "seq", "reason")

    def __init__(self, tag: int, msg_id: str, seq: int, reason: str):
        self.tag, self.msg_id, self.seq, self.reason = tag, msg_id, seq, reason
        self.event = threading.Event()
        self.ok = False
        self.returned = False


class _Session:
    """One live broker connection's publishing side. The amqp thread reads
    the connection (drain_events) and so receives the confirms; statuses
    are written from the worker (or stop()) under wlock, which the amqp
    thread's own writes (heartbeats) take too."""

    def __init__(self, raw):
        self.raw = raw
        self.wlock = threading.Lock()
        self.tag = 0
        self.confirms: Dict[int, _Pending] = {}
        self.returned: set = set()
        self.aborted = False
        self.blocked = False
        self.pub = raw.channel()
        self.pub.confirm_select()
        self.pub.events["basic_ack"].add(self._on_ack)
        self.pub.events["basic_nack"].add(self._on_nack)
        self.pub.events["basic_return"].add(self._on_return)

    def publish(self, msg, routing_key: str, seq: int, reason: str) -> _Pending:
        with self.wlock:
            if self.aborted:
                raise ConnectionError("session aborted")
            self.tag += 1
            p = _Pending(self.tag, msg.properties.get("message_id", ""), seq, reason)
            self.confirms[p.tag] = p
            self.pub.basic_publish(msg, exchange="", routing_key=routing_key, mandatory=True)
        return p

    def _settle(self, tag: int, multiple: bool, ok: bool) -> None:
        tags = [t for t in self.confirms if t <= tag] if multiple else [tag]
        for t in tags:
            p = self.confirms.pop(t, None)
            if p is not None:
                p.ok = ok
                p.returned = p.msg_id in self.returned
                self.returned.discard(p.msg_id)
                p.event.set()

    def _on_ack(self, tag, multiple):
        self._settle(tag, multiple, True)

    def _on_nack(self, tag, multiple):
        self._settle(tag, multiple, False)

    def _on_return(self, exc, exchange, routing_key, message):
        self.returned.add(message.properties.get("message_id", ""))

    def fail_all(self) -> None:
        self.aborted = True
        for p in list(self.confirms.values()):
            p.event.set()
        self.confirms.clear()


class _Run:
    """One start()…stop() period: its threads and the event that ends them."""

    def __init__(self):
        self.halt = threading.Event()
        self.ready = threading.Event()
        self.threads: List[threading.Thread] = []
        self.sessions = 0
        self.first = None  # the connection start() dialled
        self.dial_error: Optional[str] = None


_agents: "weakref.WeakSet[Agent]" = weakref.WeakSet()


class Agent:
    """The versioning state of one service process, kept current.

    All methods are safe to call from any thread (and green thread)."""

    def __init__(self, cfg: Config):
        self._cfg = cfg = replace(cfg, releases=tuple(cfg.releases),
                                  tables={k: tuple(v) for k, v in dict(cfg.tables).items()})
        self._default_id = not cfg.id
        self._host = cfg.host or _hostname()
        self._urls = redact.split_urls(cfg.amqp_url or "")
        state_pub = cfg.state_pub
        if state_pub is None and cfg.state_pub_file:
            state_pub = wire.read_key_file(cfg.state_pub_file)
        mac = cfg.status_mac
        if mac is None and cfg.status_mac_file:
            mac = wire.read_key_file(cfg.status_mac_file)
        self._validate(state_pub, mac)
        self._state_key = wire.load_public_key(state_pub) if state_pub is not None else None
        self._mac_key = mac
        self._heartbeat = cfg.heartbeat or DEFAULT_HEARTBEAT
        self._initial_lease = cfg.lease or DEFAULT_INITIAL_LEASE
        self._tables = cfg.tables
        self._broker_user = amqp_user(cfg.amqp_url)
        base = cfg.logger or _log
        self._log = base
        if self._state_key is None:
            self._log.warning(INSECURE_AGENT_WARNING)
        self._new_identity()
        self._init_runtime()
        _agents.add(self)

    # ------------------------------------------------------------ identity

    def _new_identity(self) -> None:
        cfg = self._cfg
        self.id: str = cfg.id if not self._default_id else new_id(cfg.service, self._host)
        self.application_name: str = cfg.application_name or default_application_name(self.id)
        self.incarnation: str = secrets.token_hex(8)
        self._token = secrets.token_hex(wire.TOKEN_SIZE)  # never logged
        self._seq_base = time.time_ns()
        self._seq = self._seq_base
        self._pid = os.getpid()

    def _init_runtime(self) -> None:
        # Read by every guard(): the snapshot, the lease end on the
        # monotonic clock (0.0 while fenced) and the fence flag.
        self._cur: Optional[Snapshot] = None
        self._lease_end = 0.0
        self._fenced = True
        self._running = False
        self._deadline = 0.0  # under _lease_lock; never moves backwards
        self._lease_ms = 0
        self._lease_lock = threading.Lock()
        self._life = threading.RLock()  # start/stop (start may _halt under it)
        self._apply_lock = threading.Lock()
        self._pending_lock = threading.Lock()
        self._status_lock = threading.Lock()
        self._sent_lock = threading.Lock()
        self._pending: List[Snapshot] = []
        self._notified: Optional[Snapshot] = None
        self._drained = -1
        self._applied_at = 0.0
        self._sent: List[Optional[tuple]] = [None] * SENT_RING
        self._wake = threading.Event()
        self._want_connected = False
        self._want_reconnect_sync = False
        self._confirm_hint = 0
        self._candidate: Optional[wire.State] = None
        self._confirm_tokens = float(CONFIRM_BURST)
        self._confirm_at = time.monotonic()
        self._store_id = ""
        self._session: Optional[_Session] = None
        self._run: Optional[_Run] = None
        self._hushed = False
        self._last_sync_error: Optional[str] = None
        self._last_sync_fail = 0.0
        self._stats = {k: 0 for k in ("acks_sent", "statuses_sent", "unconfirmed_statuses", "stale_refusals",
                                      "ignored_states", "behind_grants", "resyncs", "resync_failures",
                                      "digest_confirms", "reconnects", "fencings", "statuses_ignored")}
        self._rejected: Dict[str, int] = {}
        self._store = (Store(self._cfg.database_url, self._cfg.schema, self.application_name)
                       if self._cfg.database_url else None)
        self._was_running = False

    def _validate(self, state_pub: Optional[bytes], mac: Optional[bytes]) -> None:
        cfg, errs = self._cfg, []
        if not cfg.service:
            errs.append("Config.service is required: name the service the agent is embedded in")
        elif cfg.service.strip() != cfg.service or _is_control(cfg.service):
            errs.append(f"Config.service {cfg.service!r} has surrounding spaces or control characters: remove them")
        if cfg.id and len(cfg.id.encode()) > wire.MAX_AGENT_ID:
            errs.append(f"Config.id is longer than {wire.MAX_AGENT_ID} bytes: set a shorter id")
        if cfg.id and _is_control(cfg.id):
            errs.append("Config.id contains a control character: remove it")
        if cfg.application_name and len(cfg.application_name.encode()) > MAX_APPLICATION_NAME:
            errs.append(f"Config.application_name is longer than {MAX_APPLICATION_NAME} bytes: set a shorter one")
        problem = _validate_ident(cfg.schema)
        if problem:
            errs.append(f"Config.schema {cfg.schema!r}: {problem}")
        if not self._urls:
            errs.append("Config.amqp_url: no URL given: give an amqp:// or amqps:// URL, or a comma-separated list")
        for i, u in enumerate(self._urls):
            scheme = u.split("://", 1)[0] if "://" in u else ""
            if scheme not in ("amqp", "amqps"):
                errs.append(f"Config.amqp_url: URL {i + 1} of {len(self._urls)} ({redact.redact(u)}) is not amqp:// or amqps://")
        if cfg.exchange_prefix.strip() != cfg.exchange_prefix:
            errs.append(f"Config.exchange_prefix {cfg.exchange_prefix!r} has surrounding spaces: remove them")
        for name, val in (("heartbeat", cfg.heartbeat), ("lease", cfg.lease)):
            if val is not None and val <= 0:
                errs.append(f"Config.{name} is {val}: give a positive number of seconds, or None for the default")
        if cfg.lease_margin < 0 or cfg.status_confirm_timeout <= 0 or cfg.confirm_interval < 0:
            errs.append("Config.lease_margin, status_confirm_timeout and confirm_interval must be positive")
        if (cfg.lease or DEFAULT_INITIAL_LEASE) <= cfg.lease_margin:
            errs.append("Config.lease must be longer than Config.lease_margin")
        if state_pub is None and not cfg.insecure:
            errs.append("Config.state_pub (or state_pub_file) is required (the broadcaster's public key, state.pub "
                        "from 'phasecast keys generate'); set Config.insecure to run without it: " + INSECURE_AGENT_WARNING)
        if state_pub is not None and len(state_pub) != 32:
            errs.append(f"Config.state_pub is {len(state_pub)} bytes; an Ed25519 public key is 32")
        if mac is not None and len(mac) == 0:
            errs.append("Config.status_mac is empty: give a key, or None for no MAC")
        for name in sorted(cfg.tables):
            parts = name.split(".")
            if len(parts) > 2 or any(_validate_ident(p) for p in parts):
                errs.append(f'Config.tables[{name!r}]: spell it "table" or "schema.table", each part a valid identifier')
            cols = cfg.tables[name]
            if not cols:
                errs.append(f"Config.tables[{name!r}] lists no columns: list every column the service's model knows")
            if len(set(cols)) != len(cols):
                errs.append(f"Config.tables[{name!r}] lists a column twice: list it once")
            for c in cols:
                p = _validate_ident(c)
                if p:
                    errs.append(f"Config.tables[{name!r}] column {c!r}: {p}")
        if errs:
            raise AgentError("phasecast: invalid config: " + "; ".join(errs))

    # ------------------------------------------------------------ hot path

    def snapshot(self) -> Optional[Snapshot]:
        """The current snapshot (one attribute read), None before start()."""
        return self._cur

    def guard(self) -> Snapshot:
        """Pin the current snapshot for one unit of work::

            with agent.guard() as snap:
                ...

        The agent does not acknowledge a newer state until every guard on
        an older snapshot has exited. Raises Stale when the lease has run
        out (after a re-sync from the store, with a database, has not
        renewed it) or the agent is not running. Use it only in a with
        statement: the block's exit releases the pin."""
        if time.monotonic() < self._lease_end:
            s = self._cur
            next(s._enters)
            if self._cur is not s:
                s = self._repin(s)
            if not self._fenced:
                return s
            s._unpin()
        return self._guard_slow()

    def _repin(self, s: Snapshot) -> Snapshot:
        while True:
            s._unpin()
            s = self._cur
            next(s._enters)
            if self._cur is s:
                return s

    def _pin(self) -> Snapshot:
        s = self._cur
        next(s._enters)
        if self._cur is not s:
            s = self._repin(s)
        return s

    def _guard_slow(self) -> Snapshot:
        if not self._fenced and self._expire("guard") > 0:
            s = self._pin()
            if not self._fenced:
                return s
            s._unpin()
        if not self._running or self._cur is None:
            self._stats["stale_refusals"] += 1
            raise Stale("phasecast: state may be stale: the agent holds no state or is not running "
                        "(guard only after start() returned, and before stop())")
        if self._store is None:
            self._stats["stale_refusals"] += 1
            raise Stale("phasecast: state may be stale: the lease ran out")
        err = self._resync_fenced()
        if err:
            self._stats["stale_refusals"] += 1
            raise Stale("phasecast: state may be stale: the lease ran out; " + err)
        s = self._pin()
        if self._fenced or not self._running:
            s._unpin()
            self._stats["stale_refusals"] += 1
            raise Stale("phasecast: state may be stale: fenced again right after the re-sync")
        return s

    def _resync_fenced(self) -> Optional[str]:
        with self._status_lock:
            if not self._fenced:
                return None
            if self._last_sync_error and time.monotonic() - self._last_sync_fail < self._cfg.confirm_interval:
                return "re-sync from the store failed: " + self._last_sync_error
            err = self._sync_locked("fenced_enter")
            if err:
                return err
            if self._fenced:
                return "re-synced, but the lease is no longer than Config.lease_margin"
            return None

    # ------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Load the state and connect; return once the agent can vouch for
        its snapshot (a lease from a grant, or with a database from the
        store). Raises AgentError on failure, having undone everything.
        Calling it on a running agent does nothing."""
        with self._life:
            if self._run is not None:
                return
            deadline = time.monotonic() + timeout
            run = _Run()
            self._hushed = False
            self._set_running(True)
            self._run = run
            ignored = None
            if self._store is not None:
                with self._status_lock:
                    err = self._sync_locked("start")
                if err and self._cur is not None and self._last_ignored:
                    ignored, err = err, None
                if err:
                    self._halt(run)
                    raise AgentError(f"phasecast: start: load state from the store (schema {self._cfg.schema!r}): {err}")
                with self._pending_lock:
                    self._pending = [p for p in self._pending if p.inflight() > 0]
                    if not self._pending and self._cur.epoch > self._drained:
                        self._drained = self._cur.epoch
                    if self._notified is None:
                        self._notified = self._cur
            run.first, run.dial_error = self._dial(shuffled(self._urls))
            for name, target in (("worker", self._work_loop), ("amqp", self._amqp_loop)):
                t = threading.Thread(target=target, args=(run,), name=f"phasecast-{name} {self.id}", daemon=True)
                run.threads.append(t)
                t.start()
            if run.dial_error is not None:
                if self._store is not None and ignored is None:
                    self._log.warning("phasecast: broker unreachable (%s); running on the store's lease and "
                                      "reconnecting in the background", run.dial_error)
                    return
                self._log.warning("phasecast: broker unreachable (%s); retrying until start's timeout", run.dial_error)
            if run.ready.wait(max(0.0, deadline - time.monotonic())):
                self._log.info("phasecast: agent %s started at epoch %s", self.id, self._cur.epoch)
                return
            self._halt(run)
            what = ("the first lease grant from the broadcaster" if self._store is not None
                    else "the first state (beacon) and a lease grant from the broadcaster")
            extra = f" ({ignored})" if ignored else (f" (broker: {run.dial_error})" if run.dial_error else "")
            raise AgentError(f"phasecast: start: waiting for {what}: timed out after {timeout}s{extra}")

    def stop(self, grace: float = 10.0) -> bool:
        """Stop the agent: guard() refuses from now on; guards already open
        may finish within grace seconds, the lease kept meanwhile (heartbeats
        go on, acks are sent). Then the goodbye ends the lease in the store
        at once. Returns False (no goodbye: the lease runs out on its own)
        if guards were still open after grace. Safe to call twice."""
        with self._life:
            run = self._run
            self._run = None
        if run is None:
            return True
        self._set_running(False)
        deadline = time.monotonic() + grace
        clean = True
        while self._open_guards() > 0:
            if time.monotonic() >= deadline:
                clean = False
                self._log.warning("phasecast: stopping with %d guards open after %ss: no goodbye, the lease runs "
                                  "out on its own", self._open_guards(), grace)
                break
            time.sleep(GUARD_POLL)
        if clean:
            with self._status_lock:
                self._hushed = True
                self._farewell_locked()
        else:
            self._hushed = True
        self._halt(run)
        if self._store is not None:
            self._store.close()
        self._log.info("phasecast: agent %s stopped", self.id)
        return clean

    def _halt(self, run: _Run) -> None:
        self._set_running(False)
        run.halt.set()
        self._wake.set()
        me = threading.current_thread()
        for t in run.threads:
            if t is not me:
                t.join(timeout=DIAL_TIMEOUT + 2)
        if run.first is not None:
            _close_quietly(run.first)
            run.first = None
        with self._life:
            if self._run is run:
                self._run = None

    def after_fork(self, timeout: float = 30.0) -> None:
        """In a child of os.fork(): start this agent anew, as a new process
        (new incarnation, token and default id), if it was running in the
        parent. The at-fork hook has already dropped the parent's
        connection and threads from this copy."""
        if self._was_running:
            self._was_running = False
            self.start(timeout)

    def _forget_after_fork(self) -> None:
        # In the child, single-threaded, right after fork: the copy's
        # threads are gone and its sockets are the parent's. Drop them
        # without closing (closing would say goodbye on the parent's
        # connection), renew every lock (a parent thread may have held
        # one), and fence.
        was_running = self._run is not None
        cur, drained, store_id = self._cur, self._drained, self._store_id
        store = self._store
        if store is not None:
            store.forget()
        self._new_identity()
        self._init_runtime()
        # The child keeps the parent's last state as its starting point, but
        # fenced: guard() raises Stale until after_fork() started it.
        self._cur = cur
        self._drained = drained if cur is not None else -1
        self._was_running = was_running
        self._store_id = store_id

    def _open_guards(self) -> int:
        with self._pending_lock:
            n = self._cur.inflight() if self._cur is not None else 0
            return n + sum(p.inflight() for p in self._pending)

    def _set_running(self, v: bool) -> None:
        with self._lease_lock:
            self._running = v
            if not v:
                self._fenced = True
                self._lease_end = 0.0

    # ---------------------------------------------------------------- stats

    def stats(self) -> Dict[str, Any]:
        """A point-in-time view of the agent."""
        with self._lease_lock:
            remaining = max(0.0, self._deadline - time.monotonic()) if self._deadline else 0.0
        st: Dict[str, Any] = dict(self._stats)
        st.update(applied_epoch=self._applied_epoch(), drained_epoch=self._drained, inflight=self._inflight_older(),
                  fenced=self._fenced, seq=self._seq, lease_remaining=remaining, store_id=self._store_id,
                  rejected=dict(self._rejected), id=self.id, incarnation=self.incarnation,
                  connected=self._session is not None and not self._session.aborted,
                  open_guards=self._open_guards())
        return st

    def _applied_epoch(self) -> int:
        s = self._cur
        return s.epoch if s is not None else -1

    def _inflight_older(self) -> int:
        with self._pending_lock:
            return sum(max(p.inflight(), 0) for p in self._pending)

    def _reject(self, reason: str, detail: str, epoch: int = -1) -> None:
        n = self._rejected.get(reason, 0) + 1
        self._rejected[reason] = n
        if n <= 10 or n % 1000 == 0:
            self._log.warning("phasecast: message rejected: reason=%s count=%d epoch=%s: %s", reason, n, epoch, detail)

    # ---------------------------------------------------------------- lease

    def _extend_lease(self, start: float, lease: float) -> bool:
        until = start + lease - self._cfg.lease_margin
        with self._lease_lock:
            moved = until > self._deadline
            if moved:
                self._deadline = until
            valid = self._running and time.monotonic() < self._deadline
            was_fenced = self._fenced
            if valid and (moved or was_fenced):
                self._lease_end = self._deadline
                self._fenced = False
        self._wake.set()
        if valid and was_fenced:
            self._log.info("phasecast: lease valid; serving (%.1fs left)", until - time.monotonic())
        return valid

    def _expire(self, by: str) -> float:
        with self._lease_lock:
            wait = self._deadline - time.monotonic()
            fenced_now = wait <= 0 and self._running and not self._fenced
            if fenced_now:
                self._fenced = True
                self._lease_end = 0.0
        if fenced_now:
            self._stats["fencings"] += 1
            self._log.warning("phasecast: lease ran out (noticed by %s, %.3fs overdue); fenced until it is renewed "
                              "(store: %s)", by, -wait, self._store is not None)
        return wait

    def _lease_length(self) -> float:
        return self._lease_ms / 1000.0 if self._lease_ms > 0 else self._initial_lease

    def _lease_fresh(self) -> bool:
        with self._lease_lock:
            return not self._fenced and self._deadline - time.monotonic() > self._lease_length() / 2

    # ---------------------------------------------------------------- state

    def _apply(self, st: wire.State) -> bool:
        with self._apply_lock:
            old = self._cur
            if old is not None and st.epoch <= old.epoch:
                return False
            s = Snapshot(st, self._tables, self._poke_drain)
            with self._pending_lock:
                self._cur = s
                self._applied_at = time.monotonic()
                if old is not None:
                    old._retired = True
                    self._pending = [p for p in self._pending if p.inflight() > 0] + [old]
        self._wake.set()
        self._log.info("phasecast: state applied: epoch %d (previous %s)", s.epoch, old.epoch if old else None)
        return True

    def _poke_drain(self) -> None:
        self._wake.set()

    def _learn_store(self, store_id: str) -> None:
        if not store_id:
            return
        if self._store_id and self._store_id != store_id:
            self._log.warning("phasecast: the store's identity changed: %s (was %s)", store_id, self._store_id)
        self._store_id = store_id

    def _check_drained(self) -> None:
        while True:
            cur = self._cur
            if cur is None:
                return
            with self._pending_lock:
                old, self._notified = self._notified, cur
            if old is not None and old is not cur and self._cfg.on_change is not None:
                try:
                    self._cfg.on_change(old, cur)
                except Exception:
                    self._log.exception("phasecast: Config.on_change raised (epoch %d)", cur.epoch)
            with self._pending_lock:
                if self._cur is not cur:
                    continue
                self._pending = [p for p in self._pending if p.inflight() > 0]
                acked = not self._pending and cur.epoch > self._drained
                if acked:
                    self._drained = cur.epoch
            if acked:
                self._log.debug("phasecast: drained epoch %d; acknowledging", cur.epoch)
                if self._report("ack"):
                    self._stats["acks_sent"] += 1
            return

    # --------------------------------------------------------------- status

    def _status_locked(self) -> wire.Status:
        self._seq += 1
        drained = self._drained  # before applied: drained never passes it
        applied = self._applied_epoch()
        ns = time.time_ns()
        return wire.Status(agent_id=self.id, incarnation=self.incarnation, token=self._token,
                           service=self._cfg.service, host=self._host, pid=self._pid, version=self._cfg.version,
                           releases=list(self._cfg.releases), seq=self._seq, applied_epoch=max(applied, 0),
                           drained_epoch=max(min(drained, max(applied, 0)), 0), inflight=self._inflight_older(),
                           app_name=self.application_name, store_id=self._store_id,
                           sent_at=(ns // 1_000_000_000, ns % 1_000_000_000))

    def _usable_session(self) -> Optional[_Session]:
        s = self._session
        if s is None or s.aborted or s.blocked:
            return None
        return s

    def _report(self, reason: str) -> bool:
        """Send a status over the broker when connected; through the store
        when there is one and the agent is fenced or has no usable broker
        connection. Reports whether some path took it."""
        with self._status_lock:
            if self._hushed:
                return False
            sess = self._usable_session()
            took = False
            if self._store is not None and (sess is None or self._fenced):
                took = self._sync_locked(reason) is None
            sent = self._publish_locked(sess, reason) if sess is not None else None
        if sent is not None:
            if self._await_confirm(sess, sent):
                return True
            if self._store is not None:
                with self._status_lock:
                    if not self._hushed:
                        return self._sync_locked(reason) is None
        return took

    def _publish_locked(self, sess: _Session, reason: str) -> Optional[_Pending]:
        if self._cur is None:
            return None  # no state yet: the store the status belongs to is unknown
        from amqp import Message

        lease = self._lease_length()
        st = self._status_locked()
        st.skip_grant = reason == "ack" and self._lease_fresh()
        st.leaving = reason == "leaving"
        body = wire.encode_status(st)
        props: Dict[str, Any] = dict(content_type="application/json", type=wire.KIND_STATUS,
                                     app_id="phasecast-agent", timestamp=int(time.time()),
                                     message_id=str(st.seq), expiration=str(max(int(lease * 1000), 1)))
        if self._broker_user:
            # RabbitMQ refuses a user_id other than the connection's user:
            # the broadcaster learns from it which principal sent the status.
            props["user_id"] = self._broker_user
        if self._mac_key is not None:
            props["application_headers"] = {wire.MAC_HEADER: wire.mac(self._mac_key, body)}
        msg = Message(body, **props)
        self._record_sent(st.seq, time.monotonic())
        try:
            p = sess.publish(msg, self._cfg.exchange_prefix + ".status", st.seq, reason)
        except Exception as e:
            self._stats["unconfirmed_statuses"] += 1
            self._log.warning("phasecast: publishing status seq %d (%s) failed: %s; reconnecting", st.seq, reason,
                              redact.scrub_error(e, self._urls))
            sess.fail_all()
            return None
        self._stats["statuses_sent"] += 1
        return p

    def _await_confirm(self, sess: _Session, p: _Pending) -> bool:
        timeout = self._cfg.status_confirm_timeout
        err = None
        if not p.event.wait(timeout):
            err = f"no confirm within {timeout}s"
        elif sess.aborted and not p.ok:
            err = "the connection was lost"
        elif not p.ok:
            err = "the broker nacked it"
        elif p.returned:
            err = f"the broker returned it (does queue {self._cfg.exchange_prefix}.status exist?)"
        if err is None:
            return True
        self._stats["unconfirmed_statuses"] += 1
        self._log.warning("phasecast: status seq %d (%s) not confirmed by the broker: %s; reconnecting", p.seq,
                          p.reason, err)
        sess.fail_all()
        return False

    def _record_sent(self, seq: int, at: float) -> None:
        with self._sent_lock:
            self._sent[seq % SENT_RING] = (seq, at)

    def _sent_at(self, seq: int) -> Optional[float]:
        with self._sent_lock:
            e = self._sent[seq % SENT_RING]
        return e[1] if e is not None and seq != 0 and e[0] == seq else None

    _last_ignored = False

    def _sync_locked(self, reason: str) -> Optional[str]:
        """The path to the truth without the broker (agent_sync): record the
        next status with a lease and read the state, in one statement; apply
        it, then extend the local lease from a time taken before the
        statement began. Returns None, or what went wrong (scrubbed)."""
        st = self._status_locked()
        lease = self._lease_length()
        t0 = time.monotonic()
        self._last_ignored = False
        try:
            state = self._store.sync(st, int(lease * 1000))
        except StatusIgnored as e:
            self._last_ignored = True
            self._last_sync_error, self._last_sync_fail = str(e), time.monotonic()
            self._stats["statuses_ignored"] += 1
            self._learn_store(e.state.store_id)
            self._apply(e.state)
            self._log.warning("phasecast: %s; fenced until the store records one (reason %s)", e, reason)
            return str(e)
        except (StoreError, wire.WireError) as e:
            self._last_sync_error, self._last_sync_fail = str(e), time.monotonic()
            self._stats["resync_failures"] += 1
            self._log.warning("phasecast: re-sync from the store failed (%s): %s", reason, e)
            return str(e)
        self._last_sync_error = None
        self._stats["resyncs"] += 1
        self._learn_store(state.store_id)
        self._apply(state)
        self._extend_lease(t0, lease)
        return None

    def _farewell_locked(self) -> None:
        sess = self._usable_session()
        if sess is not None:
            p = self._publish_locked(sess, "leaving")
            if p is None and self._cur is None:
                return
            if p is not None and self._await_confirm(sess, p):
                return
        if self._store is None:
            return
        st = self._status_locked()
        st.leaving = True
        try:
            self._store.sync(st, 0)
        except StoreError as e:
            self._log.warning("phasecast: recording the goodbye in the store failed; the lease will run out "
                              "instead: %s", e)

    # --------------------------------------------------------------- worker

    def _work_loop(self, run: _Run) -> None:
        next_hb = time.monotonic() + self._heartbeat
        while not run.halt.is_set():
            now = time.monotonic()
            wait = next_hb - now
            with self._lease_lock:
                if not self._fenced:
                    wait = min(wait, self._deadline - now)
            if self._store is not None and self._confirm_hint > self._applied_epoch():
                wait = min(wait, max(0.0, self._confirm_at - now))
            self._wake.wait(max(wait, 0.001))
            self._wake.clear()
            if run.halt.is_set():
                return
            try:
                self._expire("lease_timer")
                if self._want_connected:
                    self._want_connected = False
                    if self._want_reconnect_sync and self._store is not None:
                        self._want_reconnect_sync = False
                        with self._status_lock:
                            self._sync_locked("reconnect")
                    self._report("connected")
                if self._store is not None:
                    self._maybe_confirm()
                self._check_drained()
                if time.monotonic() >= next_hb:
                    next_hb = time.monotonic() + self._heartbeat
                    self._report("heartbeat")
            except Exception:
                self._log.exception("phasecast: worker step failed; going on")

    def _maybe_confirm(self) -> None:
        hint = self._confirm_hint
        if hint <= self._applied_epoch():
            return
        now = time.monotonic()
        interval = self._cfg.confirm_interval
        if interval > 0:
            self._confirm_tokens = min(CONFIRM_BURST, self._confirm_tokens + (now - self._confirm_at) / interval)
            self._confirm_at = now
            if self._confirm_tokens < 1:
                self._confirm_at = now + (1 - self._confirm_tokens) * interval
                return
            self._confirm_tokens -= 1
        self._confirm_hint = 0
        if self._confirm() and hint > self._applied_epoch():
            self._reject("unconfirmed", "a message claimed an epoch the store does not confirm", hint)

    def _confirm(self) -> bool:
        """Bring the agent to the store's state after a message claimed a
        newer epoch: apply the message itself if its digest is the one the
        store wrote with its last change, else read the whole state. Only
        what the store vouches for is applied."""
        msg, self._candidate = self._candidate, None
        try:
            if msg is not None and msg.epoch > self._applied_epoch():
                if self._store.digest() == msg.digest():
                    self._stats["digest_confirms"] += 1
                    self._apply(msg)
                    return True
            state = self._store.state()
        except (StoreError, wire.WireError) as e:
            self._stats["resync_failures"] += 1
            self._log.warning("phasecast: confirming a state message against the store failed: %s", e)
            return False
        self._stats["resyncs"] += 1
        self._learn_store(state.store_id)
        self._apply(state)
        return True

    def _request_confirm(self, epoch: int) -> None:
        if epoch > self._confirm_hint:
            self._confirm_hint = epoch
        self._wake.set()

    # ----------------------------------------------------------------- amqp

    def _conn_name(self) -> str:
        return "phasecast-agent " + self.id

    def _dial_one(self, url: str):
        import kombu

        state = {}

        def on_blocked(reason):
            s = self._session
            if s is not None:
                s.blocked = True
            self._log.warning("phasecast: broker flow control: blocked (%s)", reason)

        def on_unblocked():
            s = self._session
            if s is not None:
                s.blocked = False

        conn = kombu.Connection(url, heartbeat=AMQP_HEARTBEAT, connect_timeout=DIAL_TIMEOUT,
                                transport_options={"client_properties": {"connection_name": self._conn_name()},
                                                   "on_blocked": on_blocked, "on_unblocked": on_unblocked})
        try:
            conn.connect()
        except Exception as e:
            _close_quietly(conn)
            raise ConnectionError(f"dial {redact.redact(url)}: {redact.scrub_error(e, self._urls)}") from None
        del state
        return conn

    def _dial(self, urls: List[str]):
        errs = []
        for u in urls:
            try:
                return self._dial_one(u), None
            except ConnectionError as e:
                errs.append(str(e))
        return None, "; ".join(errs) or "no AMQP URL given"

    def _amqp_loop(self, run: _Run) -> None:
        urls = shuffled(self._urls)
        nxt, failed_in_row = 0, 0
        delay_min, delay_max, delay = 0.1, 5.0, 0.1
        conn, run.first = run.first, None
        while not run.halt.is_set():
            err, url = None, None
            if conn is None:
                url = urls[nxt % len(urls)]
                nxt += 1
                try:
                    conn = self._dial_one(url)
                except ConnectionError as e:
                    err = str(e)
                    failed_in_row += 1
            if conn is not None:
                delay, failed_in_row = delay_min, 0
                try:
                    self._run_session(run, conn)
                except Exception as e:
                    err = redact.scrub_error(e, self._urls)
                finally:
                    _close_quietly(conn)
                    conn = None
            if run.halt.is_set():
                return
            wait = 0.0
            if failed_in_row == 0 or failed_in_row >= len(urls):
                wait = delay * (0.5 + random.random() / 2)
                delay = min(delay * 2, delay_max)
                failed_in_row = 0
            self._log.warning("phasecast: amqp connection lost (%s); reconnecting in %.2fs", err or "closed", wait)
            if run.halt.wait(wait):
                return

    def _ensure_exchange(self, raw, name: str, kind: str) -> None:
        from amqp.exceptions import AccessRefused

        ch = raw.channel()
        try:
            ch.exchange_declare(name, kind, durable=True, auto_delete=False)
            ch.close()
            return
        except AccessRefused:
            pass  # a least-privilege agent: the broadcaster declares it
        ch = raw.channel()
        ch.exchange_declare(name, kind, passive=True, durable=True, auto_delete=False)
        ch.close()

    def _run_session(self, run: _Run, conn) -> None:
        raw = conn.connection
        prefix = self._cfg.exchange_prefix
        state_x, grant_x = prefix + ".state", prefix + ".grant"
        self._ensure_exchange(raw, state_x, "fanout")
        self._ensure_exchange(raw, grant_x, "direct")
        sub = raw.channel()
        q, _, _ = sub.queue_declare("", durable=False, exclusive=True, auto_delete=True)
        sub.queue_bind(q, state_x, "")
        # Grants for this agent's ID, and only those.
        sub.queue_bind(q, grant_x, self.id)
        sub.basic_consume(q, no_ack=True, exclusive=True, callback=self._on_delivery)
        sess = _Session(raw)
        self._session = sess
        try:
            run.sessions += 1
            reconnect = run.sessions > 1
            self._log.info("phasecast: connected to the broker (queue %s, reconnect %s)", q, reconnect)
            if reconnect:
                self._stats["reconnects"] += 1
                # Whatever was published while we were away is lost: with a
                # DB the worker re-syncs; without, the status below earns a
                # grant whose epoch says whether we are behind.
                self._want_reconnect_sync = True
            self._want_connected = True
            self._wake.set()
            last_hb = time.monotonic()
            while not run.halt.is_set() and not sess.aborted:
                try:
                    conn.drain_events(timeout=DRAIN_TIMEOUT)
                except socket.timeout:
                    pass
                now = time.monotonic()
                if now - last_hb >= AMQP_HEARTBEAT / 4:
                    last_hb = now
                    if sess.wlock.acquire(timeout=1.0):
                        try:
                            raw.heartbeat_tick(rate=2)
                        finally:
                            sess.wlock.release()
        finally:
            if self._session is sess:
                self._session = None
            sess.fail_all()

    def _on_delivery(self, msg) -> None:
        # Nothing a message holds can stop the agent: a bad one is
        # counted, logged and dropped.
        try:
            body = msg.body
            if isinstance(body, str):
                body = body.encode("utf-8")
            wire.check_size(body)
            props = msg.properties
            if self._state_key is not None:
                sig = (props.get("application_headers") or {}).get(wire.SIGNATURE_HEADER)
                if isinstance(sig, (bytes, bytearray)):
                    sig = bytes(sig).decode("ascii", "replace")
                elif sig is not None and not isinstance(sig, str):
                    raise wire.WireError(wire.REASON_BAD_SIGNATURE, f"header {wire.SIGNATURE_HEADER} is a {type(sig).__name__}")
                wire.verify(self._state_key, body, sig)
            kind = props.get("type")
            if kind not in (wire.KIND_STATE, wire.KIND_GRANT):
                kind = wire.peek_kind(body)
            if kind == wire.KIND_STATE:
                self._handle_state(body)
            elif kind == wire.KIND_GRANT:
                self._handle_grant(body)
            else:
                self._reject(wire.REASON_KIND, f"kind {kind!r} on the agent queue")
        except wire.WireError as e:
            self._reject(e.reason, str(e))
        except Exception:
            self._log.exception("phasecast: handling a delivery failed")

    def _handle_state(self, body: bytes) -> None:
        st = wire.decode_state(body)
        if self._store is None and (st.epoch > self._applied_epoch() or not self._store_id):
            self._learn_store(st.store_id)
        if st.epoch <= self._applied_epoch():
            self._stats["ignored_states"] += 1
            return
        if self._store is not None:
            c = self._candidate
            if c is None or c.epoch < st.epoch:
                self._candidate = st
            self._request_confirm(st.epoch)
            return
        self._apply(st)

    def _handle_grant(self, body: bytes) -> None:
        g = wire.decode_grant(body)
        if g.agent_id != self.id:
            self._reject("wrong_agent", f"grant for agent {g.agent_id!r}", g.epoch)
            return
        if g.incarnation != self.incarnation:
            self._reject("wrong_agent", f"grant for incarnation {g.incarnation!r} of agent {g.agent_id!r}", g.epoch)
            return
        sent = self._sent_at(g.seq)
        if sent is None:
            self._reject("unknown_seq", f"grant for seq {g.seq}", g.epoch)
            return
        self._lease_ms = g.lease_ms
        applied = self._applied_epoch()
        if g.epoch > applied:
            # The store had a newer epoch when it recorded our status: we
            # missed a state. Let the lease run out while we catch up.
            self._stats["behind_grants"] += 1
            self._log.info("phasecast: grant says we are behind (grant epoch %d, applied %d); not extending the "
                           "lease", g.epoch, applied)
            if self._store is not None:
                self._request_confirm(g.epoch)
            return
        if self._extend_lease(sent, g.lease_ms / 1000.0):
            run = self._run
            if run is not None:
                run.ready.set()


def shuffled(urls: Sequence[str]) -> List[str]:
    out = list(urls)
    random.shuffle(out)
    return out


def _close_quietly(conn) -> None:
    try:
        raw = getattr(conn, "_connection", None)
        if raw is not None and getattr(raw, "transport", None) is not None and raw.transport.sock is not None:
            raw.transport.sock.settimeout(1.0)
        conn.close()
    except Exception:
        try:
            conn.collect()
        except Exception:
            pass


def after_fork(timeout: float = 30.0) -> None:
    """In a child of os.fork(): start anew every agent that was running in
    the parent (see the module's fork rule)."""
    for a in list(_agents):
        a.after_fork(timeout)


def _at_fork_child() -> None:
    for a in list(_agents):
        try:
            a._forget_after_fork()
        except Exception:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_at_fork_child)
