"""Real Celery workers (``celery worker`` subprocesses) with `install(app)`, and without it.

Each test starts the worker of ``tests/integrations/celery_project`` against
the test process's test database and a real broker (Redis; RabbitMQ for the
threads pool), sends it tasks through a client app of its own, and counts on
the database server: sessions sampled while the tasks run, the sessions the
tasks report (``probe`` returns the server's name for its session), and those
left once the worker has exited on SIGTERM. One worker start serves several
checks where they stay clear.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult
from django.db import connections

from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import kill_backend
from tests.integrations.celery_project.config import DJANGO_POOL_MAX, celery_config
from tests.testapp.models import Item

pytestmark = [
    pytest.mark.requires_server,
    pytest.mark.workers,
    pytest.mark.django_db(transaction=True),
]

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integrations.celery_project.worker"
REDIS = "redis://127.0.0.1:6379/13"
RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"

#: Seconds for a worker to start (import, django.setup(), broker), and to exit on SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
#: Seconds for a batch of tasks to finish.
BATCH_TIMEOUT = 60.0


class Sampler(threading.Thread):
    """Counts the server's sessions on the test database until stopped."""

    def __init__(self) -> None:
        super().__init__(name="session-sampler", daemon=True)
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(server_session_count())
            self.stopped.wait(0.005)

    def stop(self) -> int:
        self.stopped.set()
        self.join(10)
        assert self.samples, "no session count was sampled"
        return max(self.samples)


class Worker:
    """A ``celery worker`` subprocess of the test project, and a client app for its queue."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        pool: str,
        concurrency: int,
        variant: str = "bridge",
        broker: str = REDIS,
        pool_size: int = 1,
        django_pool: bool = False,
        hold_parent_session: bool = False,
    ) -> None:
        conn = connections["default"]
        self.parent_file = tmp_path / f"parent-{uuid.uuid4().hex}.txt"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
            "DJANGO_SETTINGS_MODULE": "tests.integrations.celery_project.settings",
            "CELERY_TEST_DB_BACKEND": conn.vendor,  # "postgresql" or "mysql", as DB_BACKEND
            "CELERY_TEST_DB": str(conn.settings_dict["NAME"]),
            "CELERY_TEST_VARIANT": variant,
            "CELERY_TEST_POOL_SIZE": str(pool_size),
            "CELERY_TEST_BROKER": broker,
            "CELERY_TEST_RESULTS": REDIS,
            "CELERY_TEST_QUEUE": f"dbbridge-celery-{uuid.uuid4().hex}",
        }
        if django_pool:
            self.env["CELERY_TEST_DJANGO_POOL"] = "1"
        if hold_parent_session:
            self.env["CELERY_TEST_PARENT_FILE"] = str(self.parent_file)
        self.command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP,
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel",
            "INFO",
            "--hostname",
            f"dbbridge-test-{uuid.uuid4().hex[:8]}@%h",
        ]
        self.log_path = tmp_path / f"worker-{pool}-{variant}.log"
        self.client = Celery("dbbridge-test-client", fixups=[], set_as_current=False)
        self.client.conf.update(celery_config(self.env))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Worker:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            # Ready once it has run a task (bounded: a worker that cannot start fails here).
            self.result(self.send("probe", 0), START_TIMEOUT)
        except BaseException:
            # __exit__ does not run when __enter__ raises: the worker must not outlive the test.
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        # The queue, and whatever a failed test left in it, goes with the worker.
        with self.client.connection_for_write() as broker:
            channel: Any = broker.default_channel  # the transport's: not in the stubs
            channel.queue_delete(self.env["CELERY_TEST_QUEUE"])
        self.client.close()
        # The result backend's Redis connections are not the app's to close.
        backend: Any = self.client.backend  # a RedisBackend, whose type the stubs do not know
        backend.client.connection_pool.disconnect()

    def send(self, name: str, *args: Any, **options: Any) -> AsyncResult[Any]:
        return self.client.send_task(name, args=args, **options)

    def result(self, result: AsyncResult[Any], timeout: float = BATCH_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return result.get(timeout=0.5, propagate=False)
            except ResultTimeout:
                pass
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"the worker exited ({self.process.returncode}):\n{self.log()}")
            if time.monotonic() >= deadline:
                pytest.fail(f"no result within {timeout} s:\n{self.log()[-3000:]}")

    def probes(self, count: int, *, hold: float = 0.0) -> list[dict[str, Any]]:
        """``count`` probe tasks sent at once; their reports, all successful."""
        sent = [self.send("probe", n, hold) for n in range(count)]
        reports = [self.result(r) for r in sent]
        failed = [r for r in reports if not isinstance(r, dict)]
        assert not failed, f"{len(failed)} of {count} tasks failed, e.g. {failed[0]!r}"
        return reports

    def stop(self) -> int:
        """SIGTERM (Celery's warm shutdown); the exit status, within the deadline."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within {STOP_TIMEOUT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def no_sessions() -> Iterator[None]:
    """The test process holds no session while the workers' are counted."""
    connections.close_all()
    wait_for_server_sessions("default", 0)
    yield
    connections.close_all()


def sessions(reports: list[dict[str, Any]]) -> set[str]:
    return {r["session"] for r in reports}


def session_alive(session: str) -> bool:
    """Whether the server still has the session named as ``tasks.session_id()`` names it."""
    conn = connections["default"]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid || '@' || backend_start = %s",
                [session],
            )
        else:
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", [session]
            )
        alive = int(cursor.fetchone()[0]) > 0
    conn.close()
    return alive


