"""The OpenTelemetry integration, read back through the real SDK's in-memory reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, Metric

from async_dbbridge import _observers
from async_dbbridge._lending import get_pool
from async_dbbridge.integrations.opentelemetry import SEMCONV_VERSION, instrument
from async_dbbridge.testing import server_session_count
from tests.metrics_workload import ALIAS, HeldPool

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

POOL_NAME = "db.client.connection.pool.name"
POOL = {POOL_NAME: ALIAS}


@pytest.fixture
def reader(settings: Any) -> Iterator[InMemoryMetricReader]:
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 5, "MAX_WAITING": 3}
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation = instrument(meter_provider=provider)
    assert instrument(meter_provider=provider) is instrumentation  # idempotent
    yield reader
    instrumentation.uninstrument()
    provider.shutdown()
    assert not _observers.active


def collect(reader: InMemoryMetricReader) -> dict[str, Metric]:
    data = reader.get_metrics_data()
    assert data is not None
    (resource_metrics,) = data.resource_metrics
    (scope_metrics,) = resource_metrics.scope_metrics
    assert scope_metrics.scope.name == "async_dbbridge"
    assert scope_metrics.scope.schema_url == f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
    return {metric.name: metric for metric in scope_metrics.metrics}


def point(metric: Metric, attributes: dict[str, str] = POOL) -> Any:
    """The metric's one data point with exactly these attributes."""
    wanted = attributes
    for data_point in metric.data.data_points:
        if dict(data_point.attributes or {}) == wanted:
            return data_point
    raise AssertionError(f"{metric.name}: no point with {wanted}")


def by_state(count: Metric) -> dict[str, int]:
    """`db.client.connection.count`'s values by state, checking every point names the pool."""
    values: dict[str, int] = {}
    data_point: Any
    for data_point in count.data.data_points:
        attributes = dict(data_point.attributes or {})
        assert attributes.pop(POOL_NAME) == ALIAS
        (state,) = attributes.items()
        assert state[0] == "db.client.connection.state"
        values[str(state[1])] = data_point.value
    return values


def test_pool_instruments_after_a_known_workload(reader: InMemoryMetricReader) -> None:
    with HeldPool(used=5, pending=3, rejected=1):
        # The figures describe real sessions: five are open on the server.
        assert server_session_count(ALIAS) == 5
        metrics = collect(reader)
        count = metrics["db.client.connection.count"]
        assert count.unit == "{connection}"
        assert by_state(count) == {"used": 5, "idle": 0}
        pending = metrics["db.client.connection.pending_requests"]
        assert (pending.unit, point(pending).value) == ("{request}", 3)
        assert point(metrics["db.client.connection.max"]).value == 5
        assert point(metrics["db.client.connection.idle.max"]).value == 5
        assert point(metrics["db.client.connection.idle.min"]).value == 0
        timeouts = metrics["db.client.connection.timeouts"]
        assert (timeouts.unit, point(timeouts).value) == ("{timeout}", 1)
        # Five checkouts done, three still waiting: five waits recorded so far.
        assert point(metrics["db.client.connection.wait_time"]).count == 5

    stats = get_pool(ALIAS).stats()
    metrics = collect(reader)
    for name in ("create_time", "wait_time", "use_time"):
        assert metrics[f"db.client.connection.{name}"].unit == "s", name
    wait_time = point(metrics["db.client.connection.wait_time"])
    use_time = point(metrics["db.client.connection.use_time"])
    create_time = point(metrics["db.client.connection.create_time"])
    assert wait_time.count == stats.checkouts == 8
    assert use_time.count == 8  # every checkout was given back
    assert create_time.count == stats.opened >= 5
    assert wait_time.sum > 0
    assert use_time.min > 0
    assert list(wait_time.explicit_bounds)[:3] == [0.001, 0.005, 0.01]
    assert point(metrics["db.client.connection.timeouts"]).value == 1
    count = metrics["db.client.connection.count"]
    assert by_state(count) == {"used": 0, "idle": stats.idle}
    assert point(metrics["db.client.connection.pending_requests"]).value == 0


def test_library_instruments_calls_errors_and_rollbacks(
    reader: InMemoryMetricReader,
) -> None:
    import warnings

    from django.db import connections

    from async_dbbridge import DBExecutor, TransactionLeftOpenWarning

    def ok() -> int:
        with connections[ALIAS].cursor() as cursor:
            cursor.execute("SELECT 1")
            return int(cursor.fetchone()[0])

    def fails() -> None:
        raise ValueError("boom")

    def leaves_open() -> None:
        connections[ALIAS].set_autocommit(False)
        ok()

    with DBExecutor(2, thread_name_prefix="metrics") as executor:
        assert [f.result() for f in [executor.submit(ok) for _ in range(3)]] == [1, 1, 1]
        with pytest.raises(ValueError, match="boom"):
            executor.submit(fails).result()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TransactionLeftOpenWarning)
            executor.submit(leaves_open).result()
        # Read from the live executors' own counts.
        metrics = collect(reader)
    by_executor = {"async_dbbridge.executor": "metrics"}

    assert point(metrics["async_dbbridge.calls"], by_executor).value == 5
    assert point(metrics["async_dbbridge.call.errors"], by_executor).value == 1
    call_time = metrics["async_dbbridge.call.time"]
    assert call_time.unit == "s"
    assert point(call_time, by_executor).value > 0
    assert point(metrics["async_dbbridge.transactions.rolled_back"]).value == 1


def test_uninstrument_stops_recording(settings: Any) -> None:
    from django.db import connections

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instrumentation = instrument(meter_provider=provider)
    instrumentation.uninstrument()
    assert not _observers.active
    with HeldPool(used=1, pending=0, rejected=0):
        pass
    assert get_pool(ALIAS).stats().checkouts == 1
    data = reader.get_metrics_data()
    points = [
        p
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    ]
    assert points == []
    connections.close_all()
    provider.shutdown()
