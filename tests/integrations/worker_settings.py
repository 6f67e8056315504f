"""Django settings of a task worker that a test starts as a subprocess.

The test passes the test database and the variant through the environment
(see `tests.integrations.harness.worker_env`):

* ``DBBRIDGE_WORKER_BACKEND``, ``DBBRIDGE_WORKER_DB``: the backend and the test
  process's test database (the worker must use the very same);
* ``DBBRIDGE_WORKER_VARIANT``: ``bridge`` (async_dbbridge's integration, the
  library installed) or ``own`` (the framework's own Django handling, without
  the library: not even imported, so its fork hooks do not help);
* ``DBBRIDGE_WORKER_POOL_SIZE``: `ASYNC_DBBRIDGE["POOL_SIZE"]`.

Both variants run at the same Django settings: ``CONN_MAX_AGE=60``,
``CONN_HEALTH_CHECKS=True``.
"""

from __future__ import annotations

import os
from typing import Any

from tests.dbconfig import database

BACKEND = os.environ["DBBRIDGE_WORKER_BACKEND"]
VARIANT = os.environ.get("DBBRIDGE_WORKER_VARIANT", "bridge")
BRIDGE = VARIANT == "bridge"


def _default() -> dict[str, Any]:
    settings = database(BACKEND, os.environ["DBBRIDGE_WORKER_DB"])
    settings["CONN_MAX_AGE"] = 60
    settings["CONN_HEALTH_CHECKS"] = True
    return settings


DATABASES = {"default": _default()}
INSTALLED_APPS = ["tests.testapp", *(["async_dbbridge"] if BRIDGE else [])]
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_DBBRIDGE: dict[str, Any] = {
    "POOL_SIZE": int(os.environ.get("DBBRIDGE_WORKER_POOL_SIZE", "2")),
    "MAX_WORKERS": 2,
}
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"async_dbbridge": {"handlers": ["stderr"], "level": "WARNING"}},
}
