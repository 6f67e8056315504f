"""Dramatiq: `DBBridgeMiddleware` in the real ``dramatiq`` CLI, against real brokers.

Each test starts ``dramatiq tests.integrations.dramatiq_project.broker`` (worker
processes × threads) on the test database, enqueues the workload's tasks
through Redis or RabbitMQ, and reads the outcome from the rows and the journal.
The same workload runs with django_dramatiq's `DbConnectionsMiddleware` in the
same place (``own``) to show what the middleware changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import dramatiq
import pytest

from tests.integrations.dramatiq_project.brokers import make_broker
from tests.integrations.harness import (
    TASKS,
    Journal,
    SessionSampler,
    Worker,
    bin_path,
    idle_past_health_check,
    kill_sessions,
    rows,
    settled_sessions,
    unique_name,
    wait_for_rows,
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


class Dramatiq:
    """One broker kind and queue for a test; enqueues from the test process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.queue = unique_name("dramatiq")
        self.broker = make_broker(kind, self.queue, [])
        self.broker.declare_queue(self.queue)
        self.journal = Journal()

    def send(self, actor: str, *args: object) -> None:
        message = dramatiq.Message(
            queue_name=self.queue, actor_name=actor, args=args, kwargs={}, options={}
        )
        self.broker.enqueue(message)

    def worker(self, variant: str, *, processes: int, threads: int) -> Worker:
        env = worker_env(
            variant,
            pool_size=POOL_SIZE,
            DBBRIDGE_WORKER_BROKER=self.kind,
            DBBRIDGE_WORKER_QUEUE=self.queue,
            DBBRIDGE_WORKER_JOURNAL=self.journal.path,
        )
        command = [
            bin_path("dramatiq"),
            "tests.integrations.dramatiq_project.broker",
            f"--processes={processes}",
            f"--threads={threads}",
            "--worker-shutdown-timeout=10000",
        ]
        return Worker(command, env)

    def close(self) -> None:
        self.journal.close()
        try:
            if self.kind == "redis":
                self.broker.flush_all()
            else:
                from dramatiq.common import dq_name, xq_name

                for name in (self.queue, dq_name(self.queue), xq_name(self.queue)):
                    self.broker.channel.queue_delete(name)
        finally:
            self.broker.close()


@pytest.fixture(params=["redis", "rabbitmq"])
def framework(request: pytest.FixtureRequest) -> Iterator[Dramatiq]:
    fw = Dramatiq(request.param)
    yield fw
    fw.close()


@pytest.fixture
def redis_framework() -> Iterator[Dramatiq]:
    fw = Dramatiq("redis")
    yield fw
    fw.close()


def run_burst(fw: Dramatiq, variant: str) -> tuple[int, set[int], int]:
    """2 processes × 4 threads: TASKS short ORM tasks, then every app session
    killed while the workers idle and 50 more tasks, then SIGTERM.

    Returns (peak sessions of the workers, server sessions the tasks used,
    sessions left after the worker exited).
    """
    with fw.worker(variant, processes=2, threads=4) as worker:
        with SessionSampler() as sampler:
            for n in range(TASKS):
                fw.send("record", n)
            done = fw.journal.wait(TASKS, worker)
            first = wait_for_rows(TASKS, worker)
        finished_at = time.monotonic()
        assert {outcome for _, _, outcome in done} == {"ok"}
        used = {row.backend for row in first}
        assert kill_sessions(used) >= 1  # sessions were really open, and now they are gone
        idle_past_health_check(finished_at)
        for n in range(TASKS, TASKS + 50):
            fw.send("record", n)
        after_kill = fw.journal.wait(TASKS + 50, worker)
        # No task lost: each ran and committed its row, on a fresh session.
        assert [outcome for _, _, outcome in after_kill].count("ok") == TASKS + 50
        assert len(wait_for_rows(TASKS + 50, worker)) == TASKS + 50
        worker.stop()
    left = settled_sessions(0)
    return sampler.peak_of_workers(), used, left


def test_bridge_bounds_the_sessions_survives_killed_sessions_and_closes_on_sigterm(
    framework: Dramatiq,
) -> None:
    peak, used, left = run_burst(framework, "bridge")
    bound = 2 * POOL_SIZE  # processes × POOL_SIZE, whatever the 8 threads do
    assert 1 <= len(used) <= bound
    assert 1 <= peak <= bound
    assert left == 0


def test_own_middleware_holds_a_session_per_thread(redis_framework: Dramatiq) -> None:
    # django_dramatiq's DbConnectionsMiddleware: each of the 8 threads keeps
    # its own connection (CONN_MAX_AGE=60); health checks replace killed ones.
    peak, used, left = run_burst(redis_framework, "own")
    assert len(used) > 2 * POOL_SIZE
    assert peak > 2 * POOL_SIZE
    assert left == 0


def run_sequence(fw: Dramatiq, variant: str) -> dict[str, object]:
    """One process, one thread: a database error and a transaction left open, each
    followed by an ordinary task; what the next task got."""
    with fw.worker(variant, processes=1, threads=1) as worker:
        fw.send("record", 1)
        fw.journal.outcome("record", 1, worker)
        fw.send("fail_with_database_error", 2)
        error = fw.journal.outcome("fail_with_database_error", 2, worker)
        fw.send("record", 3)
        after_error = fw.journal.outcome("record", 3, worker)
        fw.send("leave_transaction_open", 4)
        fw.journal.outcome("leave_transaction_open", 4, worker)
        fw.send("record", 5)
        after_leftover = fw.journal.outcome("record", 5, worker)
        worker.stop()
        log = worker.output()
    by_value = {row.value: row for row in rows()}
    return {
        "error": error,
        "after_error": after_error,
        "error_session_reused": 3 in by_value and by_value[3].backend == by_value[2].backend,
        "after_leftover": after_leftover,
        "leftover_committed": any(row.kind == "left-open" for row in rows()),
        "row_after_leftover": 5 in by_value,
        "warned": "TransactionLeftOpenWarning" in log,
        "left": settled_sessions(0),
    }


def test_after_a_database_error_or_a_transaction_left_open_the_next_task_is_clean(
    redis_framework: Dramatiq,
) -> None:
    bridge = run_sequence(redis_framework, "bridge")
    assert bridge == {
        "error": "ProgrammingError",
        "after_error": "ok",
        "error_session_reused": False,  # closed after the error: a fresh session
        "after_leftover": "ok",
        "leftover_committed": False,  # rolled back, with a warning
        "row_after_leftover": True,
        "warned": True,
        "left": 0,
    }


def test_own_middleware_carries_a_transaction_left_open_into_the_next_task(
    redis_framework: Dramatiq,
) -> None:
    own = run_sequence(redis_framework, "own")
    # close_old_connections() keeps a connection after an error if it still
    # answers, and cannot close inside an atomic block (it marks the
    # transaction broken instead): the thread's next task fails ("the
    # connection is closed" on PostgreSQL), and so would every later one.
    assert own["error_session_reused"] is True
    assert own["after_leftover"] != "ok"
    assert own["row_after_leftover"] is False
    assert own["warned"] is False
