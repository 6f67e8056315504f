"""End to end under uvicorn: requests per second and server sessions, stock Django and the wrapper.

One uvicorn worker serves ``benchmarks/asgi_project`` in a subprocess, and
``wrk`` drives it with 32 connections for a fixed time. Four configurations:

* ``stock0`` — Django's ASGI handler, ``CONN_MAX_AGE=0`` (a connection per request);
* ``stock60`` — Django's handler, ``CONN_MAX_AGE=60``: every request's thread
  dies holding its connection (stranded until garbage collection), until the
  server refuses more;
* ``pool`` — Django's handler with psycopg's pool (``min_size=max_size=8``,
  ``--pool-size``; ``CONN_MAX_AGE=0`` as Django requires; PostgreSQL only);
* ``wrapper`` — ``async_dbbridge.asgi``: elastic request threads and one
  bounded connection pool per alias, ``CONN_MAX_AGE=60``,
  ``ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 8}`` (``--pool-size``);
  ``HOLD``, ``POOL_TIMEOUT`` and ``CPU_AFFINITY`` the library's defaults
  unless ``--hold`` / ``--pool-timeout`` / ``--cpu-affinity`` say otherwise.

Each serves three views that run one query: a sync view, an async-ORM view
(``afirst()``) and a view that uses ``db_call``. Every (configuration, view)
pair gets its own server: started, warmed up with a short burst, measured
while another connection samples the server's sessions on the benchmark
database (``pg_stat_activity`` / ``PROCESSLIST``; on SQLite the server
process's descriptors on the file), left idle until its session count
settles, stopped with SIGTERM (lifespan shutdown for the wrapper), and the
sessions counted again once it has exited. The pairs run in interleaved
rounds (configurations rotated each round) and the figures are medians:
the database server, uvicorn and wrk share a 2-core machine.

Run from the repository root::

    .venv/bin/python benchmarks/bench_asgi.py [--backend postgresql|mysql|sqlite]
        [--pool-size N] [--hold transaction|request] [--pool-timeout S]
        [--cpu-affinity auto|CPU] [--quick] [--rounds N] [--duration S] [--modes stock0,wrapper]
        [--views sync,async-orm] [--json FILE] [--chart PNG | --no-chart]
    .venv/bin/python benchmarks/bench_asgi.py --replot FILE.json [--chart PNG]

It creates (and drops) its own database, ``dbbridge_bench_asgi``, and a role
(user) of the same name that the servers connect as, capped by the server at
``--session-cap`` sessions (64) so that the sessions stock Django strands
cannot take every slot of a shared server. The exit status is 0 when the run
completed, whatever the targets and checks say (they print PASS or FAIL);
2 if the harness itself failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Final

# Run as a script, benchmarks/ is sys.path[0]: the repository root makes the
# shared helpers (and the served project) importable as the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import _common
from benchmarks._common import (
    CpuSnapshot,
    Sampler,
    UvicornServer,
    WrkResult,
    clean_exit,
    cpu_per_request,
    error_summary,
    interleaved,
    run_harness,
    settle,
    split_option,
)

ROOT: Final = _common.ROOT
DB_NAME: Final = "dbbridge_bench_asgi"
SETTINGS_MODULE: Final = "benchmarks.asgi_project.settings"
APPLICATION: Final = "benchmarks.asgi_project.asgi:application"

MODES: Final = ("stock0", "stock60", "pool", "wrapper")
MODE_LABELS: Final = {
    "stock0": "stock, CONN_MAX_AGE=0",
    "stock60": "stock, CONN_MAX_AGE=60",
    "pool": "stock + psycopg pool ({size})",
    "wrapper": "wrapper, CONN_MAX_AGE=60",
}
VIEWS: Final = {"sync": "/sync/", "async-orm": "/async-orm/", "db-call": "/db-call/"}
#: (mode, view) pairs never run: async_dbbridge refuses to pool an alias that
#: has Django's own pool (OPTIONS["pool"], ImproperlyConfigured, system check
#: async_dbbridge.E003), so db_call's bridge fails every call in "pool" mode —
#: measuring that would time error responses.
SKIPPED: Final = {("pool", "db-call")}
#: The views the acceptance targets are about.
TARGET_VIEWS: Final = ("sync", "async-orm")
POOL_TARGET: Final = 1.15
STOCK0_TARGET: Final = 2.0


# -- configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    backend: str
    modes: tuple[str, ...]
    views: tuple[str, ...]
    #: POOL_SIZE and MAX_WORKERS for the wrapper, and the size of psycopg's pool.
    pool_size: int
    #: HOLD for the wrapper; None: the library's default.
    hold: str | None
    #: POOL_TIMEOUT in seconds; None: the library's default.
    pool_timeout: float | None
    rounds: int
    #: Seconds of each measured wrk run, and of the warm-up burst before it.
    duration: float
    warmup: float
    connections: int
    wrk_threads: int
    #: The most sessions the servers' role may hold (0: no cap).
    session_cap: int
    #: Longest waits: for a server to answer, to exit after SIGTERM.
    start_timeout: float = 30.0
    stop_timeout: float = 30.0
    #: A session count unchanged this long is what the server holds (idle) or left (after).
    settle_stable: float = 0.3
    idle_timeout: float = 2.0
    after_timeout: float = 5.0
    #: Seconds between session samples during a run.
    sample_interval: float = 0.05
    #: CPU_AFFINITY for the wrapper ("auto" or a CPU number, as text); None: the
    #: library's default (unpinned). Defaulted so older JSON reports replot.
    cpu_affinity: str | None = None
    #: What the wrapper really ran with (defaults resolved), read back from a server.
    hold_used: str = ""
    pool_timeout_used: float | None = None
    #: The wrapper's mode as it started: "request-threads" (or "per-request", asgiref < 3.13).
    wrapper_mode_used: str = ""


# -- the database ---------------------------------------------------------------------


def _setup_django(backend: str, user: str, password: str, name: str) -> None:
    # The harness reads the servers' settings module too: alias "default" is
    # the servers' role (it creates the table, so the role owns it), "admin"
    # creates the database and counts sessions.
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.update(
        {
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
            "BENCH_MODE": "stock0",
            "BENCH_BACKEND": backend,
            "BENCH_DB_NAME": name,
            "BENCH_DB_USER": user,
            "BENCH_DB_PASSWORD": password,
        }
    )
    import django

    django.setup()


class Database(_common.BenchDatabase):
    """The benchmark database and the role the servers connect as."""

    def create(self) -> None:
        from django.db import connections

        from benchmarks.asgi_project.models import Item

        self._create_objects()
        with connections["default"].schema_editor() as editor:
            editor.create_model(Item)
        Item.objects.bulk_create(Item(pk=n, name=f"item {n}", value=n) for n in range(1, 11))
        self._created()


class SessionCounter:
    """The sessions a server holds on the benchmark database, counted from outside it."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def count(self, pid: int) -> int:
        return self.database.count_sessions(pid)

    def settle(self, pid: int, timeout: float, stable: float) -> int:
        """The count once it is 0, or unchanged for ``stable`` s (bounded): see `settle`."""
        return settle(lambda: self.count(pid), timeout, stable)


