"""Settings for ``tests.scale_project``, served by real servers in subprocesses.

Everything a scale test varies comes from the environment, so one settings
module serves a direct PostgreSQL, PgBouncer, a primary with a streaming
replica, and app hosts in network namespaces:

- ``SCALE_DB_NAME``, ``SCALE_DB_HOST``, ``SCALE_DB_PORT``: the ``default`` alias
  (the primary, or the PgBouncer in front of it);
- ``SCALE_REPLICA_PORT``: adds the ``replica`` alias (same host) and the router
  that sends reads there;
- ``SCALE_POOL_SIZE``, ``SCALE_PROCESSES``, ``SCALE_POOLER``: the bridge's settings.
"""

from __future__ import annotations

import os
from typing import Any

_env = os.environ


def _database(port: str) -> dict[str, Any]:
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _env["SCALE_DB_NAME"],
        "USER": _env.get("PGUSER", "postgres"),
        "PASSWORD": _env.get("PGPASSWORD", ""),
        "HOST": _env.get("SCALE_DB_HOST", "127.0.0.1"),
        "PORT": port,
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
        # Django's advice for transaction pooling: .iterator() without a named cursor.
        "DISABLE_SERVER_SIDE_CURSORS": _env.get("SCALE_SERVER_SIDE_CURSORS", "off") == "off",
        "OPTIONS": {"connect_timeout": 5, "application_name": "dbbridge-scale"},
    }


DATABASES = {"default": _database(_env["SCALE_DB_PORT"])}
DATABASE_ROUTERS: list[str] = []
if _env.get("SCALE_REPLICA_PORT"):
    DATABASES["replica"] = _database(_env["SCALE_REPLICA_PORT"])
    DATABASE_ROUTERS = ["tests.scale_project.routers.PrimaryReplicaRouter"]

INSTALLED_APPS = ["async_dbbridge", "tests.testapp"]
MIDDLEWARE = ["tests.scale_project.middleware.DatabaseUnavailableMiddleware"]
ROOT_URLCONF = "tests.scale_project.urls"
ALLOWED_HOSTS = ["*"]
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

ASYNC_DBBRIDGE: dict[str, Any] = {
    "MAX_WORKERS": 4,
    "POOL_SIZE": int(_env.get("SCALE_POOL_SIZE", "4")),
    "POOL_TIMEOUT": 10.0,
}
if _env.get("SCALE_PROCESSES"):
    ASYNC_DBBRIDGE["PROCESSES"] = int(_env["SCALE_PROCESSES"])
if _env.get("SCALE_POOLER"):
    ASYNC_DBBRIDGE["POOLERS"] = {"default": _env["SCALE_POOLER"]}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "async_dbbridge": {"handlers": ["stderr"], "level": "INFO"},
        "django.request": {"handlers": ["stderr"], "level": "ERROR"},
    },
}
