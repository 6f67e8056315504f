"""Settings for the project ``bench_asgi.py`` serves; every choice comes from the environment.

``BENCH_MODE`` picks what is measured (the harness sets it for each server):

* ``stock0`` — Django's own ASGI handler, ``CONN_MAX_AGE=0``: a connection per request;
* ``stock60`` — Django's own handler, ``CONN_MAX_AGE=60``: each request's thread
  dies with its connection still open (stranded until garbage collection);
* ``pool`` — Django's own handler with psycopg's pool (PostgreSQL only), which
  Django requires to run with ``CONN_MAX_AGE=0``;
* ``wrapper`` — ``async_dbbridge.asgi``: request threads and the library's
  connection pool (``POOL_SIZE``, ``MAX_WORKERS``: ``BENCH_POOL_SIZE``, 8),
  ``CONN_MAX_AGE=60``; ``BENCH_HOLD`` / ``BENCH_POOL_TIMEOUT`` set ``HOLD`` /
  ``POOL_TIMEOUT`` (unset: the library's defaults).

``BENCH_POOL_SIZE`` also sizes psycopg's pool in ``pool`` mode, so the two
pools are compared at the same size.

The database: ``BENCH_BACKEND`` (postgresql, mysql, sqlite), ``BENCH_DB_NAME``
(the database, or the SQLite file), ``BENCH_DB_USER`` / ``BENCH_DB_PASSWORD``
(the role the servers connect as: the harness creates one whose sessions the
server caps, so that stock Django's stranded connections cannot take every
slot of a shared server), and the usual ``PGHOST``/``PGPORT``,
``MYSQL_HOST``/``MYSQL_PORT``. The alias ``admin`` (``BENCH_ADMIN_USER``,
default ``postgres`` / ``root``) is only for the harness: it creates the
database and counts sessions; the servers never open it.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks._common import databases_setting, server_logging

MODES = ("stock0", "stock60", "pool", "wrapper")

BENCH_MODE = os.environ.get("BENCH_MODE", "wrapper")
if BENCH_MODE not in MODES:
    raise RuntimeError(f"BENCH_MODE must be one of {', '.join(MODES)}, not {BENCH_MODE!r}")
BACKEND = os.environ.get("BENCH_BACKEND", "postgresql")
DB_NAME = os.environ.get("BENCH_DB_NAME", "dbbridge_bench_asgi")

POOL_SIZE = int(os.environ.get("BENCH_POOL_SIZE", "8"))

# The pool requires CONN_MAX_AGE=0 (Django refuses persistent connections with
# it): closing a connection gives it back to the pool.
CONN_MAX_AGE = 0 if BENCH_MODE in ("stock0", "pool") else 60


DATABASES = databases_setting(
    BACKEND,
    DB_NAME,
    CONN_MAX_AGE,
    pool_size=POOL_SIZE if BENCH_MODE == "pool" else None,
    pool_needs="BENCH_MODE=pool",
)

INSTALLED_APPS = ["async_dbbridge", "benchmarks.asgi_project"]
# No middleware: every mode runs the same code around the one query, and a
# sync-only middleware would add a thread hop that is not what is compared.
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "benchmarks.asgi_project.urls"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
DEBUG = False
SECRET_KEY = "benchmarks-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

ASYNC_DBBRIDGE: dict[str, Any] = {
    # The bridge's workers (db_call) and the pool: as many threads as
    # connections, the library's own default pairing (POOL_SIZE = MAX_WORKERS),
    # and the same size as psycopg's pool in the "pool" mode.
    "MAX_WORKERS": POOL_SIZE,
    "POOL_SIZE": POOL_SIZE,
}
# Unset: the library's defaults, which is what the benchmark measures unless told otherwise.
if "BENCH_HOLD" in os.environ:
    ASYNC_DBBRIDGE["HOLD"] = os.environ["BENCH_HOLD"]
if "BENCH_POOL_TIMEOUT" in os.environ:
    ASYNC_DBBRIDGE["POOL_TIMEOUT"] = float(os.environ["BENCH_POOL_TIMEOUT"])
if "BENCH_CPU_AFFINITY" in os.environ:
    # "auto" or a CPU number; anything else reaches the library, which names the error.
    affinity = os.environ["BENCH_CPU_AFFINITY"]
    ASYNC_DBBRIDGE["CPU_AFFINITY"] = int(affinity) if affinity.isdigit() else affinity

# Errors (stock60 runs out of connections) go to stderr once each, without
# the traceback: see server_logging.
LOGGING: dict[str, Any] = server_logging()
