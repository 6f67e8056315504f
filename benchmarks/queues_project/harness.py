"""One benchmark round of a Dramatiq, Huey or RQ worker (``benchmarks/_workers_*.py``).

The framework module gives the worker's command and a way to enqueue
``work.short_orm(n)``; `measure` does the rest, the same for the three: start
the worker, wait until it ran one task, enqueue ``tasks`` tasks and time them
from the first enqueue to the last outcome (counted in Redis by the tasks),
sampling the server's sessions meanwhile; SIGTERM; count the sessions left
once it exited and the sessions it opened (PostgreSQL: ``pg_stat_database.sessions``
over the worker's whole life, read from the ``postgres`` database; MariaDB:
the distinct session ids the tasks reported).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import IO, Any, Final

from redis import Redis

from benchmarks._common import ROOT, BenchDatabase, HarnessError, Sampler, settle
from benchmarks._workers import WorkerRound
from benchmarks.queues_project.work import REDIS_URL, keys

SETTINGS_MODULE: Final = "benchmarks.queues_project.settings"
START_TIMEOUT: Final = 60.0
#: Seconds for a whole batch: a floor, plus what the slowest worker here (RQ's forking
#: worker, a process per job: 8-10 jobs/s on a loaded 2-CPU machine) needs per task.
RUN_TIMEOUT: Final = 120.0
RUN_TIMEOUT_PER_TASK: Final = 0.25
STOP_TIMEOUT: Final = 30.0


def new_queue(framework: str) -> str:
    return f"dbbridge-bench-{framework}-{uuid.uuid4().hex[:12]}"


def worker_env(
    database: BenchDatabase, framework: str, variant: str, queue: str, pool_size: int
) -> dict[str, str]:
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {
        **os.environ,
        **database.server_env(),
        "DJANGO_SETTINGS_MODULE": SETTINGS_MODULE,
        "BENCH_FRAMEWORK": framework,
        "BENCH_VARIANT": variant,
        "BENCH_QUEUE": queue,
        "BENCH_POOL_SIZE": str(pool_size),
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }


class WorkerProcess:
    """The worker's CLI in a subprocess (a session of its own), its output in a file."""

    def __init__(self, label: str, command: Sequence[str], env: dict[str, str]) -> None:
        self.label = label
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix=f"bench-{label}-")  # noqa: SIM115
        self.process = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise HarnessError(f"{self.label}: the worker exited:\n{self.tail()}")

    def stop(self, sigterm_again: float | None) -> None:
        """SIGTERM (warm shutdown); ``sigterm_again``: a second one after that long."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            if sigterm_again is not None:
                try:
                    self.process.wait(sigterm_again)
                    return
                except subprocess.TimeoutExpired:
                    self.process.send_signal(signal.SIGTERM)
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise HarnessError(f"{self.label}: no exit after SIGTERM:\n{self.tail()}") from None

    def tail(self, chars: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def close(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.log.close()


def sessions_opened(database: BenchDatabase) -> int | None:
    """Sessions ever ended on the benchmark database (PostgreSQL; None elsewhere).

    Read from the ``postgres`` database, so that reading opens no session on
    the counted one.
    """
    if database.backend != "postgresql":
        return None
    from django.db import connections

    with connections["admin"]._nodb_cursor() as cursor:
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", [database.name])
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def _sessions_opened_since(database: BenchDatabase, before: int) -> int:
    """Once the count stopped moving (the server counts a session a moment after it ends)."""
    last = sessions_opened(database) or 0
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        current = sessions_opened(database) or 0
        if current == last:
            break
        last = current
    return last - before


def _outcomes(redis: Any, prefix: str) -> int:
    done, failed, _ = keys(prefix)
    values = redis.mget(done, failed)
    return sum(int(v or 0) for v in values)


def _wait_outcomes(
    redis: Any, prefix: str, count: int, worker: WorkerProcess, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while _outcomes(redis, prefix) < count:
        worker.check_alive()
        if time.monotonic() > deadline:
            raise HarnessError(f"{worker.label}: {count} outcomes not in time:\n{worker.tail()}")
        time.sleep(0.005)


def measure(
    *,
    framework: str,
    variant: str,
    database: BenchDatabase,
    tasks: int,
    queue: str,
    command: Sequence[str],
    env: dict[str, str],
    send: Callable[[int], None],
    bound: int,
    sigterm_again: float | None = None,
) -> WorkerRound:
    redis: Any = Redis.from_url(REDIS_URL)
    opened_before = sessions_opened(database)
    worker = WorkerProcess(f"{framework}-{variant}", command, env)
    try:
        send(0)  # the worker is up once it ran this one
        _wait_outcomes(redis, queue, 1, worker, START_TIMEOUT)
        with Sampler(lambda: database.count_sessions(worker.pid), 0.05) as sampler:
            started = time.monotonic()
            for n in range(1, tasks + 1):
                send(n)
            _wait_outcomes(
                redis, queue, tasks + 1, worker, RUN_TIMEOUT + RUN_TIMEOUT_PER_TASK * tasks
            )
            seconds = time.monotonic() - started
        worker.stop(sigterm_again)
        left = settle(lambda: database.count_sessions(worker.pid), timeout=10.0, stable=1.0)
    finally:
        worker.close()
    done, failed_key, sessions = keys(queue)
    failed = int(redis.get(failed_key) or 0)
    ids = redis.smembers(sessions)
    redis.delete(done, failed_key, sessions)
    redis.close()
    if opened_before is not None:
        opened = _sessions_opened_since(database, opened_before)
    else:
        opened = len(ids)
    return WorkerRound(
        framework=framework,
        variant=variant,
        tasks=tasks,
        seconds=seconds,
        failed=failed,
        opened=opened,
        peak_sessions=max(sampler.samples, default=0),
        left_sessions=left,
        bound=bound,
    )
