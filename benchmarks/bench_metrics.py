"""What do metrics and CLOSE_STRANDED cost on the hot path? On against off, interleaved.

Four measurements, each one call at a time from an event loop:

1. `noop`: `await db_call(noop)` — the executor benchmark's no-op round trip
   (no connection: metrics add nothing to it);
2. `query`: `await db_call(select_1)` — a pooled checkout, `connection_created`,
   one query and a give-back: two durations recorded (wait and use), and
   CLOSE_STRANDED's receiver runs on each checkout;
3. `request`: one HTTP request through the ASGI wrapper (in process, no
   socket) to a sync view that runs one query — the project benchmark's
   `c-sync` shape, without the server and the load generator, so that the
   difference is not lost in their noise;
4. `async3`: one request to an async view that makes three thread-sensitive
   sync calls of one query each — the project benchmark's `c-async` shape
   (session, user, item): three checkouts, six durations.

States: `off` (no exporter, CLOSE_STRANDED off), `metrics` (the OpenTelemetry
integration on a real SDK provider with an in-memory reader, *and* the
Prometheus collector: every event recorded twice), `stranded` (CLOSE_STRANDED
on), `all` (both). Each round measures every state back to back for each
measurement, in a rotated order; figures are medians, ratios the medians of the
per-round ratios to `off`, so a noisy machine's drift hits both sides alike.

The recording is charged to the slice whose calls queued the durations: each
slice drains the queue before its clock starts and again before it stops
(`_observers.drain()`, in every state), so the flusher thread's once-a-second
batch cannot land in another state's slice, or be left out by the medians.

Then, per checkout, what the recording costs alone (best of 5, CPU time): the
hot path's append, and each exporter recording a checkout's two durations.

Run from the repository root::

    .venv/bin/python benchmarks/bench_metrics.py [--backend postgresql|mysql|sqlite]
                                                 [--rounds N] [--calls N] [--quick]

It queries `SELECT 1` on the `postgres` database (MySQL: no database; SQLite:
a temporary file) and creates nothing. Exit status 1 when a ratio is above
1.03 (the acceptance bound), so a run says plainly whether it held.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from benchmarks._common import http_scope, interleaved

STATES: Final = ("off", "metrics", "stranded", "all")
MEASUREMENTS: Final = ("noop", "query", "request", "async3")
CLOCKS: Final = ("wall", "cpu")
BOUND: Final = 1.03


def configure(backend: str) -> None:
    from tests.dbconfig import database

    db: dict[str, Any]
    if backend == "sqlite":
        db = {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.path.join(tempfile.gettempdir(), f"bench-metrics-{os.getpid()}.sqlite3"),
        }
    else:
        db = database(backend, "postgres" if backend == "postgresql" else "")
    db["CONN_MAX_AGE"] = 600
    settings.configure(
        DATABASES={"default": db},
        INSTALLED_APPS=["async_dbbridge"],
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["*"],
        MIDDLEWARE=[],
        SECRET_KEY="bench-metrics",
        USE_TZ=True,
        ASYNC_DBBRIDGE={"MAX_WORKERS": 4, "POOL_SIZE": 4, "CLOSE_STRANDED": False},
    )
    django.setup()


def select_1() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        return int(cursor.fetchone()[0])


def noop() -> None:
    return None


def view(request: Any) -> Any:
    from django.http import HttpResponse

    return HttpResponse(str(select_1()))


async def async_view(request: Any) -> Any:
    from asgiref.sync import sync_to_async
    from django.http import HttpResponse

    # Thread-sensitive, as the async ORM's calls: each runs on the request's
    # thread and checks a connection out and back (HOLD="transaction").
    total = 0
    for _ in range(3):
        total += await sync_to_async(select_1)()
    return HttpResponse(str(total))


def _urls() -> list[Any]:
    from django.urls import path

    return [path("q", view), path("a", async_view)]


urlpatterns: list[Any] = []


class States:
    """Turns the exporters and CLOSE_STRANDED on and off without rebuilding anything."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from prometheus_client import CollectorRegistry

        from async_dbbridge import _observers
        from async_dbbridge.integrations.opentelemetry import instrument
        from async_dbbridge.integrations.prometheus import DBBridgeCollector

        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        instrumentation = instrument(meter_provider=self.provider)
        collector = DBBridgeCollector()
        CollectorRegistry().register(collector)
        # The observers both integrations registered; toggled as a set below.
        self.observers = _observers.active
        assert len(self.observers) == 2
        self._instrumentation, self._collector = instrumentation, collector

    def set(self, state: str) -> None:
        from async_dbbridge import _observers, _stranded

        for observer in self.observers:
            if state in ("metrics", "all"):
                _observers.add(observer)
            else:
                _observers.remove(observer)
        _stranded._enabled = state in ("stranded", "all")


