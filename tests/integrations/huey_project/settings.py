"""Settings of the Huey consumer a test starts (``django-admin run_huey``).

``DBBRIDGE_WORKER_QUEUE`` names the Huey instance (its Redis keys): each test
has its own.
"""

from __future__ import annotations

import os
from typing import Any

from tests.integrations.worker_settings import *  # noqa: F403
from tests.integrations.worker_settings import INSTALLED_APPS as _APPS

INSTALLED_APPS = [*_APPS, "huey.contrib.djhuey", "tests.integrations.huey_project"]
HUEY: dict[str, Any] = {
    "huey_class": "huey.RedisHuey",
    "name": os.environ["DBBRIDGE_WORKER_QUEUE"],
    "immediate": False,
    "connection": {"host": "127.0.0.1", "port": 6379},
}
