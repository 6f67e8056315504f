"""OpenTelemetry: the pools' `db.client.connection.*` metrics and the library's own.

```python
# Not runnable: it runs once, at a project's startup (AppConfig.ready(), asgi.py).
from async_dbbridge.integrations.opentelemetry import instrument

instrument()  # the global MeterProvider; instrument(meter_provider=provider) for another
```

Only `opentelemetry-api` is imported (the `opentelemetry` extra): whatever SDK,
reader and exporter the project configures (OTLP, Prometheus, console...)
picks the instruments up. The instruments follow the OpenTelemetry semantic
conventions for database client metrics, **v1.44.0** (names, units,
instrument kinds and attributes checked against
`opentelemetry-semantic-conventions` 0.66b2, which ships that schema; these
instruments are still *development* status there, so a later version may
rename them).
Every one carries `db.client.connection.pool.name`, the Django database
alias (`"default"`): see docs/metrics.md for why.

Gauges (connections idle and used, the pool's size, threads waiting, request
threads busy and idle) are observable instruments, read from
[`stats()`][async_dbbridge.stats] when the reader collects; nothing is done
per checkout for them. Histograms and counters are recorded as events happen,
through an observer (`_observers`), which costs nothing when `instrument()`
was never called.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from .. import __version__, _observers
from .._executor import call_counts
from .._lending import pool_stats
from .._request_threads import combined_stats

__all__ = ("SEMCONV_VERSION", "Instrumentation", "instrument")

#: The semantic conventions version the `db.client.connection.*` instruments follow.
SEMCONV_VERSION: Final = "1.44.0"
SCHEMA_URL: Final = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"
EXECUTOR: Final = "async_dbbridge.executor"

#: Histogram buckets in seconds: the conventions' advice for database client
#: durations (`db.client.operation.duration`); the SDK's default buckets are
#: made for milliseconds and would put every checkout in the first one.
DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)


class _Recorder(_observers.Observer):
    """Records the events of the pools and the bridge into synchronous instruments.

    Durations reach `record_durations()` in batches from `_observers`' queue:
    the hot path only appends to it (once for every exporter), and the
    histograms are fed by the flusher thread and when the reader collects
    (`flush()`, called from the observable instruments' callbacks, which the
    SDK runs before it reads the synchronous instruments of the same
    collection). Each duration is one `Histogram.record()`: the SDK's own cost,
    which nothing here can lower without changing what the histograms hold.
    """

    def __init__(self, meter: metrics.Meter) -> None:
        histogram = meter.create_histogram
        counter = meter.create_counter
        create_time = histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        wait_time = histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        use_time = histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.timeouts = counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool.",
        )
        self.rollbacks = counter(
            "async_dbbridge.transactions.rolled_back",
            unit="{transaction}",
            description="Transactions left open by a call, request or job, rolled back "
            "when the connection was released.",
        )
        self.stranded = counter(
            "async_dbbridge.connections.stranded_closed",
            unit="{connection}",
            description="Connections opened on threads the library does not own, closed "
            "after their thread ended (CLOSE_STRANDED).",
        )
        # Indexed by the duration's kind (_observers.CREATED, WAITED, USED).
        self._record = (create_time.record, wait_time.record, use_time.record)
        # Attribute dicts are made once per alias, not per event (the SDK copies them).
        self._pools: dict[str, dict[str, str]] = {}

    def _pool(self, alias: str) -> dict[str, str]:
        attributes = self._pools.get(alias)
        if attributes is None:
            attributes = self._pools[alias] = {POOL_NAME: alias}
        return attributes

    def flush(self) -> None:
        _observers.drain()

    def record_durations(self, durations: Sequence[_observers.Duration]) -> None:
        record, pools = self._record, self._pools
        for kind, alias, seconds in durations:
            attributes = pools.get(alias)
            if attributes is None:
                attributes = self._pool(alias)
            record[kind](seconds, attributes)

    def checkout_failed(self, alias: str, *, rejected: bool) -> None:
        self.timeouts.add(1, self._pool(alias))

    def rolled_back(self, alias: str) -> None:
        self.rollbacks.add(1, self._pool(alias))

    def stranded_closed(self, alias: str) -> None:
        self.stranded.add(1, self._pool(alias))


def _connection_count(options: CallbackOptions) -> Iterable[Observation]:
    for alias, stats in pool_stats().items():
        yield Observation(stats.idle, {POOL_NAME: alias, STATE: "idle"})
        yield Observation(stats.in_use, {POOL_NAME: alias, STATE: "used"})


def _idle_max(options: CallbackOptions) -> Iterable[Observation]:
    # Every slot may be idle: the pool keeps no separate cap on idle connections.
    for alias, stats in pool_stats().items():
        yield Observation(stats.max_size, {POOL_NAME: alias})


def _idle_min(options: CallbackOptions) -> Iterable[Observation]:
    # The pool keeps no minimum: idle connections all retire after IDLE_TIMEOUT.
    for alias in pool_stats():
        yield Observation(0, {POOL_NAME: alias})


def _max(options: CallbackOptions) -> Iterable[Observation]:
    for alias, stats in pool_stats().items():
        yield Observation(stats.max_size, {POOL_NAME: alias})


def _pending(options: CallbackOptions) -> Iterable[Observation]:
    for alias, stats in pool_stats().items():
        yield Observation(stats.waiting, {POOL_NAME: alias})


def _calls(options: CallbackOptions) -> Iterable[Observation]:
    for executor, (calls, _errors, _seconds) in call_counts().items():
        yield Observation(calls, {EXECUTOR: executor})


def _call_errors(options: CallbackOptions) -> Iterable[Observation]:
    for executor, (_calls, errors, _seconds) in call_counts().items():
        yield Observation(errors, {EXECUTOR: executor})


def _call_time(options: CallbackOptions) -> Iterable[Observation]:
    for executor, (_calls, _errors, seconds) in call_counts().items():
        yield Observation(seconds, {EXECUTOR: executor})


def _request_threads(options: CallbackOptions) -> Iterable[Observation]:
    threads = combined_stats()
    if threads is not None:
        yield Observation(threads.busy, {"async_dbbridge.thread.state": "busy"})
        yield Observation(threads.idle, {"async_dbbridge.thread.state": "idle"})


_Callback = Callable[[CallbackOptions], Iterable[Observation]]


class Instrumentation:
    """What [`instrument()`][async_dbbridge.integrations.opentelemetry.instrument] set up.

    `uninstrument()` stops the recording (the observable instruments stay
    registered with the meter, as the API cannot remove them, but report
    nothing more).
    """

    def __init__(self, meter_provider: MeterProvider) -> None:
        self.meter_provider = meter_provider
        meter = meter_provider.get_meter("async_dbbridge", __version__, schema_url=SCHEMA_URL)
        self._recorder = _Recorder(meter)
        self._active = True

        def live(callback: _Callback) -> _Callback:
            # The API cannot unregister an observable instrument: after
            # uninstrument() its callback reports nothing.
            def observe(options: CallbackOptions) -> Iterable[Observation]:
                if not self._active:
                    return ()
                # Feed the histograms the durations queued since the last
                # collection: the SDK runs these callbacks first, then reads the
                # synchronous instruments, so they count in this collection.
                self._recorder.flush()
                return callback(options)

            return observe

        updown = meter.create_observable_up_down_counter
        updown(
            "db.client.connection.count",
            callbacks=[live(_connection_count)],
            unit="{connection}",
            description="The number of connections that are currently in state described "
            "by the state attribute.",
        )
        updown(
            "db.client.connection.idle.max",
            callbacks=[live(_idle_max)],
            unit="{connection}",
            description="The maximum number of idle open connections allowed.",
        )
        updown(
            "db.client.connection.idle.min",
            callbacks=[live(_idle_min)],
            unit="{connection}",
            description="The minimum number of idle open connections allowed.",
        )
        updown(
            "db.client.connection.max",
            callbacks=[live(_max)],
            unit="{connection}",
            description="The maximum number of open connections allowed.",
        )
        updown(
            "db.client.connection.pending_requests",
            callbacks=[live(_pending)],
            unit="{request}",
            description="The number of current pending requests for an open connection.",
        )
        updown(
            "async_dbbridge.request_threads",
            callbacks=[live(_request_threads)],
            unit="{thread}",
            description="The ASGI wrapper's request threads, by state (busy, idle).",
        )
        # Read from the executors' own counts at collection: a call records
        # nothing for metrics (ExecutorStats.call_time).
        observable_counter = meter.create_observable_counter
        observable_counter(
            "async_dbbridge.calls",
            callbacks=[live(_calls)],
            unit="{call}",
            description="Calls run by DBExecutors (db_call, db_sync_to_async, submit).",
        )
        observable_counter(
            "async_dbbridge.call.errors",
            callbacks=[live(_call_errors)],
            unit="{call}",
            description="DBExecutor calls that raised.",
        )
        observable_counter(
            "async_dbbridge.call.time",
            callbacks=[live(_call_time)],
            unit="s",
            description="Seconds spent running DBExecutor calls, connection cleanup included "
            "(over calls: the mean call duration).",
        )
        _observers.add(self._recorder)

    def flush(self) -> None:
        """Record the queued durations now (a collection does it first anyway)."""
        self._recorder.flush()

    def uninstrument(self) -> None:
        """Stop recording and observing."""
        self._active = False
        _observers.remove(self._recorder)
        with _lock:
            if _instrumented.get(id(self.meter_provider)) is self:
                del _instrumented[id(self.meter_provider)]


_lock = threading.Lock()
_instrumented: dict[int, Instrumentation] = {}


def instrument(meter_provider: MeterProvider | None = None) -> Instrumentation:
    """Report the connection pools and the bridge to OpenTelemetry.

    Idempotent per provider: a second call with the same provider returns the
    first call's [`Instrumentation`][async_dbbridge.integrations.opentelemetry.Instrumentation].

    Args:
        meter_provider: Where the instruments are created; `None`: the global
            provider (`opentelemetry.metrics.get_meter_provider()`), as
            OpenTelemetry's own instrumentations do. Set the global provider
            first: instruments made on the no-op provider report nowhere.
    """
    provider = metrics.get_meter_provider() if meter_provider is None else meter_provider
    with _lock:
        existing = _instrumented.get(id(provider))
        if existing is not None:
            return existing
        instrumentation = _instrumented[id(provider)] = Instrumentation(provider)
    return instrumentation
