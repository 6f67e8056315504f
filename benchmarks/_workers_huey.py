"""Huey for ``bench_workers.py``: ``huey_consumer``, 8 thread workers, Redis, short ORM tasks.

``own`` is djhuey's ``db_task()`` (``close_old_connections()`` around each
task: a connection per worker thread, kept under ``CONN_MAX_AGE``); ``bridge``
is a plain ``task()`` with `async_dbbridge.integrations.huey.install`, with
``POOL_SIZE`` 2: the bound is 2 sessions where ``own`` holds up to 8. Both at
``CONN_MAX_AGE=60``, ``CONN_HEALTH_CHECKS=True``
(``benchmarks/queues_project/settings.py``). The round itself is
`benchmarks.queues_project.harness.measure`.

Run on its own (before ``bench_workers.py`` exists on this branch)::

    .venv/bin/python benchmarks/_workers_huey.py [--rounds 3] [--tasks 500] [--backend mysql]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import huey

from benchmarks._common import BenchDatabase
from benchmarks._workers import WorkerRound
from benchmarks.queues_project import harness

FRAMEWORK: Final = "huey"
VARIANTS: Final = ("own", "bridge")
VERSION: Final = huey.__version__

WORKERS: Final = 8
POOL_SIZE: Final = 2


def run_round(variant: str, *, database: BenchDatabase, tasks: int) -> WorkerRound:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    from huey import RedisHuey

    from benchmarks.queues_project import work

    queue = harness.new_queue(FRAMEWORK)
    client = RedisHuey(queue, url=work.REDIS_URL)
    # The worker's task by its name (module.name): the harness only enqueues it.
    short_orm = client.task(name="short_orm")(work.short_orm)
    try:
        return harness.measure(
            framework=FRAMEWORK,
            variant=variant,
            database=database,
            tasks=tasks,
            queue=queue,
            command=[
                str(Path(sys.executable).with_name("huey_consumer")),
                "benchmarks.queues_project.huey_app.HUEY",
                f"--workers={WORKERS}",
                "--worker-type=thread",
                "--no-periodic",
                "--quiet",
            ],
            env=harness.worker_env(database, FRAMEWORK, variant, queue, POOL_SIZE),
            send=short_orm,
            bound=POOL_SIZE,
        )
    finally:
        client.storage.flush_all()


if __name__ == "__main__":
    from benchmarks.queues_project.runner import main

    sys.exit(main(sys.modules[__name__]))
