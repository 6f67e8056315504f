"""Django settings for the benchmarks: a dedicated database, persistent connections.

The backend comes from ``DBBRIDGE_BENCH_BACKEND`` (sqlite, postgresql, mysql),
which ``bench_executor.py --backend`` sets before Django is configured. The
server paths use their own database, ``dbbridge_bench``, that the benchmark
creates and drops, so counting its sessions never sees the test suite's.
"""

from __future__ import annotations

import os

from tests.dbconfig import database

BACKEND = os.environ.get("DBBRIDGE_BENCH_BACKEND", "postgresql")

#: The database every path queries and whose server sessions are counted.
BENCH_DATABASE = "dbbridge_bench"

# Persistent connections, as in production: the paths differ exactly in what
# happens to a connection that outlives a call.
CONN_MAX_AGE = 60


# One file per process on SQLite, so open connections can be counted as open
# descriptors on it.
DATABASES = {"default": {**database(BACKEND, BENCH_DATABASE), "CONN_MAX_AGE": CONN_MAX_AGE}}

# The pooled db_call path: as many pooled connections as the paths' workers.
ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 8}

INSTALLED_APPS = ["tests.testapp"]
SECRET_KEY = "benchmarks-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
