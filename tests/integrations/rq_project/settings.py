"""Settings of django-rq's ``rqworker`` a test starts (``DBBRIDGE_WORKER_QUEUE``: its queue)."""

from __future__ import annotations

import os
from typing import Any

from tests.integrations.worker_settings import *  # noqa: F403
from tests.integrations.worker_settings import INSTALLED_APPS as _APPS

INSTALLED_APPS = [*_APPS, "django_rq"]
RQ_QUEUES: dict[str, Any] = {
    os.environ["DBBRIDGE_WORKER_QUEUE"]: {"HOST": "127.0.0.1", "PORT": 6379, "DB": 0}
}
