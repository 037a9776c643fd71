"""SQLAlchemy integration: the model keeps naming every column; the
snapshot decides which ones a query may load and a write may set.

    from phasecast.sqlalchemy import removed_in, query_options, writable, engine_url

    class Instance(Base):
        __tablename__ = "instances"
        id = Column(Integer, primary_key=True)
        name = removed_in("L", Column(Text))     # removed by release L

    engine = create_engine(engine_url(url, agent))  # application_name=phasecast:<id>
    with agent.guard() as snap:
        rows = session.query(Instance).options(*query_options(snap, Instance)).all()
        session.execute(insert(Instance).values(**writable(snap, Instance, row)))

A column is removed for a snapshot when the state removes it (a release in
contract, contracting or complete lists it, or its whole table, spelled as
the table's schema-qualified name or, for a table without a schema, its
bare name), or when it is marked removed_in(R) and release R is in one of
those phases: hiding is the safe side. Removed columns are deferred with
raiseload, so touching one raises instead of emitting SQL that names it.
Built on SQLAlchemy's own defer(); works with 1.4 and 2.0.
"""

from __future__ import annotations

from typing import Any, Dict, FrozenSet, List, Mapping, Tuple

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.orm import defer

from . import wire

INFO_KEY = "phasecast_removed_in"

__all__ = ["removed_in", "query_options", "writable", "writable_columns", "removed_columns", "engine_url",
           "TableRemoved", "INFO_KEY"]


class TableRemoved(LookupError):
    """The snapshot removes the model's whole table: nothing may name it."""


def removed_in(release: str, column: Any) -> Any:
    """Mark column (a Column, or a mapped_column) as removed by release and
    return it. The mark is kept in column.info[INFO_KEY]."""
    if not release:
        raise ValueError("removed_in: name the release that removes the column")
    column.info[INFO_KEY] = release
    return column


def _table_names(table: Any) -> Tuple[str, ...]:
    if table.schema:
        return (f"{table.schema}.{table.name}",)
    return (table.name,)


def _columns(model: Any) -> List[Tuple[str, Any, Any]]:
    """(attribute key, column, mapper attribute) of every mapped column."""
    mapper = inspect(model)
    out = []
    for prop in mapper.column_attrs:
        for col in prop.columns:
            if getattr(col, "table", None) is not None and hasattr(col, "name"):
                out.append((prop.key, col, getattr(model, prop.key)))
                break
    return out


def _is_removed(snap: Any, table_names: Tuple[str, ...], col: Any) -> bool:
    if any(snap.removed(t, col.name) for t in table_names):
        return True
    rel = col.info.get(INFO_KEY)
    return rel is not None and snap.phase(rel) in wire.HIDING_PHASES


def _check_table(snap: Any, model: Any) -> Tuple[str, ...]:
    names = _table_names(inspect(model).local_table)
    if any(snap.removed(t) for t in names):
        raise TableRemoved(f"table {names[0]} is removed in epoch {snap.epoch}")
    return names


def removed_columns(snap: Any, model: Any) -> FrozenSet[str]:
    """The attribute keys of model's columns that snap removes."""
    names = _check_table(snap, model)
    return frozenset(key for key, col, _ in _columns(model) if _is_removed(snap, names, col))


def query_options(snap: Any, model: Any) -> List[Any]:
    """Loader options for session.query(model).options(*...) or
    select(model).options(*...): every removed column deferred with
    raiseload. Raises TableRemoved if the whole table is removed."""
    names = _check_table(snap, model)
    return [defer(attr, raiseload=True) for key, col, attr in _columns(model) if _is_removed(snap, names, col)]


def writable_columns(snap: Any, model: Any) -> FrozenSet[str]:
    """The attribute keys an INSERT or UPDATE of model may set under snap."""
    names = _check_table(snap, model)
    return frozenset(key for key, col, _ in _columns(model) if not _is_removed(snap, names, col))


def writable(snap: Any, model: Any, values: Mapping[str, Any]) -> Dict[str, Any]:
    """values without the columns snap removes, for insert(model).values(**...)
    or update(model).values(**...). Keys are attribute keys or column names."""
    names = _check_table(snap, model)
    drop = set()
    for key, col, _ in _columns(model):
        if _is_removed(snap, names, col):
            drop.update((key, col.name))
    return {k: v for k, v in values.items() if k not in drop}


def engine_url(url: Any, agent: Any) -> str:
    """url (a string or sqlalchemy URL) with application_name set to the
    agent's application_name ("phasecast:<id>"), as oslo.db's connection
    option takes it: the contract runner tells the service's sessions from
    sessions nobody vouches for by it. agent may also be the name itself."""
    name = agent if isinstance(agent, str) else agent.application_name
    u = make_url(url)
    query = dict(u.query)
    query["application_name"] = name
    u = u.set(query=query)
    return u.render_as_string(hide_password=False)
