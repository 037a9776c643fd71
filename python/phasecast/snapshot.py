"""Snapshots: the versioning state at one epoch, as one service sees it."""

from __future__ import annotations

import itertools
from typing import Dict, FrozenSet, Mapping, Optional, Sequence, Tuple

from . import wire


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier, double-quoted (Go's pq.QuoteIdentifier)."""
    return '"' + name.replace('"', '""') + '"'


def _count_of(counter: "itertools.count") -> int:
    # The value next() would return, without taking it.
    return counter.__reduce__()[1][0]


class Snapshot:
    """An immutable view of one state: what this service must not name.

    Read it through Agent.snapshot() (one attribute read) or, for a unit of
    work that must not see the state change under it, pin it with
    ``with agent.guard() as snap:``. Every method is safe to call from any
    thread; nothing it returns ever changes.

    A snapshot is its own guard's context manager: Agent.guard() counts
    the pin on the snapshot's entry counter, and leaving the ``with``
    block counts the exit. The counters are itertools.count objects, whose
    next() is one atomic step under the GIL (and under eventlet), so a
    guard takes no lock and allocates nothing of its own.
    """

    __slots__ = ("epoch", "store_id", "_phases", "_removed", "_columns", "_selects", "_gone",
                 "_enters", "_exits", "_retired", "_wake", "__weakref__")

    def __init__(self, state: wire.State, tables: Mapping[str, Sequence[str]], wake=None):
        self.epoch: int = state.epoch
        self.store_id: str = state.store_id
        self._phases: Dict[str, str] = {r.name: r.phase for r in state.releases}
        removed: Dict[str, Optional[set]] = {}  # table -> None (whole) or its removed columns
        for rel in state.releases:
            # Every release whose phase hides removals counts, known to this
            # service's code or not: hiding is the safe side.
            if rel.phase not in wire.HIDING_PHASES:
                continue
            for rm in rel.removals:
                if not rm.columns:
                    removed[rm.table] = None
                elif removed.get(rm.table, ()) is not None:
                    removed.setdefault(rm.table, set()).update(rm.columns)
        self._removed: Dict[str, Optional[FrozenSet[str]]] = {
            t: (None if c is None else frozenset(c)) for t, c in removed.items()}
        self._columns: Dict[str, Tuple[str, ...]] = {}
        self._selects: Dict[str, str] = {}
        self._gone: Dict[str, bool] = {}
        for name, cols in tables.items():
            gone = self._removed.get(name, frozenset())
            whole = name in self._removed and gone is None
            kept = () if whole else tuple(c for c in cols if c not in gone)
            self._columns[name] = kept
            self._selects[name] = ", ".join(quote_ident(c) for c in kept)
            self._gone[name] = whole
        self._enters = itertools.count()
        self._exits = itertools.count()
        self._retired = False
        self._wake = wake

    # -------------------------------------------------------------- reading

    def removed(self, table: str, column: Optional[str] = None) -> bool:
        """Whether the service must not name column of table: some release
        in contract, contracting or complete removes it or the whole table.
        removed(table) asks about the whole table. table is spelled as in
        the manifests ("instances" or "nova.instances")."""
        if table not in self._removed:
            return False
        cols = self._removed[table]
        if cols is None:
            return True
        return column is not None and column in cols

    def table_removed(self, table: str) -> bool:
        return self.removed(table)

    def columns(self, table: str) -> Tuple[str, ...]:
        """The registered table's columns (Config.tables) minus the removed
        ones, in the registered order; () when the whole table is removed.
        KeyError for a table not registered."""
        return self._columns[table]

    def select_list(self, table: str) -> str:
        """columns(table) quoted and joined for a SELECT: '"id", "name"'."""
        return self._selects[table]

    def phase(self, release: str) -> Optional[str]:
        """The phase of release in this state, None if it holds no such release."""
        return self._phases.get(release)

    def removed_columns(self, table: str) -> Optional[FrozenSet[str]]:
        """The removed columns of table: None when the whole table is
        removed, an empty set when nothing is."""
        if table not in self._removed:
            return frozenset()
        return self._removed[table]

    def __repr__(self) -> str:
        return f"<phasecast.Snapshot epoch={self.epoch}>"

    # ---------------------------------------------------------------- guard

    def __enter__(self) -> "Snapshot":
        return self

    def __exit__(self, et, ev, tb) -> None:
        next(self._exits)
        if self._retired:
            self._wake()

    def inflight(self) -> int:
        """Guards open on this snapshot now."""
        # Exits first: an exit counted after the read of the entries would
        # make the difference negative.
        exits = _count_of(self._exits)
        return _count_of(self._enters) - exits

    def _unpin(self) -> None:
        next(self._exits)
        if self._retired:
            self._wake()
