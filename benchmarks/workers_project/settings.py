"""Settings of a task worker ``bench_workers.py`` measures, and of the harness itself.

The database is the one ``bench_workers.py`` creates, holding the test app's
table (``tests.testapp``'s ``Item``, ten rows); the environment says the rest:

* ``BENCH_BACKEND``, ``BENCH_DB_NAME``, ``BENCH_DB_USER``, ``BENCH_DB_PASSWORD``
  (``BenchDatabase.server_env()``): ``default`` is the workers' role; the alias
  ``admin`` is the harness's (it creates the database and counts sessions);
* ``BENCH_VARIANT``: ``own`` (the framework's own Django handling, without
  async_dbbridge) or ``bridge`` (its integration; ``async_dbbridge`` is then in
  ``INSTALLED_APPS``, as a project adopting it would have it);
* ``BENCH_POOL_SIZE``: ``ASYNC_DBBRIDGE["POOL_SIZE"]`` (default 1: a process
  of a prefork pool runs one task at a time).

Both variants run at the same Django settings: ``CONN_MAX_AGE=60``,
``CONN_HEALTH_CHECKS=True``.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks._common import databases_setting, server_logging

VARIANT = os.environ.get("BENCH_VARIANT", "bridge")
if VARIANT not in ("own", "bridge"):
    raise RuntimeError(f"BENCH_VARIANT must be 'own' or 'bridge', not {VARIANT!r}")
BACKEND = os.environ.get("BENCH_BACKEND", "postgresql")

DATABASES = databases_setting(
    BACKEND,
    os.environ.get("BENCH_DB_NAME", "dbbridge_bench_workers"),
    60,
    pool_size=None,
    pool_needs="",
)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

INSTALLED_APPS = ["tests.testapp", *(["async_dbbridge"] if VARIANT == "bridge" else [])]
SECRET_KEY = "benchmarks-only-not-secret"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_DBBRIDGE: dict[str, Any] = {"POOL_SIZE": int(os.environ.get("BENCH_POOL_SIZE", "1"))}
LOGGING: dict[str, Any] = server_logging()
