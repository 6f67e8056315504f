"""Huey: `install()` in the real consumer (``django-admin run_huey``), Redis storage.

Each test starts ``run_huey`` (thread or process workers) on the test
database, enqueues the workload's tasks through Redis, and reads the outcome
from the rows and the journal. The same workload runs with Huey's own Django
handling (djhuey's ``db_task()``, and plain ``task()``) to show the difference.
Greenlet workers are not run here (they need gevent's monkey-patching of the
whole process); the hooks are the same.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator

import pytest
from huey import RedisHuey

from tests.conftest import SetSetting
from tests.integrations import harness, workload
from tests.integrations.harness import (
    TASKS,
    Journal,
    Worker,
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


class Huey:
    """A Huey instance of the test's own name; enqueues from the test process."""

    def __init__(self) -> None:
        self.name = unique_name("huey")
        self.huey = RedisHuey(self.name, host="127.0.0.1", port=6379)
        # The same task names as the worker's (module.name): the test only enqueues.
        self.tasks = {
            fn.__name__: self.huey.task(name=fn.__name__)(workload.journaled(fn))
            for fn in (
                workload.record,
                workload.fail_with_database_error,
                workload.leave_transaction_open,
            )
        }
        self.journal = Journal()

    def send(self, name: str, *args: object) -> None:
        self.tasks[name](*args)

    def worker(self, variant: str, *, workers: int, kind: str = "thread", **env: str) -> Worker:
        command = [
            sys.executable,
            "-m",
            "django",
            "run_huey",
            "--settings=tests.integrations.huey_project.settings",
            f"--workers={workers}",
            f"--worker-type={kind}",
            "--no-periodic",
        ]
        return Worker(
            command,
            worker_env(
                variant,
                pool_size=POOL_SIZE,
                DBBRIDGE_WORKER_QUEUE=self.name,
                DBBRIDGE_WORKER_JOURNAL=self.journal.path,
                **env,
            ),
        )

    def close(self) -> None:
        self.journal.close()
        self.huey.storage.flush_all()


@pytest.fixture
def huey() -> Iterator[Huey]:
    fw = Huey()
    yield fw
    fw.close()


def test_bridge_thread_workers_share_the_pool_and_survive_killed_sessions(huey: Huey) -> None:
    with huey.worker("bridge", workers=4) as worker:
        burst = harness.run_burst(worker, huey.journal, huey.send)
        worker.stop()
    # One process: POOL_SIZE sessions at most, whatever the 4 threads do.
    assert 1 <= len(burst.used) <= POOL_SIZE
    assert 1 <= burst.peak <= POOL_SIZE
    assert burst.ok == burst.committed == TASKS + 50  # no task lost after the kill
    assert settled_sessions(0) == 0


def test_bridge_process_workers_leave_the_consumers_session_alone(huey: Huey) -> None:
    with huey.worker("bridge", workers=2, kind="process", DBBRIDGE_WORKER_PARENT_SESSION="1") as w:
        burst = harness.run_burst(w, huey.journal, huey.send, kill=False)
        parent = parent_row()
        # Forked after the consumer opened its session: the workers discarded
        # it without a word to the server, and ran every task on their own.
        assert parent.backend not in burst.used
        assert live_backends({parent.backend}) == {parent.backend}
        w.stop()
    assert 1 <= len(burst.used) <= 2 * POOL_SIZE  # processes x POOL_SIZE
    assert 1 <= burst.peak <= 2 * POOL_SIZE + 1  # + the consumer's own session
    assert burst.ok == burst.committed == TASKS
    assert settled_sessions(0) == 0


def test_db_task_holds_a_session_per_thread(huey: Huey) -> None:
    with huey.worker("own", workers=4, DBBRIDGE_WORKER_HUEY_TASK="db_task") as worker:
        burst = harness.run_burst(worker, huey.journal, huey.send, tasks=200)
        worker.stop()
    # close_old_connections() around each task: each of the 4 threads keeps
    # its own connection; health checks replace killed ones.
    assert len(burst.used) > POOL_SIZE
    assert burst.ok == burst.committed == 200 + 50
    assert settled_sessions(0) == 0


