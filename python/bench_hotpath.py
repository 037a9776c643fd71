#!/usr/bin/python3
"""Measure the Python agent's hot path with timeit, beside baselines timed in
the same run.

Each figure is the median, over --repeat runs of --number loops, of the time
one operation takes:

    attribute read        obj.value                (baseline for snapshot)
    method call           obj.get()                (the same read behind a method)
    agent.snapshot()      one attribute read in the agent
    threading.Lock pair   with lock: pass          (baseline for guard)
    agent.guard() pair    with agent.guard(): pass (enter, pin, exit)

and the ratios snapshot / attribute read, snapshot / method call and
guard / lock pair. The loop's
own cost (timeit's "pass") is shown and left in every figure, as in the
Go benchmarks' figures.

The agent is a real one: it starts against the store and broker its flags
name (the same flags and environment variables as examples/novalike.py) and
needs a migrated store with a broadcaster running on it, e.g.

    export PHASECAST_SCHEMA=pcbench PHASECAST_EXCHANGE_PREFIX=pcbench
    go run ./cmd/phasecast migrate
    go run ./cmd/phasecast agents allow '*' --db-role postgres --amqp-user guest
    go run ./cmd/phasecast broadcast --insecure &
    PYTHONPATH=python /usr/bin/python3 python/bench_hotpath.py --insecure
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import timeit
from typing import Any, Dict, List

import phasecast

DEFAULT_DATABASE_URL = "postgres://postgres@localhost:5432/postgres?sslmode=disable"
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"


class Plain:
    """A plain object: reading its attribute is the baseline of snapshot()."""

    def __init__(self) -> None:
        self.value = object()

    def get(self) -> object:
        """A method that returns the attribute: what snapshot() is, bare."""
        return self.value


def measure(stmt: str, env: Dict[str, Any], number: int, repeat: int) -> Dict[str, float]:
    """Median, minimum and maximum nanoseconds per operation of stmt."""
    runs = timeit.Timer(stmt, globals=env).repeat(repeat=repeat, number=number)
    per_op = [r / number * 1e9 for r in runs]
    return {"median_ns": statistics.median(per_op), "min_ns": min(per_op), "max_ns": max(per_op)}


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", default=os.environ.get("PHASECAST_DATABASE_URL") or DEFAULT_DATABASE_URL)
    p.add_argument("--amqp-url", default=os.environ.get("PHASECAST_AMQP_URL") or DEFAULT_AMQP_URL)
    p.add_argument("--schema", default=os.environ.get("PHASECAST_SCHEMA") or "phasecast")
    p.add_argument("--exchange-prefix", default=os.environ.get("PHASECAST_EXCHANGE_PREFIX") or "phasecast")
    p.add_argument("--state-pub", default="", help="Ed25519 public key file (state.pub)")
    p.add_argument("--insecure", action="store_true", help="run the agent without the state public key")
    p.add_argument("--number", type=int, default=200_000, help="loops per repeat")
    p.add_argument("--repeat", type=int, default=7, help="repeats; the median is reported")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    args = p.parse_args(argv)

    agent = phasecast.Agent(phasecast.Config(
        service="bench-hotpath", releases=["L"], amqp_url=args.amqp_url, schema=args.schema,
        exchange_prefix=args.exchange_prefix, database_url=args.database_url,
        state_pub_file=args.state_pub or None, insecure=args.insecure,
        tables={"instances": ["id", "name", "display_name", "common_name", "host"]},
    ))
    agent.start(timeout=30.0)
    try:
        env = {"agent": agent, "obj": Plain(), "lock": threading.Lock()}
        cases = [
            ("loop (pass)", "pass"),
            ("attribute read", "obj.value"),
            ("method call", "obj.get()"),
            ("agent.snapshot()", "agent.snapshot()"),
            ("threading.Lock pair", "with lock: pass"),
            ("agent.guard() pair", "with agent.guard(): pass"),
        ]
        # Interleaved repeats would be fairer to a drifting machine but
        # cost timeit's own calibration; one case after another, each with
        # a warm-up run, is what the figures in BENCHMARKS.md used.
        results = {}
        for name, stmt in cases:
            timeit.Timer(stmt, globals=env).timeit(number=args.number // 10 or 1)
            results[name] = measure(stmt, env, args.number, args.repeat)
        stats = agent.stats()
    finally:
        agent.stop(grace=10.0)

    ratios = {
        "snapshot / attribute read": results["agent.snapshot()"]["median_ns"] / results["attribute read"]["median_ns"],
        "snapshot / method call": results["agent.snapshot()"]["median_ns"] / results["method call"]["median_ns"],
        "guard / lock pair": results["agent.guard() pair"]["median_ns"] / results["threading.Lock pair"]["median_ns"],
    }
    doc = {
        "python": platform.python_version(), "implementation": platform.python_implementation(),
        "executable": sys.executable, "number": args.number, "repeat": args.repeat,
        "results": results, "ratios": ratios,
        "agent": {"applied_epoch": stats.get("applied_epoch"), "rejected": stats.get("rejected")},
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"Python {doc['python']} ({sys.executable}), {args.repeat} repeats × {args.number} loops; ns per operation")
    print(f"  {'operation':<22} {'median':>9} {'min':>9} {'max':>9}")
    for name, r in results.items():
        print(f"  {name:<22} {r['median_ns']:9.1f} {r['min_ns']:9.1f} {r['max_ns']:9.1f}")
    for name, r in ratios.items():
        print(f"  {name:<26} {r:.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