# -- wrk ------------------------------------------------------------------------------


def run_wrk(url: str, seconds: float, config: Config) -> WrkResult:
    return _common.run_wrk(url, seconds, connections=config.connections, threads=config.wrk_threads)


# -- the server -----------------------------------------------------------------------


class Server(UvicornServer):
    """One uvicorn process serving the project in one mode."""

    def __init__(self, mode: str, config: Config, database: Database, log: IO[bytes]) -> None:
        self.mode = mode
        env = {
            **database.server_env(),
            "BENCH_MODE": mode,
            "BENCH_POOL_SIZE": str(config.pool_size),
            "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        }
        # Only what was asked for: unset, the wrapper runs on the library's defaults.
        unset = []
        for key, value in (
            ("BENCH_HOLD", config.hold),
            (
                "BENCH_POOL_TIMEOUT",
                None if config.pool_timeout is None else repr(config.pool_timeout),
            ),
            ("BENCH_CPU_AFFINITY", config.cpu_affinity),
        ):
            if value is None:
                unset.append(key)
            else:
                env[key] = value
        # Django's own handler rejects the lifespan protocol; the wrapper needs it.
        lifespan = "on" if mode == "wrapper" else "off"
        super().__init__(mode, APPLICATION, env=env, lifespan=lifespan, log=log, unset=unset)

    def stats(self) -> dict[str, Any]:
        return self.get_json("/stats/")


# -- one measurement ------------------------------------------------------------------


@dataclass
class Sample:
    """One (mode, view) server in one round."""

    mode: str
    view: str
    round: int
    ok_per_s: float
    requests_per_s: float
    requests: int
    seconds: float
    non_2xx: int
    socket_errors: int
    latency_ms: dict[str, float]
    sessions_before: int
    sessions_peak: int
    sessions_mean: float
    sessions_idle: int
    sessions_after: int
    exit_code: int | None
    stop_seconds: float
    #: Requests the server's query views began over its life (warm-up included).
    served: int
    connects: dict[str, int]
    #: `async_dbbridge.stats().as_dict()` once the load stopped: the library's
    #: pools, request threads and bridge.
    dbbridge: dict[str, Any]
    #: Django's psycopg pool's own counters ("pool" mode only).
    pool: dict[str, Any] | None
    #: ASYNC_DBBRIDGE as the server resolved it (max_workers, pool_size, pool_timeout, hold).
    settings: dict[str, Any]
    #: The wrapper's mode ("request-threads", "per-request"); None under Django's handler.
    wrapper_mode: str | None
    errors: dict[str, int]
    #: CPU per request during the measured run (see cpu_per_request); empty off Linux.
    cpu: dict[str, float]


def measure(mode: str, view: str, round_no: int, config: Config, database: Database) -> Sample:
    counter = SessionCounter(database)
    with tempfile.TemporaryFile() as log:
        server = Server(mode, config, database, log)
        try:
            server.wait_ready(config.start_timeout)
            before = counter.count(server.pid)
            url = server.url(VIEWS[view])
            # Threads, connections and the pools start during the
            # burst; the measured run sees a server in its steady state.
            run_wrk(url, config.warmup, config)
            with Sampler(lambda: counter.count(server.pid), config.sample_interval) as sampler:
                cpu_start = CpuSnapshot.take(server.pid)
                result = run_wrk(url, config.duration, config)
                cpu_end = CpuSnapshot.take(server.pid)
            idle = counter.settle(server.pid, config.idle_timeout, config.settle_stable)
            stats = server.stats()
        finally:
            exit_code, stop_seconds = server.stop(config.stop_timeout)
        after = counter.settle(server.pid, config.after_timeout, config.settle_stable)
        errors = error_summary(server.log_text())
    samples = sampler.samples or [0]
    return Sample(
        mode=mode,
        view=view,
        round=round_no,
        ok_per_s=result.ok_per_s,
        requests_per_s=result.requests_per_s,
        requests=result.requests,
        seconds=result.seconds,
        non_2xx=result.non_2xx,
        socket_errors=sum(result.socket_errors.values()),
        latency_ms=result.latency_ms,
        sessions_before=before,
        sessions_peak=max(samples),
        sessions_mean=statistics.fmean(samples),
        sessions_idle=idle,
        sessions_after=after,
        exit_code=exit_code,
        stop_seconds=stop_seconds,
        served=int(stats["served"]),
        connects=stats["connects"],
        dbbridge=stats["dbbridge"],
        pool=stats["pool"],
        settings=stats["settings"],
        wrapper_mode=stats["wrapper_mode"],
        errors=errors,
        cpu=cpu_per_request(cpu_start, cpu_end, result.requests),
    )


# -- results --------------------------------------------------------------------------


@dataclass
class Summary:
    mode: str
    view: str
    ok_per_s: float
    ok_per_s_min: float
    ok_per_s_max: float
    vs_stock0: float | None
    vs_pool: float | None
    non_2xx: int
    requests: int
    socket_errors: int
    p50_ms: float
    p99_ms: float
    sessions_peak: int
    sessions_idle: int
    sessions_after: int
    connects_per_request: float
    #: The library's pool for "default" (summed over the rounds): checkouts,
    #: timeouts, connections really opened; the longest wait (s) and the most
    #: connections it may hold. None: the pool was never used.
    pool_checkouts: int | None
    pool_timeouts: int | None
    pool_opened: int | None
    pool_wait_max: float | None
    pool_max_size: int | None
    #: The most request threads a server started (the wrapper); None: no request threads.
    request_threads_started: int | None
    unclean_exits: int
    #: Medians over the rounds of cpu_per_request(); empty off Linux.
    cpu: dict[str, float]


@dataclass
class Check:
    status: str  # PASS, FAIL or INFO
    text: str


@dataclass
class Report:
    environment: dict[str, Any]
    config: dict[str, Any]
    samples: list[Sample] = field(default_factory=list)
    summary: list[Summary] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _paired_ratio(samples: Sequence[Sample], mode: str, base: str, view: str) -> float | None:
    """Median over rounds of mode / base (2xx req/s), each pair from the same round."""
    by_round: dict[int, dict[str, Sample]] = {}
    for s in samples:
        if s.view == view:
            by_round.setdefault(s.round, {})[s.mode] = s
    ratios = [
        row[mode].ok_per_s / row[base].ok_per_s
        for row in by_round.values()
        if mode in row and base in row and row[base].ok_per_s > 0
    ]
    return statistics.median(ratios) if ratios else None


def summarize(samples: Sequence[Sample], config: Config) -> list[Summary]:
    summaries = []
    for view in config.views:
        for mode in config.modes:
            mine = [s for s in samples if s.mode == mode and s.view == view]
            if not mine:
                continue
            rates = [s.ok_per_s for s in mine]
            connects = sum(sum(s.connects.values()) for s in mine)
            served = sum(s.served for s in mine)
            pools = [
                s.dbbridge["pools"]["default"] for s in mine if "default" in s.dbbridge["pools"]
            ]
            threads = [s.dbbridge["request_threads"] for s in mine if s.dbbridge["request_threads"]]
            summaries.append(
                Summary(
                    mode=mode,
                    view=view,
                    ok_per_s=statistics.median(rates),
                    ok_per_s_min=min(rates),
                    ok_per_s_max=max(rates),
                    vs_stock0=_paired_ratio(samples, mode, "stock0", view),
                    vs_pool=_paired_ratio(samples, mode, "pool", view),
                    non_2xx=sum(s.non_2xx for s in mine),
                    requests=sum(s.requests for s in mine),
                    socket_errors=sum(s.socket_errors for s in mine),
                    p50_ms=statistics.median(s.latency_ms.get("p50", 0.0) for s in mine),
                    p99_ms=statistics.median(s.latency_ms.get("p99", 0.0) for s in mine),
                    sessions_peak=max(s.sessions_peak for s in mine),
                    sessions_idle=max(s.sessions_idle for s in mine),
                    sessions_after=max(s.sessions_after for s in mine),
                    connects_per_request=connects / served if served else 0.0,
                    pool_checkouts=sum(p["checkouts"] for p in pools) if pools else None,
                    pool_timeouts=sum(p["timeouts"] for p in pools) if pools else None,
                    pool_opened=sum(p["opened"] for p in pools) if pools else None,
                    pool_wait_max=max(p["wait_time_max"] for p in pools) if pools else None,
                    pool_max_size=max(p["max_size"] for p in pools) if pools else None,
                    request_threads_started=(
                        max(t["started"] for t in threads) if threads else None
                    ),
                    unclean_exits=sum(not clean_exit(s.exit_code) for s in mine),
                    cpu={
                        key: statistics.median(s.cpu[key] for s in mine)
                        for key in mine[0].cpu
                        if all(key in s.cpu for s in mine)
                    },
                )
            )
    return summaries


def check_targets(summary: Sequence[Summary], config: Config) -> list[Check]:
    by_key = {(s.mode, s.view): s for s in summary}
    checks: list[Check] = []
    kind = _wrapper_kind(config)

    def target(base: str, factor: float, backend: str, label: str) -> None:
        if config.backend != backend:
            checks.append(
                Check(
                    "INFO", f"wrapper >= {factor}x {label}: a {backend} target, not measured here"
                )
            )
            return
        for view in TARGET_VIEWS:
            wrapper = by_key.get(("wrapper", view))
            ratio = None
            if wrapper is not None:
                ratio = wrapper.vs_pool if base == "pool" else wrapper.vs_stock0
            if ratio is None:
                checks.append(
                    Check(
                        "INFO", f"wrapper >= {factor}x {label} ({view}): not measured in this run"
                    )
                )
                continue
            checks.append(
                Check(
                    "PASS" if ratio >= factor else "FAIL",
                    f"{kind} >= {factor}x {label}, {view} view: {ratio:.2f}x",
                )
            )

    for mode, view in sorted(SKIPPED):
        if mode in config.modes and view in config.views:
            checks.append(
                Check(
                    "INFO",
                    f"{mode} x {view} not run: async_dbbridge refuses to pool an alias with "
                    "Django's OPTIONS['pool'], so db_call fails there",
                )
            )
    target("pool", POOL_TARGET, "postgresql", "Django's psycopg pool")
    target("stock0", STOCK0_TARGET, "mysql", "stock CONN_MAX_AGE=0")
    for s in summary:
        if s.mode != "wrapper":
            continue
        checks.extend(_pool_checks(s, config))
        notes = [f"{s.sessions_after} session(s) after exit"]
        if s.non_2xx or s.socket_errors:
            notes.append(f"{s.non_2xx} non-2xx, {s.socket_errors} socket errors")
        if s.pool_opened is not None:
            notes.append(f"{s.pool_opened} connection(s) opened by the pool")
        if s.pool_wait_max is not None:
            notes.append(f"longest pool wait {s.pool_wait_max * 1000:.0f} ms")
        if s.request_threads_started is not None:
            notes.append(f"up to {s.request_threads_started} request threads started")
        if s.view not in TARGET_VIEWS and s.vs_pool is not None:
            notes.append(f"{s.vs_pool:.2f}x pool")
        if s.view not in TARGET_VIEWS and s.vs_stock0 is not None:
            notes.append(f"{s.vs_stock0:.2f}x stock0")
        if s.unclean_exits:
            notes.append(f"{s.unclean_exits} unclean exit(s)")
        checks.append(Check("INFO", f"wrapper, {s.view} view: " + "; ".join(notes)))
    if config.wrapper_mode_used and config.wrapper_mode_used != "request-threads":
        checks.append(
            Check(
                "INFO",
                f"the wrapper ran in {config.wrapper_mode_used!r} mode, not 'request-threads' "
                "(asgiref < 3.13?): requests did not run on request threads",
            )
        )
    return checks


def _pool_checks(s: Summary, config: Config) -> list[Check]:
    """The wrapper's pool did the work, within its bound, without turning a request away."""
    size = s.pool_max_size or config.pool_size
    where = f"wrapper, {s.view} view"
    if s.pool_checkouts is None or s.pool_timeouts is None:
        # Every view's query goes through the pool (request threads and the
        # bridge alike): a server that never used it measured something else.
        return [Check("FAIL", f"{where}: the pool for 'default' was never used")]
    return [
        Check(
            "PASS" if s.sessions_peak <= size else "FAIL",
            f"{where}: peak server sessions {s.sessions_peak} <= POOL_SIZE {size}",
        ),
        Check(
            "PASS" if s.pool_timeouts == 0 else "FAIL",
            f"{where}: pool timeouts {s.pool_timeouts:,} (0 expected)",
        ),
        Check(
            "PASS" if s.pool_checkouts > 0 else "FAIL",
            f"{where}: pool checkouts {s.pool_checkouts:,} "
            f"({s.connects_per_request:.2f} per request served)",
        ),
    ]


def _wrapper_kind(config: Config) -> str:
    """The wrapper's pool as configured: "wrapper (pool 8, hold transaction)"."""
    hold = config.hold_used or config.hold or "default"
    pinned = "" if config.cpu_affinity is None else f", CPU_AFFINITY {config.cpu_affinity}"
    return f"wrapper (pool {config.pool_size}, hold {hold}{pinned})"


def _mode_label(mode: str, config: Config) -> str:
    if mode == "wrapper":
        return f"{_wrapper_kind(config)}, CONN_MAX_AGE=60"
    return MODE_LABELS[mode].format(size=config.pool_size)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def markdown_table(summary: Sequence[Summary], config: Config) -> str:
    lines = [
        "| mode | view | req/s (2xx) | ratio vs stock0 | ratio vs pool | non-2xx "
        "| p99 ms | peak sessions | sessions idle | sessions after exit | connects/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        label = _mode_label(s.mode, config)
        non_2xx = f"{s.non_2xx:,}"
        if s.socket_errors:
            non_2xx += f" (+{s.socket_errors:,} socket)"
        lines.append(
            f"| {label} | {s.view} | {s.ok_per_s:,.0f} | {_ratio(s.vs_stock0)} "
            f"| {_ratio(s.vs_pool)} | {non_2xx} | {s.p99_ms:,.0f} | {s.sessions_peak} "
            f"| {s.sessions_idle} | {s.sessions_after} | {s.connects_per_request:.2f} |"
        )
    return "\n".join(lines)


def cpu_table(summary: Sequence[Summary], config: Config) -> str:
    lines = [
        "| mode | view | uvicorn ms/req | wrk ms/req | rest ms/req | machine busy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in summary:
        if not s.cpu:
            continue
        label = s.mode if s.mode != "wrapper" else _wrapper_kind(config)
        lines.append(
            f"| {label} | {s.view} | {s.cpu['server_ms']:.2f} | {s.cpu['wrk_ms']:.2f} "
            f"| {s.cpu['rest_ms']:.2f} | {s.cpu['machine_busy']:.0%} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def print_report(report: Report, config: Config) -> None:
    env = report.environment
    print(
        f"## bench_asgi: {env['server']}, Python {env['python']}, Django {env['django']}, "
        f"asgiref {env['asgiref']}, uvicorn {env['uvicorn']}, {env['cpus']} CPUs"
    )
    print()
    cap = f"{config.session_cap}" if config.session_cap else "none"
    given = (
        config.hold is not None
        or config.pool_timeout is not None
        or config.cpu_affinity is not None
    )
    defaults = "" if given else " (the library's defaults)"
    timeout = (
        config.pool_timeout_used if config.pool_timeout_used is not None else config.pool_timeout
    )
    mode = f", mode {config.wrapper_mode_used!r}" if config.wrapper_mode_used else ""
    pinned = "" if config.cpu_affinity is None else f", CPU_AFFINITY={config.cpu_affinity!r}"
    print(
        f"uvicorn, 1 worker; wrk -t{config.wrk_threads} -c{config.connections}, "
        f"{config.duration:g} s per run after a {config.warmup:g} s warm-up; "
        f"{config.rounds} interleaved round(s), medians. Wrapper: POOL_SIZE={config.pool_size}, "
        f"MAX_WORKERS={config.pool_size}, HOLD={config.hold_used or config.hold!r}, "
        f"POOL_TIMEOUT={timeout}{pinned}{defaults}{mode}; psycopg pool: {config.pool_size}. "
        f"Session cap on the servers' role: {cap}. Load average before/after: "
        f"{env['loadavg_before']} / {env['loadavg_after']}."
    )
    print()
    print(markdown_table(report.summary, config))
    print()
    print(
        "req/s counts responses below 400 only (wrk's own figure, errors included, is in "
        "the JSON). Ratios are medians of per-round ratios. peak sessions: the most seen "
        "during the measured run; idle: once the load stopped and the count settled, the "
        "server still up; after exit: once the server exited after SIGTERM. connects/req: "
        "connections Django opened (with a pool, psycopg's or the wrapper's: checkouts) "
        "per request served."
    )
    cpu = cpu_table(report.summary, config)
    if cpu:
        print()
        print(
            "CPU per request during the measured run (medians): the uvicorn process (all "
            "its threads), wrk, and the rest of the machine — the database server, the "
            "harness and whatever else runs."
        )
        print()
        print(cpu)
    errors: dict[str, dict[str, int]] = {}
    for s in report.samples:
        for line, n in s.errors.items():
            errors.setdefault(s.mode, {}).setdefault(line, 0)
            errors[s.mode][line] += n
    if errors:
        print()
        print("Server log lines (most frequent, per mode):")
        for mode, lines in errors.items():
            for line, n in sorted(lines.items(), key=lambda item: -item[1])[:3]:
                print(f"- {mode}: {n:,} x `{line}`")
    print()
    for check in report.checks:
        print(f"{check.status} {check.text}")


# -- the chart ------------------------------------------------------------------------

_COLORS: Final = {
    "stock0": "#9e9e9e",
    "stock60": "#e07b5f",
    "pool": "#5b8fd9",
    "wrapper": "#3aa675",
}


def write_chart(report: Report, config: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    summary = report.summary
    modes = [m for m in config.modes if any(s.mode == m for s in summary)]
    views = [v for v in config.views if any(s.view == v for s in summary)]
    by_key = {(s.mode, s.view): s for s in summary}
    width = 0.8 / max(1, len(modes))
    fig, (rate_ax, session_ax) = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=(3, 2))
    for i, mode in enumerate(modes):
        label = _mode_label(mode, config)
        xs, heights, low, high, peaks, idles = [], [], [], [], [], []
        # The views this mode ran (not every pair runs: SKIPPED), in bar order.
        present = []
        for j, view in enumerate(views):
            s = by_key.get((mode, view))
            if s is None:
                continue
            present.append(view)
            xs.append(j + (i - (len(modes) - 1) / 2) * width)
            heights.append(s.ok_per_s)
            low.append(s.ok_per_s - s.ok_per_s_min)
            high.append(s.ok_per_s_max - s.ok_per_s)
            peaks.append(s.sessions_peak)
            idles.append(s.sessions_idle)
        color = _COLORS[mode]
        bars = rate_ax.bar(
            xs, heights, width, yerr=[low, high], capsize=3, color=color, label=label
        )
        for bar, view in zip(bars, present, strict=True):
            s = by_key[(mode, view)]
            text = f"{s.ok_per_s:,.0f}"
            if s.non_2xx or s.socket_errors:
                text += f"\n{s.non_2xx + s.socket_errors:,} err"
            # Above the whisker, so the two never overlap.
            rate_ax.annotate(
                text,
                (bar.get_x() + bar.get_width() / 2, s.ok_per_s_max),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 2),
                textcoords="offset points",
            )
        session_ax.bar(xs, peaks, width, color=color, alpha=0.45)
        session_ax.bar(xs, idles, width * 0.5, color=color)
    for ax in (rate_ax, session_ax):
        ax.set_xticks(range(len(views)), views)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    rate_ax.set_ylabel("requests/s (2xx), median; whiskers: min-max")
    rate_ax.set_title(f"Throughput, {config.connections} connections")
    rate_ax.legend(fontsize=8, loc="upper left")
    rate_ax.margins(y=0.22)
    session_ax.set_ylabel("server sessions")
    session_ax.set_title("Server sessions")
    left = max((s.sessions_after for s in summary), default=0)
    after_exit = f"after exit: up to {left}" if left else "after exit: 0 everywhere"
    session_ax.legend(
        handles=[
            Patch(color="#777777", alpha=0.45, label="peak under load"),
            Patch(color="#777777", label="idle, after the load"),
            Patch(color="white", label=after_exit),
        ],
        fontsize=8,
        loc="upper right",
    )
    top = max((s.sessions_peak for s in summary), default=1)
    if config.session_cap and config.backend != "sqlite":
        top = max(top, config.session_cap)
        session_ax.axhline(config.session_cap, color="#c0392b", linestyle="--", linewidth=1)
        session_ax.annotate(
            f"cap on the servers' role: {config.session_cap}",
            (-0.45, config.session_cap),
            ha="left",
            va="bottom",
            fontsize=7,
            color="#c0392b",
        )
    # Headroom for the legend above the tallest bar.
    session_ax.set_ylim(0, top * 1.45)
    env = report.environment
    fig.suptitle(
        f"bench_asgi — {env['server']}, uvicorn 1 worker, wrk {config.duration:g} s x "
        f"{config.rounds} round(s), {env['cpus']} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[Config, argparse.Namespace]:
    # The library's own choices, not a copy (reading them needs no settings).
    from async_dbbridge.conf import HOLD_CHOICES

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--backend", choices=("postgresql", "mysql", "sqlite"), default="postgresql"
    )
    parser.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated, from {', '.join(MODES)} (default: all; pool on PostgreSQL only)",
    )
    parser.add_argument(
        "--views", default=",".join(VIEWS), help=f"comma-separated, from {', '.join(VIEWS)}"
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=8,
        help="the wrapper's POOL_SIZE and MAX_WORKERS, and psycopg's pool size (8)",
    )
    parser.add_argument(
        "--hold", choices=HOLD_CHOICES, help="HOLD for the wrapper (default: the library's)"
    )
    parser.add_argument(
        "--pool-timeout",
        type=float,
        metavar="S",
        help="POOL_TIMEOUT for the wrapper, seconds > 0 (default: the library's)",
    )
    parser.add_argument(
        "--cpu-affinity",
        metavar="auto|CPU",
        help="CPU_AFFINITY for the wrapper (default: the library's, unpinned)",
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3; --quick: 1)")
    parser.add_argument("--duration", type=float, help="seconds per measured run (5; --quick: 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up (1)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--wrk-threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument(
        "--session-cap",
        type=int,
        default=64,
        help="most sessions the servers' role may hold (64; 0: no cap)",
    )
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    parser.add_argument(
        "--chart",
        metavar="PNG",
        help="where to write the chart (default docs/img/bench_asgi_<backend>.png)",
    )
    parser.add_argument("--no-chart", action="store_true", help="write no chart")
    parser.add_argument(
        "--replot",
        metavar="JSON",
        help="only redraw the chart from a --json file of an earlier run",
    )
    args = parser.parse_args(argv)
    try:
        if args.modes is None:
            modes = tuple(m for m in MODES if m != "pool" or args.backend == "postgresql")
        else:
            modes = split_option(args.modes, MODES, "--modes")
        views = split_option(args.views, tuple(VIEWS), "--views")
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if "pool" in modes and args.backend != "postgresql":
        parser.error("--modes: pool needs --backend postgresql")
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 5.0)
    if rounds < 1 or duration < 1 or args.pool_size < 1 or args.connections < 1:
        parser.error("--rounds, --duration, --pool-size and --connections must be at least 1")
    if args.pool_timeout is not None and not (0 < args.pool_timeout < float("inf")):
        parser.error(f"--pool-timeout: a number of seconds > 0, not {args.pool_timeout}")
    if args.session_cap < 0:
        parser.error("--session-cap must be 0 or more")
    config = Config(
        backend=args.backend,
        modes=modes,
        views=views,
        pool_size=args.pool_size,
        hold=args.hold,
        pool_timeout=args.pool_timeout,
        cpu_affinity=args.cpu_affinity,
        rounds=rounds,
        duration=duration,
        warmup=args.warmup,
        connections=args.connections,
        wrk_threads=args.wrk_threads,
        session_cap=args.session_cap,
    )
    return config, args


def schedule(config: Config) -> Iterator[tuple[int, str, str]]:
    """(round, mode, view): view by view, the modes in a different order each round."""
    for round_no, mode, view in interleaved(config.rounds, config.views, config.modes):
        if (mode, view) not in SKIPPED:
            yield round_no, mode, view


def _environment(database: Database) -> dict[str, Any]:
    return {
        **_common.software_versions(database.version),
        "cpus": os.cpu_count(),
        "loadavg_before": _common.loadavg(),
    }


def _progress(sample: Sample) -> str:
    return (
        f"[round {sample.round + 1}] {sample.mode:8} {sample.view:10} "
        f"{sample.ok_per_s:8,.0f} req/s  non-2xx {sample.non_2xx:6,}  "
        f"sessions peak {sample.sessions_peak:3} idle {sample.sessions_idle:3} "
        f"after {sample.sessions_after:3}  exit {sample.exit_code}"
    )


def run(config: Config, database: Database, on_sample: Callable[[Sample], None]) -> list[Sample]:
    samples = []
    for round_no, mode, view in schedule(config):
        sample = measure(mode, view, round_no, config, database)
        on_sample(sample)
        samples.append(sample)
    return samples


def _default_chart(backend: str) -> Path:
    return ROOT / "docs" / "img" / f"bench_asgi_{backend}.png"


def replot(source: Path, chart: Path | None) -> Path:
    """Redraw the chart of an earlier run from its JSON: no servers, no database."""
    data = json.loads(source.read_text())
    # Files of the lanes build (mode "lanes", LANES settings) describe another
    # design: say so rather than fail on a missing field.
    unknown = set(data["config"]) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise SystemExit(
            f"bench_asgi: {source} was written by another version of bench_asgi "
            f"(config keys {', '.join(sorted(unknown))}); --replot reads this version's files"
        )
    fields: dict[str, Any] = {
        key: tuple(value) if isinstance(value, list) else value
        for key, value in data["config"].items()
    }
    config = Config(**fields)
    report = Report(
        environment=data["environment"],
        config=data["config"],
        summary=[Summary(**item) for item in data["summary"]],
    )
    path = chart or _default_chart(config.backend)
    write_chart(report, config, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    config, args = parse_args(argv)
    if args.replot:
        print(f"chart: {replot(Path(args.replot), Path(args.chart) if args.chart else None)}")
        return 0
    if shutil.which("wrk") is None:
        print("bench_asgi: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    database = Database.for_run(config.backend, DB_NAME, config.session_cap)
    _setup_django(config.backend, database.user, database.password, database.name)
    started = time.monotonic()

    def body() -> Report:
        database.create()
        report = Report(environment=_environment(database), config=asdict(config))
        report.samples = run(config, database, lambda s: print(_progress(s), file=sys.stderr))
        return report

    report = run_harness("bench_asgi", database, body)
    if report is None:
        return 2
    used = next((sample for sample in report.samples if sample.mode == "wrapper"), None)
    if used is not None:
        config = replace(
            config,
            hold_used=used.settings["hold"],
            pool_timeout_used=used.settings["pool_timeout"],
            wrapper_mode_used=used.wrapper_mode or "",
        )
        report.config = asdict(config)
    report.environment["loadavg_after"] = _common.loadavg()
    report.environment["seconds"] = round(time.monotonic() - started, 1)
    report.summary = summarize(report.samples, config)
    report.checks = check_targets(report.summary, config)
    print_report(report, config)
    if not args.no_chart:
        chart = Path(args.chart) if args.chart else _default_chart(config.backend)
        write_chart(report, config, chart)
        print(f"\nchart: {chart}")
    print(f"({report.environment['seconds']} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
