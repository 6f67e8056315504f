"""Celery for ``bench_workers.py``: a prefork worker (2 processes), Redis, short ORM tasks.

``own`` is Celery's built-in Django fix-up (it closes every connection before
and after every task); ``bridge`` is `async_dbbridge.integrations.celery.install`,
with ``POOL_SIZE`` 1 (a process of the prefork pool runs one task at a time),
so the bound is 2 sessions. Both run at ``CONN_MAX_AGE=60``,
``CONN_HEALTH_CHECKS=True`` (``benchmarks/workers_project/settings.py``).

A round: start ``celery worker`` on a fresh queue, wait until it has run one
task, send ``tasks`` tasks (``bench.short_orm``: one primary-key lookup) and
time them from the first send to the last result, sampling the server's
sessions meanwhile; then SIGTERM, and count the sessions left once it has
exited and the sessions it opened (PostgreSQL: ``pg_stat_database.sessions``
over the worker's whole life; MariaDB: the distinct session ids the tasks
report).
"""

from __future__ import annotations

import sys
import time
import uuid
from typing import Any, Final

import celery
from celery import Celery
from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult, ResultSet

from benchmarks._common import BenchDatabase, HarnessError, Sampler
from benchmarks._workers import WorkerRound
from benchmarks.workers_project.celery_config import celery_config
from benchmarks.workers_project.harness import (
    WorkerProcess,
    process_tree_cpu,
    sessions_left,
    sessions_opened,
    sessions_opened_since,
    worker_env,
)

FRAMEWORK: Final = "celery"
VARIANTS: Final = ("own", "bridge")
VERSION: Final = celery.__version__

#: A Redis database of its own: the test suite's workers use 13.
BROKER: Final = "redis://127.0.0.1:6379/14"
PROCESSES: Final = 2
POOL_SIZE: Final = 1
TASK: Final = "bench.short_orm"

START_TIMEOUT: Final = 60.0
RUN_TIMEOUT: Final = 300.0


def _wait(worker: WorkerProcess, result: AsyncResult[Any], deadline: float) -> Any:
    while True:
        try:
            return result.get(timeout=0.5, propagate=False)
        except ResultTimeout:
            worker.check_alive()
            if time.monotonic() >= deadline:
                raise HarnessError(f"{worker.label}: no result in time:\n{worker.tail()}") from None


def run_round(variant: str, *, database: BenchDatabase, tasks: int) -> WorkerRound:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    env = worker_env(
        database,
        variant,
        BENCH_POOL_SIZE=str(POOL_SIZE),
        BENCH_CELERY_BROKER=BROKER,
        BENCH_CELERY_RESULTS=BROKER,
        BENCH_CELERY_QUEUE=f"dbbridge-bench-{uuid.uuid4().hex}",
    )
    client = Celery("bench-client", fixups=[], set_as_current=False)
    client.conf.update(celery_config(env))
    opened_before = sessions_opened(database)
    worker = WorkerProcess(
        f"celery-{variant}",
        [
            *(sys.executable, "-m", "celery"),
            *("-A", "benchmarks.workers_project.celery_app", "worker"),
            *("--pool", "prefork", "--concurrency", str(PROCESSES)),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            *("--loglevel", "WARNING"),
        ],
        env,
    )
    try:
        ids: set[int] = set()
        first = _wait(worker, client.send_task(TASK, args=(0,)), time.monotonic() + START_TIMEOUT)
        if isinstance(first, int):
            ids.add(first)
        with Sampler(lambda: database.count_sessions(worker.pid), 0.05) as sampler:
            cpu_before = process_tree_cpu(worker.pid)
            started = time.monotonic()
            sent = ResultSet([client.send_task(TASK, args=(n,)) for n in range(tasks)], app=client)
            # One subscription for them all (the Redis backend's native join).
            results = sent.join_native(
                timeout=RUN_TIMEOUT, propagate=False, on_interval=worker.check_alive
            )
            seconds = time.monotonic() - started
            cpu = process_tree_cpu(worker.pid) - cpu_before
        worker.stop()
        left = sessions_left(database, worker.pid)
    finally:
        worker.close()
        with client.connection_for_write() as broker:
            channel: Any = broker.default_channel  # the transport's: not in the stubs
            channel.queue_delete(env["BENCH_CELERY_QUEUE"])
        client.close()
        backend: Any = client.backend  # a RedisBackend: its client is not the app's to close
        backend.client.connection_pool.disconnect()
    failed = sum(isinstance(r, BaseException) for r in results)
    if opened_before is not None:
        opened = sessions_opened_since(database, opened_before)
    else:
        ids.update(r for r in results if isinstance(r, int))
        opened = len(ids)
    return WorkerRound(
        framework=FRAMEWORK,
        variant=variant,
        tasks=tasks,
        seconds=seconds,
        failed=failed,
        opened=opened,
        peak_sessions=max(sampler.samples, default=0),
        left_sessions=left,
        bound=PROCESSES * POOL_SIZE,
        worker_cpu_s=cpu,
    )
