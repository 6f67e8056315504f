"""The broker module of the benchmark's ``dramatiq`` workers (imported by each worker process).

django_dramatiq's default middleware minus Prometheus and the admin, the last
one being the variant's: ``DbConnectionsMiddleware`` (``own``) or
``DBBridgeMiddleware`` (``bridge``).
"""

from __future__ import annotations

import os

import django

django.setup()

import dramatiq  # noqa: E402
from dramatiq.brokers.redis import RedisBroker  # noqa: E402
from dramatiq.middleware import (  # noqa: E402
    AgeLimit,
    Callbacks,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from benchmarks.queues_project import work  # noqa: E402
from benchmarks.queues_project.settings import BRIDGE  # noqa: E402

QUEUE = os.environ["BENCH_QUEUE"]

db_middleware: Middleware
if BRIDGE:
    from async_dbbridge.integrations.dramatiq import DBBridgeMiddleware

    db_middleware = DBBridgeMiddleware()
else:
    from django_dramatiq.middleware import DbConnectionsMiddleware

    db_middleware = DbConnectionsMiddleware()

broker = RedisBroker(  # type: ignore[no-untyped-call]  # dramatiq's __init__ is untyped
    url=work.REDIS_URL,
    namespace=QUEUE,
    middleware=[
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=0),
        db_middleware,
    ],
)
dramatiq.set_broker(broker)
dramatiq.actor(actor_name="short_orm", queue_name=QUEUE, max_retries=0)(work.short_orm)
