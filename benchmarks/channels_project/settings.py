"""Settings for the project ``_workers_channels.py`` serves with uvicorn.

From the environment the harness sets: ``BENCH_VARIANT`` (``own``: Channels'
consumer and Django's ASGI handler; ``bridge``: the integration's consumer,
HTTP and lifespan through ``async_dbbridge.asgi``), and the database as in
``benchmarks/_common.py`` (``BENCH_BACKEND``, ``BENCH_DB_NAME``,
``BENCH_DB_USER``, ``BENCH_DB_PASSWORD``). Both variants run at the same
Django settings: ``CONN_MAX_AGE=60``, ``CONN_HEALTH_CHECKS=True``.
"""

from __future__ import annotations

import os

from benchmarks._common import databases_setting

VARIANTS = ("own", "bridge")

BENCH_VARIANT = os.environ.get("BENCH_VARIANT", "bridge")
if BENCH_VARIANT not in VARIANTS:
    raise RuntimeError(f"BENCH_VARIANT must be one of {', '.join(VARIANTS)}, not {BENCH_VARIANT!r}")

#: The pool of the bridge variant, and its threads: 4 connections per process.
POOL_SIZE = 4

SECRET_KEY = "benchmarks-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "benchmarks.channels_project.urls"
USE_TZ = True

DATABASES = databases_setting(
    os.environ.get("BENCH_BACKEND", "postgresql"),
    os.environ.get("BENCH_DB_NAME", "dbbridge_bench_channels"),
    60,
    pool_size=None,
    pool_needs="",
)
# The servers never open "admin" (the harness's alias): only "default" is theirs.
DATABASES.pop("admin", None)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

ASYNC_DBBRIDGE = {"MAX_WORKERS": POOL_SIZE, "POOL_SIZE": POOL_SIZE}
