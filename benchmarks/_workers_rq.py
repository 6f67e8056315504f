"""RQ for ``bench_workers.py``: one ``rq worker``, Redis, short ORM tasks.

``own`` is RQ's default ``Worker`` as django-rq runs it (a work horse forked
per job, nothing done about connections: each horse opens a session and exits
without closing it); ``bridge`` is
`async_dbbridge.integrations.rq.DBBridgeWorker` (a horse per job too, which
closes its session cleanly). The extra variants are the same without the fork:
``own-simple`` (RQ's ``SimpleWorker``: one connection for the worker's life,
never checked) and ``bridge-simple`` (``DBBridgeSimpleWorker``, ``POOL_SIZE`` 1).
All at ``CONN_MAX_AGE=60``, ``CONN_HEALTH_CHECKS=True``
(``benchmarks/queues_project/settings.py``). The round itself is
`benchmarks.queues_project.harness.measure`.

Run on its own (before ``bench_workers.py`` exists on this branch)::

    .venv/bin/python benchmarks/_workers_rq.py [--rounds 3] [--tasks 300] [--backend mysql]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Final

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rq

from benchmarks._common import BenchDatabase
from benchmarks._workers import WorkerRound
from benchmarks.queues_project import harness

FRAMEWORK: Final = "rq"
VARIANTS: Final = ("own", "bridge", "own-simple", "bridge-simple")
VERSION: Final = rq.__version__

POOL_SIZE: Final = 1
WORKER_CLASSES: Final = {
    "own": "rq.worker.Worker",
    "bridge": "async_dbbridge.integrations.rq.DBBridgeWorker",
    "own-simple": "rq.worker.SimpleWorker",
    "bridge-simple": "async_dbbridge.integrations.rq.DBBridgeSimpleWorker",
}
#: An idle RQ worker may hang in its warm shutdown (rq/rq#1613): a second
#: SIGTERM, RQ's cold shutdown, ends it.
SIGTERM_AGAIN: Final = 1.5


def run_round(variant: str, *, database: BenchDatabase, tasks: int) -> WorkerRound:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, not {variant!r}")
    from redis import Redis
    from rq import Queue

    from benchmarks.queues_project.work import REDIS_URL

    queue = harness.new_queue(FRAMEWORK)
    redis = Redis.from_url(REDIS_URL)
    client = Queue(queue, connection=redis)

    def send(n: int) -> None:
        client.enqueue("benchmarks.queues_project.work.short_orm", n, result_ttl=0)

    try:
        return harness.measure(
            framework=FRAMEWORK,
            variant=variant,
            database=database,
            tasks=tasks,
            queue=queue,
            command=[
                str(Path(sys.executable).with_name("rq")),
                "worker",
                "--config=benchmarks.queues_project.rq_config",
                f"--worker-class={WORKER_CLASSES[variant]}",
                "--quiet",
            ],
            env=harness.worker_env(database, FRAMEWORK, variant, queue, POOL_SIZE),
            send=send,
            # One job at a time: the horse's session (or the simple worker's).
            bound=POOL_SIZE,
            sigterm_again=SIGTERM_AGAIN,
        )
    finally:
        client.delete(delete_jobs=True)
        redis.close()


if __name__ == "__main__":
    from benchmarks.queues_project.runner import main

    sys.exit(main(sys.modules[__name__]))
