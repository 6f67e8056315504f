"""The broker module a test hands to the ``dramatiq`` CLI (each worker process imports it).

It sets Django up (Dramatiq's master process never imports it: worker
processes start without Django, so they inherit no connection), builds the
broker the test asked for (``DBBRIDGE_WORKER_BROKER``: ``redis`` or
``rabbitmq``) with django_dramatiq's default middleware minus Prometheus and
the admin, the last one being the variant's: django_dramatiq's
``DbConnectionsMiddleware`` (``own``) or ``DBBridgeMiddleware`` (``bridge``),
and declares the workload's actors on the test's queue.
"""

from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.integrations.worker_settings")
django.setup()

import dramatiq  # noqa: E402
from dramatiq.middleware import (  # noqa: E402
    AgeLimit,
    Callbacks,
    Middleware,
    Pipelines,
    Retries,
    ShutdownNotifications,
    TimeLimit,
)

from tests.integrations import workload  # noqa: E402
from tests.integrations.dramatiq_project.brokers import make_broker  # noqa: E402
from tests.integrations.worker_settings import BRIDGE  # noqa: E402

QUEUE = os.environ["DBBRIDGE_WORKER_QUEUE"]


def db_middleware() -> Middleware:
    if BRIDGE:
        from async_dbbridge.integrations.dramatiq import DBBridgeMiddleware

        return DBBridgeMiddleware()
    from django_dramatiq.middleware import DbConnectionsMiddleware

    return DbConnectionsMiddleware()  # type: ignore[no-any-return]  # untyped package


broker = make_broker(
    os.environ["DBBRIDGE_WORKER_BROKER"],
    QUEUE,
    [
        AgeLimit(),
        TimeLimit(),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(max_retries=0),
        db_middleware(),
    ],
)
dramatiq.set_broker(broker)

for fn in (
    workload.record,
    workload.record_slowly,
    workload.fail_with_database_error,
    workload.leave_transaction_open,
):
    dramatiq.actor(actor_name=fn.__name__, queue_name=QUEUE, max_retries=0)(workload.journaled(fn))
