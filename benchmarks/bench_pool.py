"""What does a checkout cost? async_dbbridge's pool against psycopg_pool (PostgreSQL).

The bridge pools connections itself (one pool for SQLite, PostgreSQL and
MySQL alike) instead of using psycopg_pool, which Django's own PostgreSQL
pooling (`OPTIONS["pool"]`) is built on. This measures what that costs: one
checkout plus one give-back, with no query, at two levels:

1. raw pools: `ConnectionPool.take()` / `put()` against psycopg_pool's
   `getconn()` / `putconn()`;
2. through Django's wrapper, as the ORM pays it: a pooled wrapper's
   `ensure_connection()` + `give_back()` against a wrapper of an alias with
   `OPTIONS["pool"]`: `ensure_connection()` + `close()` (Django's own pooling).

Each is measured sequentially (one thread) and with 8 threads at once (pools of
8, so the cost is the lock, not waiting), in interleaved rounds (each round runs
every path in a rotated order), and reported as medians, with the ratios to
psycopg_pool as medians of the per-round ratios (a noisy machine's drift hits
both sides alike).

Run from the repository root::

    .venv/bin/python benchmarks/bench_pool.py [--rounds N] [--cycles N] [--quick]

It connects to the `postgres` database (PGHOST, PGPORT, PGUSER, PGPASSWORD)
and runs no query there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

THREADS: Final = 8
DEADLINE: Final = 120.0


def configure() -> dict[str, Any]:
    from tests.dbconfig import database

    db = {**database("postgresql", "postgres"), "CONN_MAX_AGE": 600}
    settings.configure(
        DATABASES={
            "default": db,
            # Django refuses CONN_MAX_AGE with its pool (the pool keeps them).
            "djpool": {
                **db,
                "CONN_MAX_AGE": 0,
                "OPTIONS": {"pool": {"min_size": THREADS, "max_size": THREADS}},
            },
        },
        INSTALLED_APPS=[],
        USE_TZ=True,
        ASYNC_DBBRIDGE={"MAX_WORKERS": THREADS, "POOL_SIZE": THREADS, "POOL_TIMEOUT": 30.0},
    )
    django.setup()
    return db


Cycle = Callable[[], None]


class Team:
    """Persistent threads that run one cycle function `cycles` times each, together."""

    def __init__(self, size: int, setup: Callable[[], dict[str, Cycle]]) -> None:
        self.size = size
        self._job: tuple[str, int] | None = None
        self._start = threading.Barrier(size + 1, timeout=DEADLINE)
        self._done = threading.Barrier(size + 1, timeout=DEADLINE)
        self._stop = False
        self._errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._main, args=(setup,), name=f"bench-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _main(self, setup: Callable[[], dict[str, Cycle]]) -> None:
        cycles_by_path = setup()  # per thread: pooled wrappers are thread-local
        while True:
            self._start.wait()
            if self._stop:
                return
            assert self._job is not None
            path, cycles = self._job
            cycle = cycles_by_path[path]
            try:
                for _ in range(cycles):
                    cycle()
            except BaseException as exc:
                self._errors.append(exc)
            self._done.wait()

    def run(self, path: str, cycles: int) -> float:
        """Seconds per checkout + give-back, over all threads (wall time / cycles)."""
        self._job = (path, cycles)
        self._start.wait()
        start = time.perf_counter()
        self._done.wait()
        elapsed = time.perf_counter() - start
        if self._errors:
            raise self._errors[0]
        return elapsed / (cycles * self.size)

    def close(self) -> None:
        self._stop = True
        self._start.wait()
        for thread in self._threads:
            thread.join(DEADLINE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cycles", type=int, default=2000, help="per thread per measurement")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 300 cycles")
    args = parser.parse_args()
    rounds, cycles = (3, 300) if args.quick else (args.rounds, args.cycles)

    db = configure()
    import psycopg
    import psycopg_pool
    from django.db import connections

    from async_dbbridge._lending import close_pools, give_back, make_pooled
    from async_dbbridge._pool import ConnectionPool

    conninfo = psycopg.conninfo.make_conninfo(
        dbname=db["NAME"],
        user=db["USER"],
        password=db["PASSWORD"],
        host=db["HOST"],
        port=db["PORT"],
    )
    ours = ConnectionPool("default", THREADS, 30.0)
    theirs: psycopg_pool.ConnectionPool[psycopg.Connection[Any]] = psycopg_pool.ConnectionPool(
        conninfo, min_size=THREADS, max_size=THREADS, open=True
    )
    theirs.wait(30.0)

    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(conninfo, autocommit=True)

    def setup() -> dict[str, Cycle]:
        bridge = connections["default"]
        make_pooled(bridge)
        django_pool = connections["djpool"]

        def ours_raw() -> None:
            ours.put(ours.take(connect, max_age=None))

        def psycopg_pool_raw() -> None:
            theirs.putconn(theirs.getconn())

        def ours_wrapper() -> None:
            bridge.ensure_connection()
            give_back(bridge)

        def django_pool_wrapper() -> None:
            django_pool.ensure_connection()
            django_pool.close()

        return {
            "raw: async_dbbridge take/put": ours_raw,
            "raw: psycopg_pool getconn/putconn": psycopg_pool_raw,
            "wrapper: async_dbbridge": ours_wrapper,
            "wrapper: Django OPTIONS['pool']": django_pool_wrapper,
        }

    teams = {"sequential": Team(1, setup), f"{THREADS} threads": Team(THREADS, setup)}
    paths = [
        "raw: async_dbbridge take/put",
        "raw: psycopg_pool getconn/putconn",
        "wrapper: async_dbbridge",
        "wrapper: Django OPTIONS['pool']",
    ]
    pairs = {
        "raw: async_dbbridge take/put": "raw: psycopg_pool getconn/putconn",
        "wrapper: async_dbbridge": "wrapper: Django OPTIONS['pool']",
    }
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for team in teams.values():  # warm up: every path opens its connections
            for path in paths:
                team.run(path, 50)
        for r in range(rounds):
            for mode, team in teams.items():
                order = paths[r % len(paths) :] + paths[: r % len(paths)]
                for path in order:
                    results.setdefault((mode, path), []).append(team.run(path, cycles))
    finally:
        for team in teams.values():
            team.close()
        ours.close(5.0)
        theirs.close()
        close_pools(5.0)
        connections.close_all()

    print(
        f"checkout + give-back, PostgreSQL, {rounds} rounds x {cycles} cycles per thread, "
        f"Python {sys.version.split()[0]}, Django {django.__version__}, "
        f"psycopg_pool {psycopg_pool.__version__}, pid {os.getpid()}"
    )
    for mode in teams:
        print(f"\n{mode}:")
        for path in paths:
            median = statistics.median(results[(mode, path)])
            print(f"  {path:38} {median * 1e6:8.2f} us")
        for mine, other in pairs.items():
            ratios = [
                a / b for a, b in zip(results[(mode, mine)], results[(mode, other)], strict=True)
            ]
            print(f"  ratio {mine} / {other}: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
