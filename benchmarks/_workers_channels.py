"""Channels: websocket messages whose handler runs a 20 ms query (contract: ``_workers.py``).

The "worker" is a uvicorn process serving ``benchmarks/channels_project``;
its "tasks" are websocket messages. 50 clients connect first; then each sends
its share of the messages one after another, awaiting each answer (a chat),
timed from the first send to the last answer. Variants, at the same Django
settings (``CONN_MAX_AGE=60``, ``CONN_HEALTH_CHECKS=True``):

* ``own`` — Channels' ``WebsocketConsumer``: every handler of every consumer
  on asgiref's one thread, ``close_old_connections()`` around each;
* ``bridge`` — ``async_dbbridge.integrations.channels.WebsocketConsumer``:
  handlers on the bridge, connections from a pool of 4 (``POOL_SIZE``).

Sessions: sampled on the server during the run; opened, from
``pg_stat_database.sessions`` on PostgreSQL and as the distinct session ids
the handlers answered with on MariaDB; left after the process stopped.

Run it on its own (before ``bench_workers.py`` exists) for interleaved rounds
of both variants::

    .venv/bin/python benchmarks/_workers_channels.py --backend postgresql --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

if __name__ == "__main__":
    # Run as a script, benchmarks/ is sys.path[0]: the repository root is needed.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (
    BenchDatabase,
    HarnessError,
    Sampler,
    UvicornServer,
    clean_exit,
    rotated,
    settle,
)
from benchmarks._workers import WorkerRound

FRAMEWORK: Final = "channels"
VARIANTS: Final = ("own", "bridge")

APPLICATION: Final = "benchmarks.channels_project.asgi:application"
SETTINGS_MODULE: Final = "benchmarks.channels_project.settings"
CLIENTS: Final = 50
#: The bridge variant's pool (benchmarks/channels_project/settings.py).
POOL_SIZE: Final = 4
#: Seconds a client waits for one answer before the message counts as failed.
ANSWER_TIMEOUT: Final = 30.0


# -- the clients ----------------------------------------------------------------------


async def _chat(url: str, tasks: int, clients: int) -> tuple[float, int, set[int]]:
    """(seconds from the first send to the last answer, failed messages, session ids)."""
    from websockets.asyncio.client import connect

    shares = [tasks // clients + (1 if c < tasks % clients else 0) for c in range(clients)]
    ready = 0
    all_ready = asyncio.Event()
    go = asyncio.Event()
    backends: set[int] = set()
    failed = 0

    async def client(share: int) -> None:
        nonlocal ready, failed
        async with connect(url, open_timeout=30, close_timeout=10, max_queue=None) as ws:
            ready += 1
            if ready == clients:
                all_ready.set()
            await go.wait()
            for n in range(share):
                try:
                    await ws.send(str(n))
                    answer = json.loads(await asyncio.wait_for(ws.recv(), ANSWER_TIMEOUT))
                    backends.add(int(answer["backend"]))
                except (TimeoutError, ValueError, KeyError):
                    failed += share - n
                    return

    runs = [asyncio.ensure_future(client(share)) for share in shares]
    try:
        await asyncio.wait_for(all_ready.wait(), 60)
    except TimeoutError:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        raise HarnessError(f"only {ready} of {clients} websocket clients connected") from None
    started = time.perf_counter()
    go.set()
    outcomes = await asyncio.gather(*runs, return_exceptions=True)
    seconds = time.perf_counter() - started
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    if errors:
        raise HarnessError(f"{len(errors)} websocket client(s) failed: {errors[0]!r}")
    return seconds, failed, backends


# -- counting -------------------------------------------------------------------------


def _sessions_opened_so_far(database: BenchDatabase) -> int | None:
    """``pg_stat_database.sessions`` of the benchmark database (PostgreSQL), else None."""
    if database.backend != "postgresql":
        return None
    from django.db import connections

    # A session on the maintenance database, not on the one whose sessions are counted.
    with connections["admin"]._nodb_cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [database.name])
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def _opened_after_stop(database: BenchDatabase, before: int) -> int:
    """Sessions opened since ``before``, once the count stops moving (bounded)."""
    deadline = time.monotonic() + 10
    last = (_sessions_opened_so_far(database) or 0) - before
    stable_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - stable_since < 1.0:
        time.sleep(0.1)
        now = (_sessions_opened_so_far(database) or 0) - before
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


# -- one round ------------------------------------------------------------------------


def run_round(variant: str, *, database: BenchDatabase, tasks: int) -> WorkerRound:
    """Serve ``tasks`` websocket messages with ``variant``; the contract's figures."""
    if variant not in VARIANTS:
        raise HarnessError(f"channels: the variant must be one of {', '.join(VARIANTS)}")
    env = {
        **database.server_env(),
        "BENCH_VARIANT": variant,
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
    }
    opened_before = _sessions_opened_so_far(database)
    with tempfile.TemporaryFile() as log:
        server = UvicornServer(
            f"channels-{variant}",
            APPLICATION,
            env=env,
            # Channels' router has no lifespan unless routed (the bridge's page routes it).
            lifespan="on" if variant == "bridge" else "off",
            log=log,
        )
        try:
            server.wait_ready(30)
            url = f"ws://127.0.0.1:{server.port}/ws/"
            with Sampler(lambda: database.count_sessions(server.pid), 0.02) as sampler:
                seconds, failed, backends = asyncio.run(_chat(url, tasks, CLIENTS))
        finally:
            code, _ = server.stop(30)
        if not clean_exit(code):
            raise HarnessError(
                f"channels-{variant}: uvicorn exited with {code}:\n{server.log_text()}"
            )
    left = settle(lambda: database.count_sessions(server.pid), timeout=10, stable=1.0)
    # PostgreSQL counts the sessions it opened; elsewhere, the ids the handlers saw.
    opened = len(backends) if opened_before is None else _opened_after_stop(database, opened_before)
    return WorkerRound(
        framework=FRAMEWORK,
        variant=variant,
        tasks=tasks,
        seconds=seconds,
        failed=failed,
        opened=opened,
        peak_sessions=max(sampler.samples, default=0),
        left_sessions=left,
        # Channels' own: one thread, so one session per alias; the bridge: its pool.
        bound=1 if variant == "own" else POOL_SIZE,
    )


