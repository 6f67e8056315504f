"""Prometheus: the pools' figures as `db_client_connection_*` metrics, per alias.

```python
# Not runnable: it runs once, at a project's startup (AppConfig.ready(), asgi.py).
from prometheus_client import REGISTRY

from async_dbbridge.integrations.prometheus import DBBridgeCollector

REGISTRY.register(DBBridgeCollector())
```

The names are what OpenTelemetry's metric-name translation makes of the
`db.client.connection.*` instruments of
`async_dbbridge.integrations.opentelemetry` (dots to
underscores, the unit `s` as a `_seconds` suffix, `_total` on counters), and
the labels are its attributes translated the same way:
`db_client_connection_pool_name` (the Django alias) and, on
`db_client_connection_count`, `db_client_connection_state` (`idle`|`used`).
A dashboard then works with either exporter.

**Several worker processes** (gunicorn or uvicorn `--workers`):
`prometheus_client`'s multiprocess mode (`PROMETHEUS_MULTIPROC_DIR` set in
the environment before `prometheus_client` is imported) reads metric values
that every process writes to files, and takes no custom collector. In that
mode `DBBridgeCollector()` — made in each worker — writes the figures as such
values instead: histograms and counters as they happen, the gauges (`livesum`:
summed over the live processes) refreshed from
[`stats()`][async_dbbridge.stats] every `interval` seconds by a daemon
thread. The scraping process serves them through
`prometheus_client.multiprocess.MultiProcessCollector`; registering the
collector itself there adds nothing (its `collect()` returns nothing in that
mode). The documentation's metrics page shows both set-ups.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import _fork, _observers
from .._executor import call_counts
from .._lending import pool_stats
from .._pool import PoolStats
from .._request_threads import combined_stats
from .._validation import is_number

__all__ = ("DBBridgeCollector", "multiprocess_mode")

POOL: Final = "db_client_connection_pool_name"
STATE: Final = "db_client_connection_state"
EXECUTOR: Final = "async_dbbridge_executor"
THREAD_STATE: Final = "async_dbbridge_thread_state"

#: As the OpenTelemetry integration's: seconds, the conventions' advice.
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)

#: The gauges: name, help, and how a pool's snapshot gives its value.
_POOL_GAUGES: Final = (
    (
        "db_client_connection_idle_max",
        "The maximum number of idle open connections allowed.",
        lambda s: s.max_size,
    ),
    (
        "db_client_connection_idle_min",
        "The minimum number of idle open connections allowed.",
        lambda s: 0,
    ),
    (
        "db_client_connection_max",
        "The maximum number of open connections allowed.",
        lambda s: s.max_size,
    ),
    (
        "db_client_connection_pending_requests",
        "The number of current pending requests for an open connection.",
        lambda s: s.waiting,
    ),
)
_COUNT: Final = "db_client_connection_count"
_COUNT_HELP: Final = "The number of connections that are currently in the state given by its label."
_THREADS: Final = "async_dbbridge_request_threads"
_THREADS_HELP: Final = "The ASGI wrapper's request threads, by state (busy, idle)."


def multiprocess_mode() -> bool:
    """Whether `prometheus_client` runs in multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _Recorder(_observers.Observer):
    """Histograms and counters, recorded as events happen.

    Not registered with any registry: the collector yields their samples in a
    single process; in multiprocess mode `prometheus_client` writes every
    value to the process's files, where `MultiProcessCollector` finds them.
    Durations reach `record_durations()` in batches from `_observers`' queue
    (the hot path appends to it once, for every exporter): by the flusher
    thread, and at each scrape or refresh (`flush()`).
    """

    def __init__(self) -> None:
        def histogram(name: str, documentation: str, label: str) -> Histogram:
            return Histogram(name, documentation, (label,), registry=None, buckets=DURATION_BUCKETS)

        def counter(name: str, documentation: str, label: str) -> Counter:
            return Counter(name, documentation, (label,), registry=None)

        self.create_time = histogram(
            "db_client_connection_create_time_seconds",
            "The time it took to create a new connection.",
            POOL,
        )
        self.wait_time = histogram(
            "db_client_connection_wait_time_seconds",
            "The time it took to obtain an open connection from the pool.",
            POOL,
        )
        self.use_time = histogram(
            "db_client_connection_use_time_seconds",
            "The time between borrowing a connection and returning it to the pool.",
            POOL,
        )
        self.timeouts = counter(
            "db_client_connection_timeouts",
            "The number of connection timeouts that have occurred trying to obtain a "
            "connection from the pool.",
            POOL,
        )
        self.rollbacks = counter(
            "async_dbbridge_transactions_rolled_back",
            "Transactions left open, rolled back when the connection was released.",
            POOL,
        )
        self.stranded = counter(
            "async_dbbridge_connections_stranded_closed",
            "Connections opened on threads the library does not own, closed after their "
            "thread ended (CLOSE_STRANDED).",
            POOL,
        )

        # Indexed by the duration's kind (_observers.CREATED, WAITED, USED):
        # each histogram's observe() per alias, its child looked up once
        # (labels() takes a lock).
        self._histograms = (self.create_time, self.wait_time, self.use_time)
        self._observe: tuple[dict[str, Callable[[float], None]], ...] = ({}, {}, {})

    def flush(self) -> None:
        _observers.drain()

    def record_durations(self, durations: Sequence[_observers.Duration]) -> None:
        by_kind = self._observe
        for kind, alias, seconds in durations:
            observe = by_kind[kind].get(alias)
            if observe is None:
                observe = by_kind[kind][alias] = self._histograms[kind].labels(alias).observe
            observe(seconds)

    def metrics(self) -> tuple[Histogram | Counter, ...]:
        return (
            self.create_time,
            self.wait_time,
            self.use_time,
            self.timeouts,
            self.rollbacks,
            self.stranded,
        )

    def checkout_failed(self, alias: str, *, rejected: bool) -> None:
        self.timeouts.labels(alias).inc()

    def rolled_back(self, alias: str) -> None:
        self.rollbacks.labels(alias).inc()

    def stranded_closed(self, alias: str) -> None:
        self.stranded.labels(alias).inc()


