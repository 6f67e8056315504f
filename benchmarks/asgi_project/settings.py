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


def _database(*, admin: bool) -> dict[str, Any]:
    if BACKEND == "sqlite":
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DB_NAME,
            "CONN_MAX_AGE": CONN_MAX_AGE,
            "OPTIONS": {"timeout": 20},
        }
    if BACKEND == "postgresql":
        default_user = os.environ.get("PGUSER", "postgres")
        database: dict[str, Any] = {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
        admin_password = os.environ.get("PGPASSWORD", "")
    elif BACKEND == "mysql":
        default_user = os.environ.get("MYSQL_USER", "root")
        database = {
            "ENGINE": "django.db.backends.mysql",
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
        }
        admin_password = os.environ.get("MYSQL_PASSWORD", "")
    else:
        raise RuntimeError(f"BENCH_BACKEND must be sqlite, postgresql or mysql, not {BACKEND!r}")
    database["NAME"] = DB_NAME
    if admin:
        database["USER"] = os.environ.get("BENCH_ADMIN_USER", default_user)
        database["PASSWORD"] = os.environ.get("BENCH_ADMIN_PASSWORD", admin_password)
        return database
    database["USER"] = os.environ.get("BENCH_DB_USER", default_user)
    database["PASSWORD"] = os.environ.get("BENCH_DB_PASSWORD", admin_password)
    database["CONN_MAX_AGE"] = CONN_MAX_AGE
    if BENCH_MODE == "pool":
        if BACKEND != "postgresql":
            raise RuntimeError("BENCH_MODE=pool needs BENCH_BACKEND=postgresql")
        database["OPTIONS"] = {"pool": {"min_size": POOL_SIZE, "max_size": POOL_SIZE}}
    return database


DATABASES = {"default": _database(admin=False)}
if BACKEND != "sqlite":
    DATABASES["admin"] = _database(admin=True)

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

# Errors (stock60 runs out of connections) go to stderr once each, without
# the traceback: the harness counts them, and a traceback per failed request
# would make the server spend its time formatting them.
LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"one_line": {"()": "benchmarks.asgi_project.log.OneLineErrors"}},
    "formatters": {"short": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "short",
            "filters": ["one_line"],
        }
    },
    "loggers": {
        "django.request": {"handlers": ["stderr"], "level": "ERROR", "propagate": False},
        "async_dbbridge": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}