async def request(app: Any, path: str = "/q") -> None:
    scope = http_scope(path)
    sent: list[dict[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent[0]


Samples = dict[str, dict[str, list[float]]]


async def run(rounds: int, calls: int) -> tuple[Samples, dict[str, float], dict[str, float]]:
    from async_dbbridge import _observers, db_call
    from async_dbbridge._lending import pool_stats
    from async_dbbridge.asgi import get_asgi_application

    app = get_asgi_application()
    states = States()
    steps: dict[str, Callable[[], Awaitable[Any]]] = {
        "noop": lambda: db_call(noop),
        "query": lambda: db_call(select_1),
        "request": lambda: request(app),
        "async3": lambda: request(app, "/a"),
    }
    # Warm up every path: threads, pooled connections, URL resolver.
    for step in steps.values():
        for _ in range(50):
            await step()
    # Checkouts per call of each measurement (each queues two durations).
    checkouts: dict[str, float] = {}
    for measurement, step in steps.items():
        before = pool_stats()["default"].checkouts
        for _ in range(20):
            await step()
        checkouts[measurement] = (pool_stats()["default"].checkouts - before) / 20
    samples: dict[str, dict[str, list[float]]] = {
        f"{m} {clock}": {s: [] for s in STATES} for m in steps for clock in CLOCKS
    }
    for _round, state, measurement in interleaved(rounds, MEASUREMENTS, STATES):
        states.set(state)
        step = steps[measurement]
        n = calls // 4 if measurement in ("request", "async3") else calls
        _observers.drain()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            await step()
        # This slice's durations are recorded in it, whoever records them.
        _observers.drain()
        # Wall time per call, and CPU time per call of the whole process (the
        # loop's thread and the threads serving it): on a shared machine the
        # second is what the recording costs, whatever else runs.
        samples[f"{measurement} wall"][state].append((time.perf_counter() - wall) / n * 1e6)
        samples[f"{measurement} cpu"][state].append((time.process_time() - cpu) / n * 1e6)
    states.set("metrics")
    cost = recording_cost()
    states.set("off")
    return samples, checkouts, cost


def recording_cost(loops: int = 4000) -> dict[str, float]:
    """CPU microseconds per checkout (two durations): queueing, and each exporter recording.

    The hot path's part is `_observers.duration()` twice; each exporter's is
    its `record_durations()` of a checkout's wait and use, fed one batch as the
    flusher does. Best of 5, so a busy machine's interruptions stay out.
    """
    from async_dbbridge import _observers

    otel, prometheus = _observers.active  # both integrations, as States() set them up
    batch = [
        (kind, "default", 0.002)
        for _ in range(loops)
        for kind in (_observers.WAITED, _observers.USED)
    ]
    best = {"queue": float("inf"), "opentelemetry": float("inf"), "prometheus": float("inf")}
    duration = _observers.duration
    for _ in range(5):
        start = time.process_time()
        for _ in range(loops):
            duration(_observers.WAITED, "default", 0.001)
            duration(_observers.USED, "default", 0.003)
        best["queue"] = min(best["queue"], (time.process_time() - start) / loops * 1e6)
        _observers._queue.clear()
        for key, observer in (("opentelemetry", otel), ("prometheus", prometheus)):
            start = time.process_time()
            observer.record_durations(batch)
            best[key] = min(best[key], (time.process_time() - start) / loops * 1e6)
    return best


def receiver_cost(loops: int = 200_000) -> dict[str, float]:
    """CLOSE_STRANDED's connection_created receiver alone, in ns per call, on a bridge worker.

    What a library thread's checkout pays for it (Django sends the signal on
    every pooled checkout); the interleaved figures above cannot resolve a
    difference this small on a shared machine.
    """
    from django.db import connections

    from async_dbbridge import _stranded
    from async_dbbridge._install import get_bridge_executor

    def measure() -> dict[str, float]:
        connection = connections["default"]
        thread = threading.current_thread()
        results: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(5):
            for state in ("off", "on"):
                _stranded._enabled = state == "on"
                start = time.perf_counter()
                for _ in range(loops):
                    _stranded._on_connect(connection, thread)
                results[state].append((time.perf_counter() - start) / loops * 1e9)
        _stranded._enabled = False
        return {state: min(values) for state, values in results.items()}

    return get_bridge_executor().submit(measure).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--backend", default="postgresql", choices=("postgresql", "mysql", "sqlite")
    )
    # Many short slices rather than a few long ones: a noisy neighbour's burst
    # then spoils a few rounds' ratios, which the median leaves out.
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=400, help="per slice (requests: a quarter)")
    parser.add_argument("--quick", action="store_true", help="8 rounds of 200 calls")
    args = parser.parse_args()
    rounds, calls = (8, 200) if args.quick else (args.rounds, args.calls)
    configure(args.backend)
    urlpatterns[:] = _urls()
    samples, checkouts, cost = asyncio.run(run(rounds, calls))
    receiver = receiver_cost()
    failed = False
    print(f"bench_metrics: {args.backend}, {rounds} rounds, {calls} calls per slice")
    print(f"{'':14}" + "".join(f"{s:>12}" for s in STATES) + "   ratios to off (median of rounds)")
    for measurement, by_state in samples.items():
        medians = "".join(f"{statistics.median(by_state[s]):10.1f}us" for s in STATES)
        ratios = []
        for state in STATES[1:]:
            ratio = statistics.median(
                on / off for on, off in zip(by_state[state], by_state["off"], strict=True)
            )
            # The bound applies to the metrics (acceptance), on CPU time.
            if state == "metrics" and measurement.endswith("cpu"):
                failed = failed or ratio > BOUND
            ratios.append(f"{state} {ratio:.3f}")
        print(f"{measurement:14}{medians}   {', '.join(ratios)}")
    per_checkout = sum(cost.values())
    print(
        "checkouts per call: "
        + ", ".join(f"{m} {checkouts[m]:g}" for m in MEASUREMENTS)
        + " (each queues 2 durations: 2 SDK records, 2 Prometheus observations)"
    )
    print(
        f"recording per checkout (CPU, best of 5): queueing {cost['queue']:.2f}us, "
        f"OpenTelemetry {cost['opentelemetry']:.2f}us, Prometheus {cost['prometheus']:.2f}us; "
        f"both exporters {per_checkout:.2f}us"
    )
    print(
        "so metrics should add, of off's CPU: "
        + ", ".join(
            f"{m} {checkouts[m] * per_checkout / statistics.median(samples[f'{m} cpu']['off']):.1%}"
            for m in MEASUREMENTS
        )
    )
    print(
        f"CLOSE_STRANDED's receiver on a bridge worker: {receiver['off']:.0f} ns off, "
        f"{receiver['on']:.0f} ns on (best of 5 x 200 000 calls)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
