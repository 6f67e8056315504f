"""The workload as Huey tasks (``run_huey`` imports it: ``tasks`` of an installed app).

``bridge``: plain ``task()``s, with `async_dbbridge.integrations.huey.install`.
``own``: djhuey's ``db_task()`` (``close_old_connections()`` around each task)
or, with ``DBBRIDGE_WORKER_HUEY_TASK=task``, plain ``task()``s (nothing).
With ``DBBRIDGE_WORKER_PARENT_SESSION=1`` the consumer's own process holds a
session from here on (process workers are forked after this import).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from huey.contrib.djhuey import HUEY, db_task, task

from tests.integrations import workload
from tests.integrations.worker_settings import BRIDGE

if BRIDGE:
    from async_dbbridge.integrations.huey import install

    install(HUEY)
    decorator: Callable[..., Callable[..., object]] = task
else:
    decorator = db_task if os.environ.get("DBBRIDGE_WORKER_HUEY_TASK") == "db_task" else task

for fn in (workload.record, workload.fail_with_database_error, workload.leave_transaction_open):
    decorator(name=fn.__name__)(workload.journaled(fn))

if os.environ.get("DBBRIDGE_WORKER_PARENT_SESSION") == "1":
    workload.parent_session()
