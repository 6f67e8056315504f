"""How much does leak-free cost? ``db_call`` against the other ways to call the ORM from asyncio.

Six paths run the same sync functions from an event loop, each on 8 worker
threads with ``CONN_MAX_AGE=60``:

1. ``await db_call(fn)`` on a ``DBExecutor(max_workers=8)`` (default policy);
2. ``loop.run_in_executor(ThreadPoolExecutor(8), fn)`` — the raw baseline:
   persistent connections, leaked when the pool goes away;
3. ``asyncio.to_thread(fn)`` on the loop's default executor (sized to 8);
4. ``sync_to_async(fn, thread_sensitive=False)`` from asgiref (same executor);
5. "channels style": ``close_old_connections()`` before and after every call;
6. "blog-post fix": ``connections.close_all()`` after every call.

Two phases:

* **speed** — all six paths live on one loop, and are measured in short
  slices, interleaved: each round measures one metric on every path in turn
  (in a rotated order), then the next metric. The metrics are the round trip of
  a no-op function (one call at a time, and 32 concurrent callers) and the
  throughput of a one-query ORM function at 32 concurrent callers. Figures are
  medians over the rounds; ratios are medians of the per-round ratios, so the
  drift of a noisy machine hits both sides of a ratio alike.
* **lifecycle** — each path on a fresh loop and fresh threads: a burst of ORM
  calls, then the pool is shut down and the loop closed, and the server's
  sessions on the database are counted from a separate connection (polling until
  they stop changing), before and after ``gc.collect()``.

Connections opened (``connection_created``) are attributed to a path by the
name of the thread that opened them, in both phases.

Run from the repository root::

    .venv/bin/python benchmarks/bench_executor.py [--backend postgresql|mysql|sqlite]
                                                  [--quick] [--rounds N] [--json out.json]
                                                  [--metrics]

``--metrics``: each round also measures the pooled ``db_call`` path twice more,
back to back (the order alternating), with both metrics integrations recording
(OpenTelemetry on a real SDK provider, and the Prometheus collector) and
without; the durations queued during a slice are recorded in it (drained
before its CPU clock stops). Printed as ratios, metrics on to off.

It creates (and drops) its own database, ``dbbridge_bench``; on SQLite a
temporary file. The exit status is 1 if an acceptance target fails.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

# Run as a script, benchmarks/ is sys.path[0]: the repository root makes the
# shared helpers, the settings and the test app importable (and this
# checkout's async_dbbridge the one imported).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asgiref
import django
from asgiref.sync import sync_to_async
from django.db import OperationalError, close_old_connections, connections
from django.db.backends.signals import connection_created

import async_dbbridge
from async_dbbridge import DBExecutor, db_call
from async_dbbridge._lending import close_pools, pool_stats
from async_dbbridge.conf import get_settings
from async_dbbridge.testing import close_monitor, server_session_count
from benchmarks._common import rotated, server_version, settle

WORKERS: Final = 8
CONCURRENCY: Final = 32
ALIAS: Final = "default"

_Call = Callable[[], Awaitable[object]]
_Fn = Callable[[], object]


# -- configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    backend: str
    #: Interleaved rounds of the speed phase.
    rounds: int
    #: Seconds per round of the sequential no-op, shared out in one block per path.
    seq_seconds: float
    #: Seconds of each path's slice per round: no-op at concurrency 32, ORM at 32.
    c32_seconds: float
    orm_seconds: float
    #: Seconds of concurrent ORM calls (and half as long of no-op calls) to warm a path up.
    warmup: float
    #: Lifecycle runs per path, and seconds of ORM calls in each.
    lifecycle_rounds: int
    lifecycle_seconds: float
    #: Longest wait for the server to drop the sessions of a path that closed them.
    settle_timeout: float = 5.0
    #: A session count unchanged this long is what the path left behind.
    settle_stable: float = 0.5
    #: Also measure the pooled db_call path with both metrics integrations on and off.
    metrics: bool = False


PRESETS: Final[dict[str, dict[str, Any]]] = {
    "quick": {
        "rounds": 8,
        "seq_seconds": 0.3,
        "c32_seconds": 0.05,
        "orm_seconds": 0.15,
        "warmup": 0.2,
        "lifecycle_rounds": 1,
        "lifecycle_seconds": 0.2,
    },
    "full": {
        "rounds": 20,
        "seq_seconds": 0.6,
        "c32_seconds": 0.1,
        "orm_seconds": 0.3,
        "warmup": 0.5,
        "lifecycle_rounds": 3,
        "lifecycle_seconds": 0.3,
    },
}


# -- the paths ------------------------------------------------------------------------


def _thread_prefix(key: str) -> str:
    # Thread names carry the path's key, so that connection_created can tell
    # which path opened a connection while all of them share one process.
    return f"bench:{key}:"


def _path_of_thread(name: str) -> str | None:
    parts = name.split(":")
    return parts[1] if len(parts) >= 3 and parts[0] == "bench" else None


class _Runner:
    """One path's machinery on one event loop.

    ``bind`` is called once per function, outside the timed loops, so that a
    path that wraps the function (asgiref, the channels-style wrapper) pays for
    wrapping once, as real code that decorates a function does.
    """

    def bind(self, fn: _Fn) -> _Call:
        raise NotImplementedError

    def activate(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called before each measurement of this path."""

    def close(self) -> None:
        """Shut the threads down and wait for them, after the loop has closed."""


