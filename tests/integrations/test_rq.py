"""RQ: `DBBridgeWorker` and `DBBridgeSimpleWorker` as ``--worker-class``, Redis.

The forking worker runs under RQ's own CLI (``rq worker -c`` a config module
that sets Django up), the simple worker under django-rq's ``rqworker``; each
test enqueues the workload's jobs and reads the outcome from the rows and the
journal. The same workload runs with RQ's own classes (what django-rq does:
nothing per job) to show the difference.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

import pytest
from django.db import connection
from redis import Redis
from rq import Queue

from tests.integrations import harness
from tests.integrations.harness import (
    Journal,
    Worker,
    bin_path,
    live_backends,
    parent_row,
    settled_sessions,
    unique_name,
    worker_env,
)

pytestmark = [
    pytest.mark.requires_server,
    pytest.mark.workers,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("main_thread_closed"),
    pytest.mark.timeout(120),
]

POOL_SIZE = 2
BRIDGE_WORKER = "async_dbbridge.integrations.rq.DBBridgeWorker"
BRIDGE_SIMPLE_WORKER = "async_dbbridge.integrations.rq.DBBridgeSimpleWorker"

#: An idle RQ worker sometimes hangs in its warm shutdown, for up to a minute:
#: `Worker.unsubscribe()` joins its pubsub thread, which may be waiting for a
#: subscription that will not come (rq/rq#1613, with redis-py 8). A second
#: SIGTERM (RQ's cold shutdown) ends it; the worker is idle by then.
SIGTERM_AGAIN = 1.5

#: Jobs in a burst of the forking worker: a fork, a Django import state copy and
#: a new session per job make it far slower than the others (about 25 jobs/s
#: here, with or without the library), so 100 jobs rather than 500 keep the
#: tests within their budget (30 for RQ's own worker, which only shows the difference).
FORKING_TASKS = 100
OWN_FORKING_TASKS = 30


class RQ:
    """A queue of the test's own name; enqueues jobs by path from the test process."""

    def __init__(self) -> None:
        self.name = unique_name("rq")
        self.redis = Redis(host="127.0.0.1", port=6379)
        self.queue = Queue(self.name, connection=self.redis)
        self.journal = Journal()

    def send(self, name: str, *args: object) -> None:
        self.queue.enqueue(f"tests.integrations.rq_project.jobs.{name}", *args)

    def env(self, variant: str, **extra: str) -> dict[str, str]:
        return worker_env(
            variant,
            pool_size=POOL_SIZE,
            DBBRIDGE_WORKER_QUEUE=self.name,
            DBBRIDGE_WORKER_JOURNAL=self.journal.path,
            **extra,
        )

    def rq_worker(self, variant: str, worker_class: str | None = None, **env: str) -> Worker:
        """RQ's own CLI."""
        command = [bin_path("rq"), "worker", "-c", "tests.integrations.rq_project.config"]
        if worker_class is not None:
            command.append(f"--worker-class={worker_class}")
        return Worker(command, self.env(variant, **env), sigterm_again=SIGTERM_AGAIN)

    def rqworker(self, variant: str, worker_class: str) -> Worker:
        """django-rq's management command."""
        command = [
            sys.executable,
            "-m",
            "django",
            "rqworker",
            self.name,
            "--settings=tests.integrations.rq_project.settings",
            f"--worker-class={worker_class}",
        ]
        return Worker(command, self.env(variant), sigterm_again=SIGTERM_AGAIN)

    def close(self) -> None:
        self.journal.close()
        self.queue.empty()  # type: ignore[no-untyped-call]  # rq's is untyped
        self.queue.delete(delete_jobs=True)
        self.redis.close()


@pytest.fixture
def rq() -> Iterator[RQ]:
    fw = RQ()
    yield fw
    fw.close()