# -- on its own: interleaved rounds of both variants ------------------------------------


DB_NAME: Final = "dbbridge_bench_channels"


def _configure_harness(database: BenchDatabase) -> None:
    """Django for the harness: ``default`` (the servers' role) and ``admin`` (counting)."""
    import django
    from django.conf import settings

    from benchmarks._common import databases_setting

    settings.configure(
        DATABASES=databases_setting(
            database.backend, database.name, 0, pool_size=None, pool_needs=""
        ),
        INSTALLED_APPS=[],
        USE_TZ=True,
    )
    django.setup()


def _report(rounds: list[WorkerRound]) -> dict[str, Any]:
    by_variant: dict[str, list[WorkerRound]] = {v: [] for v in VARIANTS}
    for r in rounds:
        by_variant[r.variant].append(r)
    summary: dict[str, Any] = {}
    print()
    print(
        f"{'variant':8} {'msgs/s (median)':>16} {'runs':>28} {'opened/1000':>12} "
        f"{'peak':>5} {'left':>5} {'bound':>5} {'failed':>6}"
    )
    for variant, runs in by_variant.items():
        rates = [r.tasks_per_s for r in runs]
        median = statistics.median(rates)
        summary[variant] = {"median_msgs_per_s": median, "rounds": [r.as_dict() for r in runs]}
        print(
            f"{variant:8} {median:16.1f} {', '.join(f'{x:.1f}' for x in rates):>28} "
            f"{statistics.median(r.opened_per_1000 for r in runs):12.1f} "
            f"{max(r.peak_sessions for r in runs):5d} {max(r.left_sessions for r in runs):5d} "
            f"{runs[0].bound:5d} {sum(r.failed for r in runs):6d}"
        )
    ratio = summary["bridge"]["median_msgs_per_s"] / summary["own"]["median_msgs_per_s"]
    summary["ratio"] = ratio
    print(f"bridge / own: {ratio:.2f}x messages/s")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--backend", choices=("postgresql", "mysql"), default="postgresql")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=500, help="messages per round (500)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    database = BenchDatabase.for_run(args.backend, DB_NAME, session_cap=0)
    _configure_harness(database)

    def body() -> dict[str, Any]:
        database._create_objects()
        database._created()
        rounds: list[WorkerRound] = []
        for round_no in range(args.rounds):
            for variant in rotated(VARIANTS, round_no):
                result = run_round(variant, database=database, tasks=args.tasks)
                rounds.append(result)
                print(
                    f"round {round_no + 1} {variant:6}: {result.tasks_per_s:7.1f} msgs/s, "
                    f"{result.opened} opened, peak {result.peak_sessions}, "
                    f"left {result.left_sessions}, failed {result.failed}",
                    flush=True,
                )
        summary = _report(rounds)
        summary["environment"] = {
            "backend": database.version,
            "clients": CLIENTS,
            "tasks": args.tasks,
            "loadavg": os.getloadavg(),
        }
        return summary

    from benchmarks._common import run_harness

    summary = run_harness("_workers_channels.py", database, body)
    if summary is None:
        return 1
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
