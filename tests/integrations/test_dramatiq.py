"""Dramatiq: `DBBridgeMiddleware` in the real ``dramatiq`` CLI, against real brokers.

Each test starts ``dramatiq tests.integrations.dramatiq_project.broker`` (worker
processes x threads) on the test database, enqueues the workload's tasks
through Redis or RabbitMQ, and reads the outcome from the rows and the journal.
The same workload runs with django_dramatiq's `DbConnectionsMiddleware` in the
same place (``own``) to show what the middleware changes.
"""

from __future__ import annotations

from collections.abc import Iterator

import dramatiq
import pytest
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from tests.conftest import SetSetting
from tests.integrations import harness
from tests.integrations.dramatiq_project.brokers import make_broker
from tests.integrations.harness import (
    TASKS,
    Burst,
    Journal,
    Worker,
    bin_path,
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


class Dramatiq:
    """One broker kind and queue for a test; enqueues from the test process."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.queue = unique_name("dramatiq")
        self.broker = make_broker(kind, self.queue, [])
        self.broker.declare_queue(self.queue)
        self.journal = Journal()

    def send(self, actor: str, *args: object) -> None:
        message: dramatiq.Message[object] = dramatiq.Message(
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

                assert isinstance(self.broker, RabbitmqBroker)
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


def run_burst(
    fw: Dramatiq, variant: str, *, tasks: int = TASKS, kill: bool = True, task: str = "record"
) -> tuple[Burst, int]:
    """2 processes x 4 threads: the burst, the kill, then SIGTERM; and the sessions left."""
    with fw.worker(variant, processes=2, threads=4) as worker:
        burst = harness.run_burst(worker, fw.journal, fw.send, tasks=tasks, kill=kill, task=task)
        worker.stop()
    return burst, settled_sessions(0)


def test_bridge_bounds_the_sessions_survives_killed_sessions_and_closes_on_sigterm(
    framework: Dramatiq,
) -> None:
    # The kill once (Redis): the broker plays no part in it.
    kill = framework.kind == "redis"
    burst, left = run_burst(framework, "bridge", kill=kill)
    bound = 2 * POOL_SIZE  # processes x POOL_SIZE, whatever the 8 threads do
    assert 1 <= len(burst.used) <= bound
    assert 1 <= burst.peak <= bound
    # No task lost after the kill: each ran and committed its row.
    assert burst.ok == burst.committed == TASKS + (50 if kill else 0)
    assert left == 0


def test_own_middleware_holds_a_session_per_thread(redis_framework: Dramatiq) -> None:
    # django_dramatiq's DbConnectionsMiddleware: each of the 8 threads keeps
    # its own connection (CONN_MAX_AGE=60); health checks replace killed ones.
    # Slow tasks: on a busy machine a few threads could otherwise drain the
    # queue alone, and the test would not see the sessions of the others.
    burst, left = run_burst(redis_framework, "own", tasks=200, task="record_slowly")
    assert len(burst.used) > 2 * POOL_SIZE
    assert burst.peak > 2 * POOL_SIZE
    assert burst.ok == burst.committed == 200 + 50
    assert left == 0


def run_sequence(fw: Dramatiq, variant: str) -> dict[str, object]:
    with fw.worker(variant, processes=1, threads=1) as worker:
        return harness.run_sequence(worker, fw.journal, fw.send)


def test_after_a_database_error_or_a_transaction_left_open_the_next_task_is_clean(
    redis_framework: Dramatiq,
) -> None:
    assert run_sequence(redis_framework, "bridge") == harness.CLEAN_SEQUENCE


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


def test_a_message_stopped_by_its_time_limit_closes_its_connection(
    db_settings: SetSetting,
) -> None:
    """In-process (Dramatiq's stub broker, a real `Worker` with one thread): an
    `Interrupt` raised into the thread during a slow query closes the connection."""
    from dramatiq import Worker as DramatiqWorker
    from dramatiq.brokers.stub import StubBroker
    from dramatiq.middleware import Middleware, TimeLimit

    from async_dbbridge.integrations.dramatiq import DBBridgeMiddleware
    from tests.conftest import backend_id

    db_settings(CONN_MAX_AGE=60)
    outcomes: list[str] = []

    class Outcomes(Middleware):
        def after_process_message(
            self,
            broker: object,
            message: object,
            *,
            result: object = None,
            exception: BaseException | None = None,
        ) -> None:
            outcomes.append(type(exception).__name__)

    # The time limit's checker is a daemon thread of Dramatiq's, started at
    # "process boot" and never stopped: it idles once the test is over.
    broker = StubBroker(middleware=[Outcomes(), TimeLimit(interval=50), DBBridgeMiddleware()])
    broker.emit_after("process_boot")
    seen: list[tuple[str, int]] = []

    def slow(seconds: float) -> None:
        seen.append(("slow", backend_id()))
        from django.db import connection

        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                cursor.execute("SELECT pg_sleep(%s)", [seconds])
            else:
                cursor.execute("SELECT SLEEP(%s)", [seconds])

    def quick() -> None:
        seen.append(("quick", backend_id()))

    slow_actor = dramatiq.actor(broker=broker, time_limit=300)(slow)
    quick_actor = dramatiq.actor(broker=broker)(quick)
    worker = DramatiqWorker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        quick_actor.send()
        broker.join(quick_actor.queue_name, timeout=10_000)
        slow_actor.send(1.5)
        broker.join(slow_actor.queue_name, timeout=10_000)
        quick_actor.send()
        broker.join(quick_actor.queue_name, timeout=10_000)
    finally:
        worker.stop()
        broker.close()
    assert outcomes == ["NoneType", "TimeLimitExceeded", "NoneType"]
    (first, _), (slow_seen, _), (last, _) = seen
    assert (first, slow_seen, last) == ("quick", "slow", "quick")
    # The first session was reused by the slow message, then closed when its
    # time limit interrupted it: the next message got a fresh one.
    assert seen[0][1] == seen[1][1]
    assert seen[2][1] != seen[1][1]
