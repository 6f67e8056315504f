"""The Celery configuration the worker and the test's client app share, from the environment.

* ``CELERY_TEST_BROKER``: the broker URL (Redis or RabbitMQ);
* ``CELERY_TEST_RESULTS``: the result backend URL (Redis);
* ``CELERY_TEST_QUEUE``: the one queue of this worker (a fresh name per worker
  start, so that concurrent test runs on one broker never share messages).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kombu import Queue

#: Django's psycopg pool (``CELERY_TEST_DJANGO_POOL=1``): at most this many
#: connections per worker process.
DJANGO_POOL_MAX = 2

#: RabbitMQ forgets a queue this long (ms) after its last consumer left: test
#: runs leave nothing behind on a shared broker.
QUEUE_EXPIRES_MS = 120_000


def celery_config(env: Mapping[str, str]) -> dict[str, Any]:
    queue = env["CELERY_TEST_QUEUE"]
    return {
        "broker_url": env["CELERY_TEST_BROKER"],
        "result_backend": env["CELERY_TEST_RESULTS"],
        "result_expires": 600,
        "task_default_queue": queue,
        # Declared alike by the client and the worker (RabbitMQ refuses a
        # second declaration with other arguments).
        "task_queues": [Queue(queue, queue_arguments={"x-expires": QUEUE_EXPIRES_MS})],
        "broker_connection_retry_on_startup": True,
        # No pidbox, no events: nothing of the worker's but its queue on the broker.
        "worker_enable_remote_control": False,
        "worker_send_task_events": False,
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
    }