class _LiveGauges:
    """The gauges as multiprocess `livesum` values, refreshed from `stats()`."""

    def __init__(self) -> None:
        def gauge(name: str, documentation: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, documentation, labels, registry=None, multiprocess_mode="livesum")

        self.count = gauge(_COUNT, _COUNT_HELP, (POOL, STATE))
        self.pool_gauges = [
            (gauge(name, documentation, (POOL,)), value)
            for name, documentation, value in _POOL_GAUGES
        ]
        self.threads = gauge(_THREADS, _THREADS_HELP, (THREAD_STATE,))
        self.calls = _CallCounters()
        self._aliases: set[str] = set()
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            pools = pool_stats()
            # A pool closed since the last refresh reports nothing in use any more.
            for alias in self._aliases - pools.keys():
                self._set(alias, None)
            for alias, stats in pools.items():
                self._set(alias, stats)
            self._aliases = set(pools)
            threads = combined_stats()
            self.threads.labels("busy").set(threads.busy if threads else 0)
            self.threads.labels("idle").set(threads.idle if threads else 0)
            self.calls.refresh()

    def _set(self, alias: str, stats: PoolStats | None) -> None:
        self.count.labels(alias, "idle").set(stats.idle if stats else 0)
        self.count.labels(alias, "used").set(stats.in_use if stats else 0)
        for gauge, value in self.pool_gauges:
            gauge.labels(alias).set(value(stats) if stats else 0)