class _DBCallRunner(_Runner):
    """``db_call`` on a `DBExecutor` of the path's own, installed on the loop.

    ``pooled``: its workers take their connections from the alias's pool
    (``POOL_SIZE`` = the workers), as the process-wide bridge does — the
    executor ``db_call`` uses when nothing else is installed.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, key: str = "db_call", *, pooled: bool = False
    ) -> None:
        self.pooled = pooled
        self.executor = DBExecutor(
            max_workers=WORKERS, thread_name_prefix=_thread_prefix(key), pooled=pooled
        )
        self.loop = loop
        self.activate(loop)

    def bind(self, fn: _Fn) -> _Call:
        return functools.partial(db_call, fn)

    def activate(self, loop: asyncio.AbstractEventLoop) -> None:
        # The loop's default executor, which db_call uses when nothing is
        # installed: set again before each measurement, since the two db_call
        # paths take turns (installing one would shut the other down).
        loop.set_default_executor(self.executor)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.pooled:
            # What lifespan shutdown (or reset_bridge_executor()) does: the pool
            # keeps the connections the workers gave back until it is closed.
            close_pools(10.0)


class _PoolRunner(_Runner):
    """``loop.run_in_executor`` on a plain pool, with an optional per-call wrapper."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: str,
        wrap: Callable[[_Fn], _Fn] | None = None,
    ) -> None:
        self.loop = loop
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix=_thread_prefix(key))
        self.wrap = wrap

    def bind(self, fn: _Fn) -> _Call:
        target = fn if self.wrap is None else self.wrap(fn)
        return functools.partial(self.loop.run_in_executor, self.pool, target)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class _LoopDefaultRunner(_Runner):
    """``asyncio.to_thread`` or asgiref's ``sync_to_async``: both use the loop's default.

    The stock default has ``min(32, cpu_count + 4)`` threads; this one has
    ``WORKERS``, so that every path has the same threads and connections.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, key: str) -> None:
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix=_thread_prefix(key))
        self.asgiref = key == "sync_to_async"
        self.activate(loop)

    def bind(self, fn: _Fn) -> _Call:
        if self.asgiref:
            return sync_to_async(fn, thread_sensitive=False)
        return functools.partial(asyncio.to_thread, fn)

    def activate(self, loop: asyncio.AbstractEventLoop) -> None:
        # Two paths use "the" default executor; each gets its own while measured.
        loop.set_default_executor(self.pool)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _channels_style(fn: _Fn) -> _Fn:
    # What channels' database_sync_to_async does around every call.
    def call() -> object:
        close_old_connections()
        try:
            return fn()
        finally:
            close_old_connections()

    return call


def _close_after(fn: _Fn) -> _Fn:
    # The usual blog-post advice: close the connection after every call.
    def call() -> object:
        try:
            return fn()
        finally:
            connections.close_all()

    return call


@dataclass(frozen=True)
class BenchPath:
    key: str
    label: str
    start: Callable[[asyncio.AbstractEventLoop], _Runner]


# The db_call paths first: each sets its executor as the loop's default before
# it is measured, as the other paths that use the default executor do.
PATHS: Final = (
    BenchPath("db_call", "`db_call` (DBExecutor)", _DBCallRunner),
    BenchPath(
        "db_call_pooled",
        "`db_call` (pooled, as the bridge)",
        lambda loop: _DBCallRunner(loop, "db_call_pooled", pooled=True),
    ),
    BenchPath("raw", "raw `run_in_executor`", lambda loop: _PoolRunner(loop, "raw")),
    BenchPath(
        "to_thread", "`asyncio.to_thread`", lambda loop: _LoopDefaultRunner(loop, "to_thread")
    ),
    BenchPath(
        "sync_to_async",
        "`sync_to_async(thread_sensitive=False)`",
        lambda loop: _LoopDefaultRunner(loop, "sync_to_async"),
    ),
    BenchPath(
        "channels",
        "channels style (`close_old_connections` x2)",
        lambda loop: _PoolRunner(loop, "channels", _channels_style),
    ),
    BenchPath(
        "close_after",
        "blog fix (`close_all()` after every call)",
        lambda loop: _PoolRunner(loop, "close_after", _close_after),
    ),
)
BASELINE: Final = "raw"
#: Paths whose workers take connections from the pool (their opened count is the pool's).
POOLED_PATHS: Final = frozenset({"db_call_pooled"})
CLOSING: Final = "close_after"


# -- measuring ------------------------------------------------------------------------


def _noop() -> None:
    return None


def _one_query() -> bool:
    from tests.testapp.models import Item

    return Item.objects.filter(pk=1).exists()


async def _sequential(call: _Call, seconds: float) -> tuple[int, float]:
    """Round trips one at a time for ``seconds``: (calls, elapsed)."""
    calls = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        await call()
        calls += 1
        if time.perf_counter() >= deadline:
            return calls, time.perf_counter() - start


async def _concurrent(call: _Call, seconds: float, concurrency: int) -> tuple[int, float, float]:
    """``concurrency`` callers, each calling back to back, for ``seconds``.

    Returns (calls, elapsed, CPU seconds used by the whole process meanwhile).
    The CPU time is what the calls cost on every thread; unlike the elapsed
    time it hardly depends on what else the machine is running.
    """
    cpu = time.process_time()
    start = time.perf_counter()
    deadline = start + seconds

    async def caller() -> int:
        calls = 0
        while time.perf_counter() < deadline:
            await call()
            calls += 1
        return calls

    counts = await asyncio.gather(*(caller() for _ in range(concurrency)))
    return sum(counts), time.perf_counter() - start, time.process_time() - cpu


class _ConnectionCounter:
    """Counts ``connection_created`` per path (by thread name) between start() and stop()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = False
        self._counts: Counter[str] = Counter()
        self._pool_opened_before = 0

    def __call__(self, sender: object, connection: object, **kwargs: object) -> None:
        # The session-count monitor's own connection belongs to no path.
        if not self._active or getattr(connection, "_dbbridge_monitor", False):
            return
        key = _path_of_thread(threading.current_thread().name) or "other"
        if key in POOLED_PATHS:
            # A pooled wrapper sends connection_created on every checkout (as
            # with Django's own pool); what it opened is the pool's count.
            return
        with self._lock:
            self._counts[key] += 1

    def start(self) -> None:
        with self._lock:
            self._counts = Counter()
            self._active = True
            self._pool_opened_before = _pool_opened()

    def stop(self) -> Counter[str]:
        with self._lock:
            self._active = False
            for key in POOLED_PATHS:
                # The pooled paths share the alias's pool; there is one.
                self._counts[key] = _pool_opened() - self._pool_opened_before
            return self._counts