def test_plain_tasks_lose_work_after_killed_sessions(huey: Huey) -> None:
    with huey.worker("own", workers=4) as worker:
        burst = harness.run_burst(worker, huey.journal, huey.send, tasks=100)
        worker.stop()
    # Nothing checks a plain task's connection: each thread's first task
    # after the kill fails.
    assert burst.ok < 100 + 50
    assert settled_sessions(0) == 0


def test_process_workers_without_the_library_run_tasks_on_the_consumers_session(
    huey: Huey,
) -> None:
    env = {"DBBRIDGE_WORKER_PARENT_SESSION": "1", "DBBRIDGE_WORKER_HUEY_TASK": "db_task"}
    with huey.worker("own", workers=1, kind="process", **env) as worker:
        huey.send("record", 1)
        huey.journal.outcome("record", 1, worker)
        (task,) = harness.rows("task")
        # The forked worker inherited the consumer's connection and used it:
        # two processes on one session (one worker keeps it from corrupting).
        assert task.backend == parent_row().backend
        worker.stop()
    settled_sessions(0)


def run_sequence(huey: Huey, variant: str, **env: str) -> dict[str, object]:
    with huey.worker(variant, workers=1, **env) as worker:
        return harness.run_sequence(worker, huey.journal, huey.send)


def test_after_a_database_error_or_a_transaction_left_open_the_next_task_is_clean(
    huey: Huey,
) -> None:
    assert run_sequence(huey, "bridge") == harness.CLEAN_SEQUENCE


def test_db_task_carries_a_transaction_left_open_into_the_next_task(huey: Huey) -> None:
    own = run_sequence(huey, "own", DBBRIDGE_WORKER_HUEY_TASK="db_task")
    assert own["error_session_reused"] is True
    assert own["after_leftover"] != "ok"  # the broken transaction fails the next task
    assert own["row_after_leftover"] is False


def test_plain_tasks_write_into_a_transaction_left_open(huey: Huey) -> None:
    own = run_sequence(huey, "own")
    # The next task "succeeds" inside the leftover transaction, which is never
    # committed: its work is lost when the connection goes.
    assert own["after_leftover"] == "ok"
    assert own["row_after_leftover"] is False


def test_periodic_tasks_get_the_hooks_and_a_timeout_closes(db_settings: SetSetting) -> None:
    """In-process (a `MemoryHuey`, tasks executed on a thread as a worker does):
    a periodic task borrows from the pool like any task, and a `TaskTimeout`
    closes the connection."""
    from huey import MemoryHuey, crontab
    from huey.exceptions import TaskTimeout

    from async_dbbridge._lending import get_pool
    from async_dbbridge.integrations.huey import install
    from tests.conftest import backend_id

    db_settings(CONN_MAX_AGE=60)
    instance = install(MemoryHuey("dbbridge-in-process", immediate=False))
    seen: list[int] = []

    @instance.periodic_task(crontab(minute="*"))  # type: ignore[untyped-decorator]  # huey is untyped
    def tick() -> None:
        seen.append(backend_id())

    @instance.task()  # type: ignore[untyped-decorator]  # huey is untyped
    def times_out() -> None:
        seen.append(backend_id())
        raise TaskTimeout("as the worker's SIGALRM handler raises it")

    def worker() -> None:
        try:
            for task in (tick.s(), tick.s(), times_out.s(), tick.s()):
                instance.execute(task)
        finally:
            for hook in instance._shutdown.values():
                hook()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    assert seen[0] == seen[1] == seen[2]  # reused from the pool
    assert seen[3] != seen[2]  # closed after the timeout
    stats = get_pool("default").stats()
    assert stats.opened == 2
    assert stats.in_use == 0
