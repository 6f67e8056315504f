"""Dramatiq for ``bench_workers.py``: 2 worker processes x 8 threads, Redis, short ORM tasks.

``own`` is django_dramatiq's ``DbConnectionsMiddleware`` (``close_old_connections()``
around each message: a connection per worker thread, kept under
``CONN_MAX_AGE``); ``bridge`` is `async_dbbridge.integrations.dramatiq.DBBridgeMiddleware`
in its place, with ``POOL_SIZE`` 2: the bound is 4 sessions where ``own`` holds
up to 16. Both at ``CONN_MAX_AGE=60``, ``CONN_HEALTH_CHECKS=True``
(``benchmarks/queues_project/settings.py``). The round itself is
`benchmarks.queues_project.harness.measure`.

Run on its own (before ``bench_workers.py`` exists on this branch)::

    .venv/bin/python benchmarks/_workers_dramatiq.py [--rounds 3] [--tasks 500] [--backend mysql]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dramatiq

from benchmarks._common import BenchDatabase
from benchmarks._workers import WorkerRound
from benchmarks.queues_project import harness

FRAMEWORK: Final = "dramatiq"
VARIANTS: Final = ("own", "bridge")
VERSION: Final = dramatiq.__version__

PROCESSES: Final = 2
THREADS: Final = 8
POOL_SIZE: Final = 2


def run_round(variant: str, *, database: BenchDatabase, tasks: int) -> WorkerRound:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    from dramatiq.brokers.redis import RedisBroker

    from benchmarks.queues_project.work import REDIS_URL

    queue = harness.new_queue(FRAMEWORK)
    client = RedisBroker(url=REDIS_URL, namespace=queue, middleware=[])  # type: ignore[no-untyped-call]  # untyped __init__
    client.declare_queue(queue)

    def send(n: int) -> None:
        message: dramatiq.Message[None] = dramatiq.Message(
            queue_name=queue, actor_name="short_orm", args=(n,), kwargs={}, options={}
        )
        client.enqueue(message)

    try:
        return harness.measure(
            framework=FRAMEWORK,
            variant=variant,
            database=database,
            tasks=tasks,
            queue=queue,
            command=[
                str(Path(sys.executable).with_name("dramatiq")),
                "benchmarks.queues_project.dramatiq_broker",
                f"--processes={PROCESSES}",
                f"--threads={THREADS}",
            ],
            env=harness.worker_env(database, FRAMEWORK, variant, queue, POOL_SIZE),
            send=send,
            bound=PROCESSES * POOL_SIZE,
        )
    finally:
        client.flush_all()
        client.close()


if __name__ == "__main__":
    from benchmarks.queues_project.runner import main

    sys.exit(main(sys.modules[__name__]))