def _pool_opened() -> int:
    """Connections the alias's pool has opened since it was built (0 without one)."""
    pool = pool_stats().get(ALIAS)
    return pool.opened if pool is not None else 0


_counter = _ConnectionCounter()
connection_created.connect(_counter, weak=False, dispatch_uid="bench_executor.counter")


def _settle(timeout: float, stable: float) -> int:
    """The server's session count once it is 0, or has stopped changing for ``stable`` s.

    A closed session disappears from the server a moment after the client
    closed it, so one read right after shutdown could still see it; a leaked
    one never goes, so waiting for 0 would only burn the timeout.
    """
    return settle(lambda: server_session_count(ALIAS), timeout, stable)


def _start_clean(config: Config, before: str) -> None:
    gc.collect()
    left = _settle(config.settle_timeout * 2, config.settle_timeout * 2)
    if left:
        print(f"warning: {left} session(s) still open before {before}", file=sys.stderr)


@dataclass
class SpeedSample:
    """One path, one round of the speed phase."""

    key: str
    round: int
    #: Median round trip of the sequential no-op (and, for the record, the mean).
    noop_seq_us: float = 0.0
    noop_seq_mean_us: float = 0.0
    noop_c32_us: float = 0.0
    #: Process CPU time per call (all threads) at concurrency 32.
    noop_c32_cpu_us: float = 0.0
    orm_calls_per_s: float = 0.0
    orm_cpu_us: float = 0.0
    orm_calls: int = 0