def gone(session: str, timeout: float = 10.0) -> bool:
    """Whether the session ends within ``timeout`` (a server drops a closed one a moment later)."""
    deadline = time.monotonic() + timeout
    while session_alive(session):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def marked(kind: str) -> tuple[int, str]:
    """(worker pid, session) a task that ended badly wrote down before it did."""
    name = Item.objects.get(name__startswith=f"{kind}:").name
    connections["default"].close()
    _, pid, session = name.split(":", 2)
    return int(pid), session


def kill(names: set[str]) -> None:
    """End these sessions (named as ``tasks.session_id()`` names them) from the server side."""
    for name in names:
        kill_backend("default", int(name.split("@")[0]))
    connections["default"].close()


def clean_next_task(reports: list[dict[str, Any]], pid: int) -> dict[str, Any]:
    """The first of ``reports`` that ran in worker process ``pid``, checked clean."""
    mine = sorted((r for r in reports if r["pid"] == pid), key=lambda r: r["started"])
    assert mine, f"no probe ran in worker process {pid}: {reports!r}"
    for report in mine:
        assert report["autocommit"]
        assert not report["in_atomic_block"]
        assert report["left_open_rows"] == 0
    return mine[0]


def test_prefork_runs_500_tasks_on_two_sessions_and_recovers_from_bad_tasks(
    tmp_path: Path, no_sessions: None
) -> None:
    worker = Worker(tmp_path, pool="prefork", concurrency=2, hold_parent_session=True)
    with worker:
        started = worker.parent_file.read_text().splitlines()
        assert len(started) == 1
        assert started[0].startswith("start ")
        parent_session = started[0].removeprefix("start ")

        sampler = Sampler()
        sampler.start()
        reports = worker.probes(500)
        peak = sampler.stop()
        # Opened, then reused: one session per child process, whatever the task count.
        assert len(reports) == 500
        by_process: dict[int, set[str]] = {}
        for r in reports:
            by_process.setdefault(r["pid"], set()).add(r["session"])
        assert 1 <= len(by_process) <= 2
        assert all(len(s) == 1 for s in by_process.values()), by_process
        # The bound: 2 processes x POOL_SIZE 1, plus the parent's own session.
        assert 2 <= peak <= 2 * 1 + 1, sorted(set(sampler.samples))

        # A database error: that child's connection is closed, the next task gets another.
        assert isinstance(worker.result(worker.send("fail_with_database_error")), Exception)
        pid, bad = marked("error")
        after = clean_next_task(worker.probes(10, hold=0.05), pid)
        assert after["session"] != bad
        assert gone(bad)

        # A transaction left open: rolled back, the connection goes back clean.
        assert worker.result(worker.send("leave_transaction_open")) is None
        pid, _ = marked("marker")
        clean_next_task(worker.probes(10, hold=0.05), pid)
        assert not Item.objects.filter(name__startswith="left-open").exists()
        connections["default"].close()

        # A soft time limit mid-query: the interrupted connection is closed.
        failure = worker.result(worker.send("slow_query", 1.0, soft_time_limit=0.3))
        assert type(failure).__name__ == "SoftTimeLimitExceeded"
        pid, slow = marked("slow")
        after = clean_next_task(worker.probes(10, hold=0.05), pid)
        assert after["session"] != slow

        # The children's fork cleanup never touched the parent's session.
        assert session_alive(parent_session)
        assert worker.stop() == 0
    # ... and the parent could still use it when told to stop.
    assert worker.parent_file.read_text().splitlines()[1:] == [f"stop {parent_session}"]
    assert wait_for_server_sessions("default", 0, timeout=10) == 0


