"""The agent's path to the store: agent_state(), agent_digest() and
agent_sync(), the functions a service's role may execute without any
privilege on a table (schema/migrations/008, docs/SECURITY.md).

One psycopg2 connection, in autocommit: every call is one statement, so
the agent never leaves a transaction open and may go through PgBouncer
in transaction mode. Calls are serialized by a lock. Errors never show a
password (redact.scrub_error).
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, Optional, Tuple

from . import redact, wire
from .snapshot import quote_ident

SYNC_TIMEOUT_MS = 5000  # one statement; Go's syncTimeout


# Connections inherited across fork: kept referenced, so that collecting
# them does not send the server a Terminate on the parent's session.
_inherited: list = []


class StoreError(Exception):
    """The store could not be read or written (the message is scrubbed)."""


class StatusIgnored(StoreError):
    """The store read out the state but recorded no lease for this status:
    another live process holds the agent's ID (conflict), or the status was
    refused (refused names why). state is the state read."""

    def __init__(self, msg: str, state: wire.State, conflict: bool, refused: Optional[str]):
        super().__init__(msg)
        self.state, self.conflict, self.refused = state, conflict, refused


class Store:
    def __init__(self, url: str, schema: str, application_name: str):
        self._url = url
        self._schema = schema
        self._app = application_name
        self._conn = None
        self._lock = threading.Lock()
        s = quote_ident(schema)
        self._q_state = f"SELECT {s}.agent_state()"
        self._q_digest = f"SELECT {s}.agent_digest()"
        self._q_sync = f"SELECT {s}.agent_sync(%s::text::jsonb, %s, %s)"

    def _connect(self):
        import psycopg2

        conn = psycopg2.connect(self._url, application_name=self._app, connect_timeout=5,
                                options=f"-c statement_timeout={SYNC_TIMEOUT_MS}")
        conn.autocommit = True
        return conn

    def _one(self, query: str, args: Tuple = ()) -> Any:
        import psycopg2

        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                with self._conn.cursor() as cur:
                    cur.execute(query, args)
                    return cur.fetchone()[0]
            except psycopg2.Error as e:
                self._drop()
                raise StoreError(redact.scrub_error(e, [self._url])) from None

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def forget(self) -> None:
        """After fork: drop the connection without a word to the server
        (it is the parent's), and the lock, which a parent thread may hold."""
        if self._conn is not None:
            _inherited.append(self._conn)  # never closed here, nor collected
        self._conn = None
        self._lock = threading.Lock()

    def state(self) -> wire.State:
        return _state(self._one(self._q_state))

    def digest(self) -> str:
        d = self._one(self._q_digest)
        return d or ""

    def sync(self, status: wire.Status, lease_ms: int) -> wire.State:
        """Record status with a lease of lease_ms and read the state, in one
        statement. Raises StatusIgnored (with the state) when the store
        recorded no lease."""
        import psycopg2

        payload = json.dumps(status.to_wire(with_token=False), separators=(",", ":"))
        out = self._one(self._q_sync, (payload, psycopg2.Binary(bytes.fromhex(status.token)), lease_ms))
        if isinstance(out, str):
            out = json.loads(out)
        st = _state(out["state"])
        if out.get("kept"):
            return st
        holder = out.get("holder") or {}
        conflict = bool(out.get("conflict")) or bool(holder.get("live") and holder.get("incarnation") != status.incarnation)
        refused = out.get("refused")
        what = "refused (%s)" % refused if refused else (
            "another live process holds the ID (host %s, pid %s)" % (holder.get("host"), holder.get("pid"))
            if conflict else "not newer than the one recorded")
        raise StatusIgnored(f"the store ignored status seq {status.seq} of agent {status.agent_id!r}: {what}",
                            st, conflict, refused)


def _state(raw: Any) -> wire.State:
    if isinstance(raw, str):
        raw = json.loads(raw)
    d: Dict[str, Any] = {"epoch": raw.get("epoch") or 0, "store_id": raw.get("store_id") or "",
                         "releases": [{"name": r["name"], "phase": r["phase"],
                                       "removals": [{"table": rm["table"], "columns": rm.get("columns") or []}
                                                    for rm in (r.get("removals") or [])]}
                                      for r in (raw.get("releases") or [])]}
    return wire.state_from_dict(d)
