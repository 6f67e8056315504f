"""The Prometheus collector, read back through prometheus_client's own exposition and parser."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connections
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.parser import text_string_to_metric_families

from async_dbbridge import _observers
from async_dbbridge._lending import get_pool
from async_dbbridge.integrations.prometheus import DBBridgeCollector
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.metrics_workload import ALIAS, HeldPool
from tests.settings import BACKEND
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
]

ROOT = Path(__file__).resolve().parents[1]
POOL = "db_client_connection_pool_name"
STATE = "db_client_connection_state"


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the text exposition, by name and sorted labels."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({POOL: ALIAS, **labels}.items())))]


@pytest.fixture
def registry(settings: Any) -> Iterator[CollectorRegistry]:
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 5, "MAX_WAITING": 3}
    registry = CollectorRegistry()
    collector = DBBridgeCollector()
    assert not collector.multiprocess
    registry.register(collector)
    yield registry
    collector.close()
    assert not _observers.active


def test_collector_after_a_known_workload(registry: CollectorRegistry) -> None:
    with HeldPool(used=5, pending=3, rejected=1):
        assert server_session_count(ALIAS) == 5
        samples = scrape(registry)
        assert value(samples, "db_client_connection_count", **{STATE: "used"}) == 5
        assert value(samples, "db_client_connection_count", **{STATE: "idle"}) == 0
        assert value(samples, "db_client_connection_pending_requests") == 3
        assert value(samples, "db_client_connection_max") == 5
        assert value(samples, "db_client_connection_idle_max") == 5
        assert value(samples, "db_client_connection_idle_min") == 0
        assert value(samples, "db_client_connection_timeouts_total") == 1
        assert value(samples, "db_client_connection_wait_time_seconds_count") == 5
    stats = get_pool(ALIAS).stats()
    samples = scrape(registry)
    assert value(samples, "db_client_connection_count", **{STATE: "used"}) == 0
    assert value(samples, "db_client_connection_count", **{STATE: "idle"}) == stats.idle
    assert value(samples, "db_client_connection_pending_requests") == 0
    assert value(samples, "db_client_connection_wait_time_seconds_count") == 8
    assert value(samples, "db_client_connection_use_time_seconds_count") == 8
    assert value(samples, "db_client_connection_use_time_seconds_sum") > 0
    created = value(samples, "db_client_connection_create_time_seconds_count")
    assert created == stats.opened >= 5
    # The histogram's buckets are seconds, and cumulative up to +Inf.
    assert value(samples, "db_client_connection_wait_time_seconds_bucket", le="+Inf") == 8
    assert value(samples, "db_client_connection_wait_time_seconds_bucket", le="0.001") <= 8
    text = generate_latest(registry).decode()
    assert "# TYPE async_dbbridge_calls_total counter" in text
    assert "# TYPE db_client_connection_wait_time_seconds histogram" in text
    assert "# TYPE db_client_connection_count gauge" in text
    assert "# TYPE db_client_connection_timeouts_total counter" in text


def test_executor_calls_are_read_from_the_executors(registry: CollectorRegistry) -> None:
    from async_dbbridge import DBExecutor

    def fails() -> None:
        raise ValueError("boom")

    with DBExecutor(2, thread_name_prefix="scraped") as executor:
        executor.submit(Item.objects.count).result()
        with pytest.raises(ValueError, match="boom"):
            executor.submit(fails).result()
        samples = scrape(registry)
    by_executor = (("async_dbbridge_executor", "scraped"),)
    assert samples[("async_dbbridge_calls_total", by_executor)] == 2
    assert samples[("async_dbbridge_call_errors_total", by_executor)] == 1
    assert samples[("async_dbbridge_call_time_seconds_total", by_executor)] > 0


def _worker(used: int, directory: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "DBBRIDGE_WORKER_BACKEND": BACKEND,
        "DBBRIDGE_WORKER_DB": str(connections["default"].settings_dict["NAME"]),
        "DBBRIDGE_WORKER_USED": str(used),
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env.pop("PYTHONWARNINGS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.metrics_worker"],
        env=env,
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _step(worker: subprocess.Popen[str], expected: str | None) -> None:
    """Tell a worker to go on (None: the first step) and wait for its answer."""
    assert worker.stdin is not None
    assert worker.stdout is not None
    if expected != "held":
        worker.stdin.write("\n")
        worker.stdin.flush()
    if expected is not None:
        assert worker.stdout.readline().strip() == expected


# Sessions of other processes are counted by the server only (not SQLite's file count).
@pytest.mark.requires_server
def test_multiprocess_mode_across_two_worker_processes(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    workers = [_worker(2, tmp_path), _worker(3, tmp_path)]
    try:
        for worker in workers:
            _step(worker, "held")
        # Each worker holds its pool full, one thread waiting, one rejected.
        assert server_session_count(ALIAS) == 5
        samples = scrape(registry)
        assert value(samples, "db_client_connection_count", **{STATE: "used"}) == 5
        assert value(samples, "db_client_connection_count", **{STATE: "idle"}) == 0
        assert value(samples, "db_client_connection_pending_requests") == 2
        assert value(samples, "db_client_connection_max") == 5  # 2 + 3, livesum
        assert value(samples, "db_client_connection_timeouts_total") == 2
        assert value(samples, "db_client_connection_wait_time_seconds_count") == 5
        for worker in workers:
            _step(worker, "released")
        samples = scrape(registry)
        assert value(samples, "db_client_connection_count", **{STATE: "used"}) == 0
        # Given back, kept open (CONN_MAX_AGE=60): every opened connection is idle.
        assert value(samples, "db_client_connection_count", **{STATE: "idle"}) == 5
        assert server_session_count(ALIAS) == 5
        assert value(samples, "db_client_connection_pending_requests") == 0
        assert value(samples, "db_client_connection_wait_time_seconds_count") == 7
        assert value(samples, "db_client_connection_use_time_seconds_count") == 7
        for worker in workers:
            _step(worker, None)
            assert worker.wait(30) == 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(30)
            for pipe in (worker.stdin, worker.stdout):
                if pipe is not None:
                    pipe.close()
    wait_for_server_sessions(ALIAS, 0)
    # As a gunicorn child_exit hook does: a dead worker's live gauges go,
    # its histograms and counters stay in the totals.
    for worker in workers:
        mark_process_dead(worker.pid, str(tmp_path))  # type: ignore[no-untyped-call]
    samples = scrape(registry)
    assert not [key for key in samples if key[0] == "db_client_connection_count"]
    assert value(samples, "db_client_connection_timeouts_total") == 2
    assert value(samples, "db_client_connection_wait_time_seconds_count") == 7
