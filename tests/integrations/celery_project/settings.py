"""The Celery worker's Django settings: the test process's test database, from the environment.

* ``CELERY_TEST_DB_BACKEND`` (postgresql, mysql) and ``CELERY_TEST_DB`` (the
  test process's test database: the worker must use the very same);
* ``CELERY_TEST_VARIANT``: ``bridge`` (`install(app)`) or ``own`` (Celery's
  built-in Django fix-up; async_dbbridge is then not even imported, so its
  fork hook does not help);
* ``CELERY_TEST_POOL_SIZE``: ``ASYNC_DBBRIDGE["POOL_SIZE"]``;
* ``CELERY_TEST_DJANGO_POOL=1``: Django's own psycopg pool on ``default``
  (``OPTIONS["pool"]``, at most 2 connections; Django requires
  ``CONN_MAX_AGE=0`` with it).

Otherwise both variants run at the same settings: ``CONN_MAX_AGE=60``,
``CONN_HEALTH_CHECKS=True``.
"""

from __future__ import annotations

import os
from typing import Any

from tests.dbconfig import database
from tests.integrations.celery_project.config import DJANGO_POOL_MAX

BACKEND = os.environ["CELERY_TEST_DB_BACKEND"]
VARIANT = os.environ.get("CELERY_TEST_VARIANT", "bridge")
DJANGO_POOL = os.environ.get("CELERY_TEST_DJANGO_POOL") == "1"


def _default() -> dict[str, Any]:
    settings = database(BACKEND, os.environ["CELERY_TEST_DB"])
    settings["CONN_HEALTH_CHECKS"] = True
    if DJANGO_POOL:
        settings["CONN_MAX_AGE"] = 0
        settings["OPTIONS"] = {"pool": {"min_size": 1, "max_size": DJANGO_POOL_MAX}}
    else:
        settings["CONN_MAX_AGE"] = 60
    return settings


DATABASES = {"default": _default()}
INSTALLED_APPS = [
    "tests.testapp",
    # Its tasks module is found by app.autodiscover_tasks(), through the fix-up.
    "tests.integrations.celery_project",
    # The system checks refuse Django's pool under the bridge's (E003): the
    # integration lends such an alias request-like handling instead.
    *(["async_dbbridge"] if VARIANT == "bridge" and not DJANGO_POOL else []),
]
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_DBBRIDGE: dict[str, Any] = {"POOL_SIZE": int(os.environ.get("CELERY_TEST_POOL_SIZE", "1"))}
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"async_dbbridge": {"handlers": ["stderr"], "level": "WARNING"}},
}