def abandoned_sessions() -> int:
    """PostgreSQL: sessions on the test database that ended without a goodbye
    (the client's socket just closed), since the database was created."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT sessions_abandoned FROM pg_stat_database WHERE datname = current_database()"
        )
        return int(cursor.fetchone()[0])


def wait_for_abandoned(at_least: int, timeout: float = 10.0) -> int:
    """The count once it reached ``at_least`` (the server flushes it as sessions end)."""
    deadline = time.monotonic() + timeout
    while (count := abandoned_sessions()) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def forking_burst(
    rq: RQ, variant: str, worker_class: str | None, tasks: int
) -> tuple[harness.Burst, int]:
    """A burst through the forking worker, whose process holds a session of its own."""
    before = abandoned_sessions() if connection.vendor == "postgresql" else 0
    with rq.rq_worker(variant, worker_class, DBBRIDGE_WORKER_PARENT_SESSION="1") as worker:
        burst = harness.run_burst(worker, rq.journal, rq.send, kill=False, tasks=tasks)
        parent = parent_row()
        # The worker's own session is still there: no horse ended it.
        assert live_backends({parent.backend}) == {parent.backend}
        worker.stop()
    assert settled_sessions(0) == 0
    return burst, before


def test_bridge_horses_close_their_sessions_and_leave_the_workers_alone(rq: RQ) -> None:
    burst, before = forking_burst(rq, "bridge", BRIDGE_WORKER, FORKING_TASKS)
    assert burst.ok == burst.committed == FORKING_TASKS
    # A horse per job, a session per horse, never the worker's own session...
    assert len(burst.used) == FORKING_TASKS
    assert parent_row().backend not in burst.used
    # ... one horse at a time: its session and the worker's.
    assert 1 <= burst.peak <= 2
    if connection.vendor == "postgresql":
        # Each closed by its horse with a goodbye (Terminate): none dropped.
        assert wait_for_abandoned(0) - before == 0


def test_rq_own_worker_runs_every_job_on_the_workers_session(rq: RQ) -> None:
    burst, _ = forking_burst(rq, "own", None, OWN_FORKING_TASKS)
    # Every horse inherits the worker's connection and runs its job on it:
    # two processes on one session (one at a time here, so it holds up).
    assert burst.used == {parent_row().backend}
    assert burst.ok == burst.committed == OWN_FORKING_TASKS


def test_rq_own_worker_drops_a_session_per_job(rq: RQ) -> None:
    # Without a session in the worker process: each horse opens its own and
    # exits without closing it (os._exit): the server sees the client vanish.
    before = abandoned_sessions() if connection.vendor == "postgresql" else 0
    with rq.rq_worker("own") as worker:
        burst = harness.run_burst(worker, rq.journal, rq.send, kill=False, tasks=OWN_FORKING_TASKS)
        worker.stop()
    assert len(burst.used) == OWN_FORKING_TASKS
    assert settled_sessions(0) == 0
    if connection.vendor == "postgresql":
        abandoned = wait_for_abandoned(before + OWN_FORKING_TASKS) - before
        assert abandoned >= OWN_FORKING_TASKS


def test_bridge_simple_worker_reuses_and_survives_killed_sessions(rq: RQ) -> None:
    with rq.rqworker("bridge", BRIDGE_SIMPLE_WORKER) as worker:
        burst = harness.run_burst(worker, rq.journal, rq.send)
        worker.stop()
    assert 1 <= len(burst.used) <= POOL_SIZE
    assert 1 <= burst.peak <= POOL_SIZE
    assert burst.ok == burst.committed == harness.TASKS + 50  # no job lost after the kill
    assert settled_sessions(0) == 0


def test_rq_own_simple_worker_loses_a_job_after_a_killed_session(rq: RQ) -> None:
    with rq.rqworker("own", "rq.worker.SimpleWorker") as worker:
        burst = harness.run_burst(worker, rq.journal, rq.send, tasks=100)
        worker.stop()
    assert len(burst.used) == 1  # one connection for the worker's life...
    assert burst.ok < 100 + 50  # ... never checked: the next job fails
    assert settled_sessions(0) == 0


def test_after_a_database_error_or_a_transaction_left_open_the_next_job_is_clean(
    rq: RQ,
) -> None:
    with rq.rqworker("bridge", BRIDGE_SIMPLE_WORKER) as worker:
        assert harness.run_sequence(worker, rq.journal, rq.send) == harness.CLEAN_SEQUENCE


def test_rq_own_simple_worker_writes_into_a_transaction_left_open(rq: RQ) -> None:
    with rq.rqworker("own", "rq.worker.SimpleWorker") as worker:
        own = harness.run_sequence(worker, rq.journal, rq.send)
    assert own["error_session_reused"] is True
    assert own["after_leftover"] == "ok"  # "succeeds" inside the leftover transaction,
    assert own["row_after_leftover"] is False  # which is never committed