@dataclass
class SpeedPhase:
    samples: list[SpeedSample]
    connections_opened: dict[str, int]
    calls: dict[str, int]
    seconds: float
    #: --metrics: the pooled db_call path with metrics "on" and "off", per round.
    metrics: list[SpeedSample] = field(default_factory=list)


class _MetricsSwitch:
    """Both integrations, set up once; their observers registered only while switched on."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from prometheus_client import CollectorRegistry

        from async_dbbridge import _observers
        from async_dbbridge.integrations.opentelemetry import instrument
        from async_dbbridge.integrations.prometheus import DBBridgeCollector

        self.provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        instrument(meter_provider=self.provider)
        CollectorRegistry().register(DBBridgeCollector())
        self.observers = _observers.active
        self.set(on=False)

    def set(self, *, on: bool) -> None:
        from async_dbbridge import _observers

        for observer in self.observers:
            (_observers.add if on else _observers.remove)(observer)

    @staticmethod
    def drain() -> float:
        """Record what the slice queued, on this thread: the CPU seconds it took."""
        from async_dbbridge import _observers

        cpu = time.process_time()
        _observers.drain()
        return time.process_time() - cpu


def speed_phase(config: Config) -> SpeedPhase:
    """All paths on one loop, measured in interleaved slices."""
    _start_clean(config, "the speed phase")
    runners: dict[str, _Runner] = {}
    samples: list[SpeedSample] = []
    calls: Counter[str] = Counter()

    async def measure() -> None:
        loop = asyncio.get_running_loop()
        for path in PATHS:
            runners[path.key] = path.start(loop)
        bound = {
            key: (runner.bind(_noop), runner.bind(_one_query)) for key, runner in runners.items()
        }
        bound_calls.update(bound)
        for path in PATHS:
            # Start every thread and give it its connection, then the no-op path.
            noop, orm = bound[path.key]
            runners[path.key].activate(loop)
            warm_orm, _, _ = await _concurrent(orm, config.warmup, CONCURRENCY)
            warm_noop, _ = await _sequential(noop, config.warmup / 2)
            calls[path.key] += warm_orm + warm_noop
        for round_no in range(config.rounds):
            gc.collect()
            # Rotate the order each round so that no path is always first or last.
            order = rotated(PATHS, round_no)
            row = {path.key: SpeedSample(path.key, round_no) for path in order}
            # Sequential round trips in a short block per path. Taking turns
            # call by call looked fairer but is not: a round trip then depends
            # on which pool's thread ran just before, and two identical raw
            # pools measured that way differed by up to 2x.
            for path in order:
                runners[path.key].activate(loop)
                n, elapsed = await _sequential(bound[path.key][0], config.seq_seconds / len(order))
                row[path.key].noop_seq_us = elapsed / n * 1e6
                row[path.key].noop_seq_mean_us = elapsed / n * 1e6
                calls[path.key] += n
            # Throughput cannot be interleaved call by call: metric-major short
            # slices keep the two sides of a ratio close in time. The no-op
            # runs on threads that hold connections, as in an app: the per-call
            # connection checks are part of the overhead.
            for path in order:
                runners[path.key].activate(loop)
                n, elapsed, cpu = await _concurrent(
                    bound[path.key][0], config.c32_seconds, CONCURRENCY
                )
                row[path.key].noop_c32_us = elapsed / n * 1e6
                row[path.key].noop_c32_cpu_us = cpu / n * 1e6
                calls[path.key] += n
            for path in order:
                runners[path.key].activate(loop)
                n, elapsed, cpu = await _concurrent(
                    bound[path.key][1], config.orm_seconds, CONCURRENCY
                )
                row[path.key].orm_calls_per_s = n / elapsed
                row[path.key].orm_cpu_us = cpu / n * 1e6
                row[path.key].orm_calls = n
                calls[path.key] += n
            samples.extend(row.values())
            if switch is not None:
                await measure_metrics(switch, round_no)

    async def measure_metrics(switch: _MetricsSwitch, round_no: int) -> None:
        from async_dbbridge import _observers

        loop = asyncio.get_running_loop()
        runner = runners["db_call_pooled"]
        noop, orm = bound_calls["db_call_pooled"]
        for state in ("off", "on") if round_no % 2 == 0 else ("on", "off"):
            runner.activate(loop)
            switch.set(on=state == "on")
            sample = SpeedSample(state, round_no)
            _observers.drain()
            n, elapsed = await _sequential(noop, config.seq_seconds / len(PATHS))
            sample.noop_seq_us = sample.noop_seq_mean_us = elapsed / n * 1e6
            _observers.drain()
            n, elapsed, cpu = await _concurrent(noop, config.c32_seconds, CONCURRENCY)
            cpu += switch.drain()
            sample.noop_c32_us, sample.noop_c32_cpu_us = elapsed / n * 1e6, cpu / n * 1e6
            n, elapsed, cpu = await _concurrent(orm, config.orm_seconds, CONCURRENCY)
            cpu += switch.drain()
            sample.orm_calls_per_s, sample.orm_cpu_us, sample.orm_calls = (
                n / elapsed,
                cpu / n * 1e6,
                n,
            )
            metrics.append(sample)
        switch.set(on=False)

    metrics: list[SpeedSample] = []
    bound_calls: dict[str, tuple[_Call, _Call]] = {}
    switch = _MetricsSwitch() if config.metrics else None
    _counter.start()
    started = time.monotonic()
    try:
        asyncio.run(measure())
    finally:
        # Counted first: closing the pooled path closes its pool, and with it
        # the pool's count of what it opened.
        opened = _counter.stop()
        for runner in runners.values():
            runner.close()
    return SpeedPhase(
        samples,
        connections_opened={p.key: opened[p.key] for p in PATHS},
        calls=dict(calls),
        seconds=time.monotonic() - started,
        metrics=metrics,
    )


@dataclass
class LifecycleRun:
    """One path on a fresh loop and fresh threads: what it opened and what it left."""

    key: str
    round: int
    orm_calls: int
    connections_opened: int
    sessions_left: int
    sessions_left_after_gc: int


def lifecycle_run(path: BenchPath, config: Config, round_no: int) -> LifecycleRun:
    _start_clean(config, f"the lifecycle run of {path.key}")
    runners: list[_Runner] = []

    async def burst() -> int:
        runner = path.start(asyncio.get_running_loop())
        runners.append(runner)
        await _sequential(runner.bind(_noop), config.lifecycle_seconds / 4)
        n, _, _ = await _concurrent(runner.bind(_one_query), config.lifecycle_seconds, CONCURRENCY)
        return n

    _counter.start()
    try:
        # asyncio.run() closes the loop and shuts down its default executor.
        orm_calls = asyncio.run(burst())
    finally:
        opened = _counter.stop()  # before the pool closes (see the speed phase)
        for runner in runners:
            runner.close()
    left = _settle(config.settle_timeout, config.settle_stable)
    # A leaked connection belongs to a wrapper held only by reference cycles
    # once its thread is gone: the collector finalizes it and the driver closes
    # the socket. Collect now so the next run starts from zero.
    gc.collect()
    left_after_gc = _settle(config.settle_timeout * 2, config.settle_timeout * 2)
    return LifecycleRun(
        key=path.key,
        round=round_no,
        orm_calls=orm_calls,
        connections_opened=sum(opened.values()),
        sessions_left=left,
        sessions_left_after_gc=left_after_gc,
    )


# -- the database ---------------------------------------------------------------------


def _drop_database_sql(vendor: str, quoted: str) -> str:
    if vendor == "postgresql":
        # FORCE (PostgreSQL 13+; Django 5.2 needs 14) ends sessions a crashed run left.
        return f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"
    return f"DROP DATABASE IF EXISTS {quoted}"


def create_database() -> str:
    """Create the benchmark database with one ``Item``; returns the server version."""
    from tests.testapp.models import Item

    conn = connections[ALIAS]
    name = str(conn.settings_dict["NAME"])
    if conn.vendor == "sqlite":
        if os.path.exists(name):
            os.remove(name)
    else:
        quoted = conn.ops.quote_name(name)
        charset = " CHARACTER SET utf8mb4" if conn.vendor == "mysql" else ""
        with conn._nodb_cursor() as cursor:
            cursor.execute(_drop_database_sql(conn.vendor, quoted))
            cursor.execute(f"CREATE DATABASE {quoted}{charset}")
    with conn.schema_editor() as editor:
        editor.create_model(Item)
    Item.objects.create(pk=1, name="bench", value=1)
    version = server_version(ALIAS)
    # The main thread holds no session while the paths are measured.
    connections.close_all()
    return version


def drop_database() -> None:
    connections.close_all()
    close_monitor()
    conn = connections[ALIAS]
    name = str(conn.settings_dict["NAME"])
    if conn.vendor == "sqlite":
        if os.path.exists(name):
            os.remove(name)
        return
    with conn._nodb_cursor() as cursor:
        cursor.execute(_drop_database_sql(conn.vendor, conn.ops.quote_name(name)))


# -- results --------------------------------------------------------------------------


@dataclass
class PathSummary:
    key: str
    label: str
    noop_seq_us: float
    noop_c32_us: float
    noop_seq_vs_raw: float
    noop_c32_vs_raw: float
    noop_c32_cpu_us: float
    noop_c32_cpu_vs_raw: float
    orm_calls_per_s: float
    orm_cpu_us: float
    orm_vs_raw: float
    orm_vs_close_after: float
    #: Speed phase: connections opened over all its calls.
    connections_opened: int
    calls: int
    #: Lifecycle runs: the most opened in one run, and the most sessions left.
    lifecycle_connections_opened_max: int
    sessions_left_max: int
    sessions_left_after_gc_max: int


@dataclass
class Check:
    status: str  # PASS, FAIL or INFO
    text: str


@dataclass
class Report:
    environment: dict[str, Any]
    config: dict[str, Any]
    speed: list[SpeedSample] = field(default_factory=list)
    lifecycle: list[LifecycleRun] = field(default_factory=list)
    summary: list[PathSummary] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


_Metric = Callable[[SpeedSample], float]


def _noop_seq(sample: SpeedSample) -> float:
    return sample.noop_seq_us


def _noop_c32(sample: SpeedSample) -> float:
    return sample.noop_c32_us


def _noop_c32_cpu(sample: SpeedSample) -> float:
    return sample.noop_c32_cpu_us


def _orm_rate(sample: SpeedSample) -> float:
    return sample.orm_calls_per_s


def _paired_ratio(samples: Sequence[SpeedSample], key: str, base: str, metric: _Metric) -> float:
    """Median over rounds of metric(key) / metric(base) measured in the same round."""
    by_round: dict[int, dict[str, SpeedSample]] = {}
    for sample in samples:
        by_round.setdefault(sample.round, {})[sample.key] = sample
    return statistics.median(metric(row[key]) / metric(row[base]) for row in by_round.values())


def summarize(speed: SpeedPhase, lifecycle: Sequence[LifecycleRun]) -> list[PathSummary]:
    summaries = []
    samples = speed.samples
    for path in PATHS:
        mine = [s for s in samples if s.key == path.key]
        runs = [r for r in lifecycle if r.key == path.key]
        summaries.append(
            PathSummary(
                key=path.key,
                label=path.label,
                noop_seq_us=statistics.median(s.noop_seq_us for s in mine),
                noop_c32_us=statistics.median(s.noop_c32_us for s in mine),
                noop_seq_vs_raw=_paired_ratio(samples, path.key, BASELINE, _noop_seq),
                noop_c32_vs_raw=_paired_ratio(samples, path.key, BASELINE, _noop_c32),
                noop_c32_cpu_us=statistics.median(s.noop_c32_cpu_us for s in mine),
                noop_c32_cpu_vs_raw=_paired_ratio(samples, path.key, BASELINE, _noop_c32_cpu),
                orm_calls_per_s=statistics.median(s.orm_calls_per_s for s in mine),
                orm_cpu_us=statistics.median(s.orm_cpu_us for s in mine),
                orm_vs_raw=_paired_ratio(samples, path.key, BASELINE, _orm_rate),
                orm_vs_close_after=_paired_ratio(samples, path.key, CLOSING, _orm_rate),
                connections_opened=speed.connections_opened[path.key],
                calls=speed.calls[path.key],
                lifecycle_connections_opened_max=max(r.connections_opened for r in runs),
                sessions_left_max=max(r.sessions_left for r in runs),
                sessions_left_after_gc_max=max(r.sessions_left_after_gc for r in runs),
            )
        )
    return summaries


def _reconnect_bound(seconds: float) -> int:
    """The most connections one worker may open in ``seconds`` under ``CONN_MAX_AGE``.

    A persistent connection is replaced, on its thread's next call, once it is
    older than ``CONN_MAX_AGE``: a worker opens at most one per that many
    seconds, plus the first.
    """
    max_age = connections[ALIAS].settings_dict["CONN_MAX_AGE"]
    if not max_age:  # 0: a connection per call; None: never replaced
        return 1 if max_age is None else sys.maxsize
    return 1 + int(seconds // max_age)


def check_targets(
    summary: Sequence[PathSummary], speed_seconds: float, lifecycle_rounds: int
) -> list[Check]:
    by_key = {s.key: s for s in summary}
    ours, raw, pooled = by_key["db_call"], by_key[BASELINE], by_key["db_call_pooled"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    speed_bound = WORKERS * _reconnect_bound(speed_seconds)
    in_range = 13 <= raw.orm_vs_close_after <= 18
    pool_size = get_settings().effective_pool_size
    return [
        Check(
            verdict(pooled.noop_seq_vs_raw <= 1.0 and pooled.noop_c32_vs_raw <= 1.0),
            f"db_call through the pool (the bridge's way) no-op overhead <= 1.0x raw "
            f"run_in_executor: {pooled.noop_seq_vs_raw:.2f}x sequential, "
            f"{pooled.noop_c32_vs_raw:.2f}x at concurrency {CONCURRENCY}",
        ),
        Check(
            verdict(pooled.orm_vs_raw >= 0.95),
            f"db_call through the pool one-query throughput >= 0.95x raw pool: "
            f"{pooled.orm_vs_raw:.2f}x",
        ),
        Check(
            verdict(
                pooled.lifecycle_connections_opened_max <= pool_size
                and pooled.sessions_left_max == 0
            ),
            f"db_call through the pool opened <= POOL_SIZE={pool_size} per lifecycle run "
            f"(at most {pooled.lifecycle_connections_opened_max}) and left 0 sessions once "
            f"the pool closed (at most {pooled.sessions_left_max})",
        ),
        Check(
            verdict(ours.noop_seq_vs_raw <= 1.0 and ours.noop_c32_vs_raw <= 1.0),
            f"db_call no-op overhead <= 1.0x raw run_in_executor: "
            f"{ours.noop_seq_vs_raw:.2f}x sequential, "
            f"{ours.noop_c32_vs_raw:.2f}x at concurrency {CONCURRENCY} "
            f"(CPU per call at {CONCURRENCY}: {ours.noop_c32_cpu_vs_raw:.2f}x, informational)",
        ),
        Check(
            verdict(ours.orm_vs_raw >= 0.95),
            f"db_call one-query throughput >= 0.95x raw pool: {ours.orm_vs_raw:.2f}x",
        ),
        Check(
            "INFO",
            f"raw pool is {raw.orm_vs_close_after:.1f}x the close-after-every-call executor "
            f"(DESIGN.md §5, measured on PostgreSQL: 13-18x; "
            f"{'inside' if in_range else 'outside'} that range)",
        ),
        Check(
            verdict(ours.lifecycle_connections_opened_max <= WORKERS),
            f"connections opened by db_call <= {WORKERS} workers: "
            f"at most {ours.lifecycle_connections_opened_max} per lifecycle run",
        ),
        Check(
            verdict(ours.connections_opened <= speed_bound),
            f"connections opened by db_call in the {speed_seconds:.0f} s speed phase "
            f"<= {speed_bound} ({WORKERS} workers, each connection replaced once older than "
            f"CONN_MAX_AGE): {ours.connections_opened} over {ours.calls:,} calls",
        ),
        Check(
            verdict(ours.sessions_left_max == 0),
            f"0 sessions left by db_call after shutdown: "
            f"at most {ours.sessions_left_max} over {lifecycle_rounds} lifecycle run(s)",
        ),
    ]


def _sessions_cell(summary: PathSummary) -> str:
    if summary.sessions_left_max == summary.sessions_left_after_gc_max:
        return str(summary.sessions_left_max)
    return f"{summary.sessions_left_max} ({summary.sessions_left_after_gc_max} after gc)"


def markdown_table(summary: Sequence[PathSummary]) -> str:
    lines = [
        "| path | no-op µs/call (seq / c32) | ratio vs raw | ORM calls/s (c32) "
        "| ratio vs raw | x blog-fix | CPU µs/call (no-op c32 / ORM) "
        "| conns opened / calls | sessions left |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s.label} | {s.noop_seq_us:.1f} / {s.noop_c32_us:.1f} "
            f"| {s.noop_seq_vs_raw:.2f}x / {s.noop_c32_vs_raw:.2f}x "
            f"| {s.orm_calls_per_s:,.0f} | {s.orm_vs_raw:.2f}x | {s.orm_vs_close_after:.1f}x "
            f"| {s.noop_c32_cpu_us:.1f} / {s.orm_cpu_us:.0f} "
            f"| {s.connections_opened:,} / {s.calls:,} | {_sessions_cell(s)} |"
        )
    return "\n".join(lines)


def print_report(report: Report) -> None:
    env, cfg = report.environment, report.config
    print(
        f"## bench_executor: {env['server']}, Python {env['python']}, "
        f"Django {env['django']}, asgiref {env['asgiref']}, {env['cpus']} CPUs"
    )
    print()
    print(
        f"{WORKERS} workers per path, {CONCURRENCY} concurrent callers, CONN_MAX_AGE=60. "
        f"Speed: {cfg['rounds']} interleaved rounds (sequential no-op: {cfg['seq_seconds']} s "
        f"in one block per path; per path {cfg['c32_seconds']} s of no-op and "
        f"{cfg['orm_seconds']} s of ORM at c32), medians. Lifecycle: "
        f"{cfg['lifecycle_rounds']} run(s) per path of {cfg['lifecycle_seconds']} s."
    )
    print()
    print(markdown_table(report.summary))
    print()
    print(
        "no-op seq: median round trip of one call at a time; c32: wall time per call with "
        f"{CONCURRENCY} callers. CPU: this process's CPU time per call, all threads (the "
        "database server's not included); it depends far less than wall time on what else "
        "the machine runs. Ratios are medians of per-round ratios: a no-op ratio below "
        "1 is faster than raw, an ORM ratio above 1 is faster. "
        "conns opened / calls: over the whole speed phase "
        "(warm-up included). sessions left: the most over the lifecycle runs once the pool "
        "was shut down and the loop closed, before gc.collect() (and after it, if different)."
    )
    print()
    for check in report.checks:
        print(f"{check.status} {check.text}")


def metrics_report(samples: Sequence[SpeedSample]) -> str:
    """--metrics: the pooled db_call path, both integrations recording vs none, per round."""
    by_round: dict[int, dict[str, SpeedSample]] = {}
    for sample in samples:
        by_round.setdefault(sample.round, {})[sample.key] = sample
    pairs = [(row["on"], row["off"]) for row in by_round.values() if len(row) == 2]
    lines = [
        "metrics (`db_call` pooled; on: OpenTelemetry SDK + Prometheus collector recording), "
        "medians, on/off ratio = median of per-round ratios:"
    ]
    for label, metric in (
        ("no-op seq us", _noop_seq),
        ("no-op c32 us", _noop_c32),
        ("no-op c32 CPU us/call", _noop_c32_cpu),
        ("ORM c32 CPU us/call", lambda s: s.orm_cpu_us),
        ("ORM c32 calls/s", _orm_rate),
    ):
        on = statistics.median(metric(a) for a, _ in pairs)
        off = statistics.median(metric(b) for _, b in pairs)
        ratio = statistics.median(metric(a) / metric(b) for a, b in pairs if metric(b) > 0)
        lines.append(f"  {label:24} off {off:10.1f}   on {on:10.1f}   on/off {ratio:.3f}")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------


def _setup_django(backend: str) -> None:
    os.environ["DBBRIDGE_BENCH_BACKEND"] = backend
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.settings"
    django.setup()


def parse_args(argv: Sequence[str] | None) -> tuple[Config, str | None]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--backend", choices=("postgresql", "mysql", "sqlite"), default="postgresql"
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    parser.add_argument("--rounds", type=int, help="speed-phase rounds (default 20, quick 8)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="also measure pooled db_call with both metrics integrations on and off",
    )
    args = parser.parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "full"])
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        preset["rounds"] = args.rounds
    return Config(backend=args.backend, metrics=args.metrics, **preset), args.json


def main(argv: Sequence[str] | None = None) -> int:
    config, json_path = parse_args(argv)
    _setup_django(config.backend)
    started = time.monotonic()
    server = create_database()
    report = Report(
        environment={
            "server": server,
            "python": platform.python_version(),
            "django": django.get_version(),
            "asgiref": asgiref.__version__,
            "async_dbbridge": async_dbbridge.__version__,
            "cpus": os.cpu_count(),
        },
        config={**asdict(config), "workers": WORKERS, "concurrency": CONCURRENCY},
    )
    try:
        speed = speed_phase(config)
        report.speed = speed.samples
        report.environment["speed_seconds"] = round(speed.seconds, 1)
        for round_no in range(config.lifecycle_rounds):
            for path in rotated(PATHS, round_no):
                report.lifecycle.append(lifecycle_run(path, config, round_no))
    except OperationalError as exc:
        # Most often "too many clients": other programs hold the server's slots.
        print(
            f"bench_executor: aborted, the database refused a connection: {exc}\n"
            f"The speed phase holds up to {5 * WORKERS + 1} sessions at once; "
            "free some connection slots and run it again.",
            file=sys.stderr,
        )
        return 2
    finally:
        drop_database()
    report.summary = summarize(speed, report.lifecycle)
    report.checks = check_targets(report.summary, speed.seconds, config.lifecycle_rounds)
    report.environment["seconds"] = round(time.monotonic() - started, 1)
    print_report(report)
    if speed.metrics:
        print()
        print(metrics_report(speed.metrics))
    print(f"\n({report.environment['seconds']} s)")
    if json_path:
        Path(json_path).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 1 if any(check.status == "FAIL" for check in report.checks) else 0


if __name__ == "__main__":
    sys.exit(main())
