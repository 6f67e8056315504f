"""Django settings for the benchmarks: a dedicated database, persistent connections.

The backend comes from ``DBBRIDGE_BENCH_BACKEND`` (sqlite, postgresql, mysql),
which ``bench_executor.py --backend`` sets before Django is configured. The
server paths use their own database, ``dbbridge_bench``, that the benchmark
creates and drops, so counting its sessions never sees the test suite's.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

BACKEND = os.environ.get("DBBRIDGE_BENCH_BACKEND", "postgresql")

#: The database every path queries and whose server sessions are counted.
BENCH_DATABASE = "dbbridge_bench"

# Persistent connections, as in production: the paths differ exactly in what
# happens to a connection that outlives a call.
CONN_MAX_AGE = 60


def _database() -> dict[str, Any]:
    if BACKEND == "sqlite":
        # A file (one per process), never :memory:, so that open connections
        # can be counted as open descriptors on it.
        path = os.path.join(tempfile.gettempdir(), f"{BENCH_DATABASE}-{os.getpid()}.sqlite3")
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": path,
            "CONN_MAX_AGE": CONN_MAX_AGE,
        }
    if BACKEND == "postgresql":
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": BENCH_DATABASE,
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "CONN_MAX_AGE": CONN_MAX_AGE,
        }
    if BACKEND == "mysql":
        return {
            "ENGINE": "django.db.backends.mysql",
            "NAME": BENCH_DATABASE,
            "USER": os.environ.get("MYSQL_USER", "root"),
            "PASSWORD": os.environ.get("MYSQL_PASSWORD", ""),
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
            "CONN_MAX_AGE": CONN_MAX_AGE,
        }
    raise RuntimeError(
        f"DBBRIDGE_BENCH_BACKEND must be sqlite, postgresql or mysql, not {BACKEND!r}"
    )


DATABASES = {"default": _database()}

INSTALLED_APPS = ["tests.testapp"]
SECRET_KEY = "benchmarks-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