def test_threads_pool_on_rabbitmq_holds_the_bound_and_survives_killed_sessions(
    tmp_path: Path, no_sessions: None
) -> None:
    worker = Worker(tmp_path, pool="threads", concurrency=4, broker=RABBITMQ, pool_size=2)
    with worker:
        sampler = Sampler()
        sampler.start()
        first = worker.probes(100, hold=0.002)
        peak = sampler.stop()
        assert {r["thread"] for r in first} != {"MainThread"}
        assert 1 <= len(sessions(first)) <= 2
        assert 1 <= peak <= 2, sorted(set(sampler.samples))

        # Every session of the worker ends between two batches (a failover, a
        # restarted server): with CONN_HEALTH_CHECKS on, no task of the next one is lost.
        kill(sessions(first))
        # None left (the test's own session, closed, leaves the server a moment later).
        wait_for_server_sessions("default", 0)
        # At once: the pool checks every checkout (a socket probe), not only one
        # that sat idle a second.
        second = worker.probes(100, hold=0.002)
        assert not sessions(first) & sessions(second)
        assert 1 <= len(sessions(second)) <= 2
        assert worker.stop() == 0
    assert wait_for_server_sessions("default", 0, timeout=10) == 0


def test_celerys_own_fixup_opens_a_session_per_task_install_reuses_one(
    tmp_path: Path, no_sessions: None
) -> None:
    """The same workload on a solo worker (tasks on its main thread), without and with install()."""
    opened: dict[str, int] = {}
    for variant in ("own", "bridge"):
        with Worker(tmp_path, pool="solo", concurrency=1, variant=variant) as worker:
            sampler = Sampler()
            sampler.start()
            reports = worker.probes(100)
            peak = sampler.stop()
            assert {r["thread"] for r in reports} == {"MainThread"}
            opened[variant] = len(sessions(reports))
            # Celery's fix-up: a closed session may still be listed as the next one starts.
            assert peak == 1 if variant == "bridge" else peak >= 1
            assert worker.stop() == 0
        assert wait_for_server_sessions("default", 0, timeout=10) == 0
    # Celery's fix-up closes every connection after every task: a new session each.
    assert opened["own"] >= 95, opened
    # install(app): one session, reused by every task.
    assert opened["bridge"] == 1, opened


@pytest.mark.vendor("postgresql")
def test_djangos_psycopg_pool_is_never_closed_per_task(tmp_path: Path, no_sessions: None) -> None:
    worker = Worker(tmp_path, pool="prefork", concurrency=2, django_pool=True)
    with worker:
        reports = worker.probes(100)
        # Celery's own fix-up closes the whole pool after every task in prefork.
        assert 1 <= len(sessions(reports)) <= 2 * DJANGO_POOL_MAX
        assert worker.stop() == 0
    assert wait_for_server_sessions("default", 0, timeout=10) == 0