class DBBridgeCollector(Collector):
    """A `prometheus_client` collector of the pools' and the bridge's figures.

    In one process, register it: gauges are read from
    [`stats()`][async_dbbridge.stats] at each scrape, histograms and counters
    recorded as events happen (an observer that costs nothing until a
    collector exists). With `PROMETHEUS_MULTIPROC_DIR` set, make one in each
    worker process instead (see the module's documentation); `interval` is
    then how often its gauges are refreshed, in seconds.

    `close()` stops recording (and the refreshing thread).
    """

    def __init__(self, *, interval: float = 1.0) -> None:
        if not (is_number(interval) and 0 < interval < float("inf")):
            raise ValueError(f"interval must be a finite number of seconds > 0, not {interval!r}")
        self.interval = float(interval)
        self.multiprocess = multiprocess_mode()
        self._recorder = _Recorder()
        self._live: _LiveGauges | None = None
        self._stop = threading.Event()
        _observers.add(self._recorder)
        if self.multiprocess:
            self._live = _LiveGauges()
            self._live.refresh()
            self._start_refresher()
            # A forked worker (gunicorn --preload) has no refresher thread:
            # start one there. prometheus_client reopens its files per pid.
            ref = weakref.ref(self)
            _fork.on_child(lambda: _restart(ref), order=_fork.ORDER_POOLS + 1)

    def _start_refresher(self) -> None:
        thread = threading.Thread(
            target=self._refresh_until_closed,
            name="async_dbbridge-prometheus",
            daemon=True,
        )
        thread.start()

    def _refresh_until_closed(self) -> None:
        # A timed wait on an event is this thread's schedule, not a
        # synchronisation: figures are at most `interval` seconds old.
        while not self._stop.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        """Multiprocess mode: write the queued durations and the gauges' values now.

        (The refreshing thread does it every `interval` seconds; in a single
        process each scrape does it.)
        """
        self._recorder.flush()
        if self._live is not None:
            self._live.refresh()

    def close(self) -> None:
        """Stop recording events and refreshing gauges."""
        self._stop.set()
        _observers.remove(self._recorder)

    def collect(self) -> Iterator[Metric]:
        if self.multiprocess:
            # MultiProcessCollector reads the values from the files; yielding
            # them here too would count this process twice.
            return
        pools = pool_stats()
        count = GaugeMetricFamily(_COUNT, _COUNT_HELP, labels=(POOL, STATE))
        for alias, stats in pools.items():
            count.add_metric((alias, "idle"), stats.idle)
            count.add_metric((alias, "used"), stats.in_use)
        yield count
        for name, documentation, value in _POOL_GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=(POOL,))
            for alias, stats in pools.items():
                family.add_metric((alias,), value(stats))
            yield family
        threads = combined_stats()
        family = GaugeMetricFamily(_THREADS, _THREADS_HELP, labels=(THREAD_STATE,))
        family.add_metric(("busy",), threads.busy if threads else 0)
        family.add_metric(("idle",), threads.idle if threads else 0)
        yield family
        self._recorder.flush()
        for metric in self._recorder.metrics():
            yield from metric.collect()
        yield from _call_families(call_counts())

    def describe(self) -> Iterable[Metric]:
        # Registering must not collect (that would create no pool, but reads
        # every lock); an empty description makes the registry call collect()
        # at scrape time only.
        return ()


_CALLS: Final = (
    ("async_dbbridge_calls", "Calls run by DBExecutors (db_call, db_sync_to_async, submit)."),
    ("async_dbbridge_call_errors", "DBExecutor calls that raised."),
    (
        "async_dbbridge_call_time_seconds",
        "Seconds spent running DBExecutor calls, connection cleanup included (over calls: "
        "the mean call duration).",
    ),
)


def _call_families(counts: dict[str, tuple[int, int, float]]) -> Iterator[Metric]:
    """The executors' own counts (read at scrape time: a call records nothing for metrics)."""
    for index, (name, documentation) in enumerate(_CALLS):
        family = CounterMetricFamily(name, documentation, labels=(EXECUTOR,))
        for executor, values in counts.items():
            family.add_metric((executor,), values[index])
        yield family


class _CallCounters:
    """Multiprocess mode: the executors' counts written as counters, by increments.

    A counter's file value can only grow: each refresh adds what grew since
    the last one (an executor gone, its count shrinking, starts a new baseline).
    """

    def __init__(self) -> None:
        self.counters = [
            Counter(name, documentation, (EXECUTOR,), registry=None)
            for name, documentation in _CALLS
        ]
        self._last: dict[str, tuple[int, int, float]] = {}

    def refresh(self) -> None:
        for executor, values in call_counts().items():
            last = self._last.get(executor, (0, 0, 0.0))
            for counter, now, before in zip(self.counters, values, last, strict=True):
                counter.labels(executor).inc(now - before if now >= before else now)
            self._last[executor] = values


def _restart(ref: weakref.ref[DBBridgeCollector]) -> None:
    collector = ref()
    if collector is not None and not collector._stop.is_set():
        collector._start_refresher()
