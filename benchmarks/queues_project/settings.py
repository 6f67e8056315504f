"""Settings of the Dramatiq, Huey and RQ workers ``benchmarks/_workers_*.py`` measure.

The database is the benchmark database (the test app's table, ten rows); the
environment says the rest: ``BENCH_BACKEND``, ``BENCH_DB_NAME``,
``BENCH_DB_USER``, ``BENCH_DB_PASSWORD`` (``BenchDatabase.server_env()``: the
workers' role is ``default``, ``admin`` the harness's); ``BENCH_VARIANT``
(``own``: the framework's own Django handling, async_dbbridge not even
imported; ``bridge``: its integration, the library in ``INSTALLED_APPS``);
``BENCH_POOL_SIZE`` (``ASYNC_DBBRIDGE["POOL_SIZE"]``); ``BENCH_QUEUE`` (the
round's queue, Huey's instance name).

Both variants run at the same Django settings: ``CONN_MAX_AGE=60``,
``CONN_HEALTH_CHECKS=True``.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks._common import databases_setting, server_logging

VARIANT = os.environ.get("BENCH_VARIANT", "bridge").removesuffix("-simple")
if VARIANT not in ("own", "bridge"):
    raise RuntimeError(f"BENCH_VARIANT must be 'own' or 'bridge', not {VARIANT!r}")
BRIDGE = VARIANT == "bridge"
BACKEND = os.environ.get("BENCH_BACKEND", "postgresql")

DATABASES = databases_setting(
    BACKEND,
    os.environ.get("BENCH_DB_NAME", "dbbridge_bench_workers"),
    60,
    pool_size=None,
    pool_needs="",
)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

INSTALLED_APPS = [
    "tests.testapp",
    # djhuey builds its Huey instance (settings.HUEY) when imported: Huey's workers only.
    *(["huey.contrib.djhuey"] if os.environ.get("BENCH_FRAMEWORK") == "huey" else []),
    *(["async_dbbridge"] if BRIDGE else []),
]
SECRET_KEY = "benchmarks-only-not-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_DBBRIDGE: dict[str, Any] = {"POOL_SIZE": int(os.environ.get("BENCH_POOL_SIZE", "2"))}
LOGGING: dict[str, Any] = server_logging()
HUEY: dict[str, Any] = {
    "huey_class": "huey.RedisHuey",
    "name": os.environ.get("BENCH_QUEUE", "dbbridge-bench"),
    "immediate": False,
    "connection": {"host": "127.0.0.1", "port": 6379, "db": 15},
}
