"""Test settings: the backend comes from ``DB_BACKEND`` (sqlite, postgresql, mysql)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

BACKEND = os.environ.get("DB_BACKEND", "sqlite")

_TMP = tempfile.gettempdir()


def _database(name: str) -> dict[str, Any]:
    if BACKEND == "sqlite":
        # Files, never :memory: — in-memory SQLite ignores close(), so cleanup
        # could not be observed. One set of files per test process.
        path = os.path.join(_TMP, f"dbbridge-{name}-{os.getpid()}.sqlite3")
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": path,
            "TEST": {"NAME": path.replace(".sqlite3", "-test.sqlite3")},
        }
    # One test database per process: concurrent runs (several checkouts, or a
    # developer and CI on one machine) must not drop each other's databases.
    test = {"NAME": f"test_{name}_{os.getpid()}"}
    if BACKEND == "postgresql":
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
            "TEST": test,
        }
    if BACKEND == "mysql":
        return {
            "ENGINE": "django.db.backends.mysql",
            "NAME": name,
            "USER": os.environ.get("MYSQL_USER", "root"),
            "PASSWORD": os.environ.get("MYSQL_PASSWORD", ""),
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
            "TEST": {**test, "CHARSET": "utf8mb4"},
        }
    raise RuntimeError(f"DB_BACKEND must be sqlite, postgresql or mysql, not {BACKEND!r}")


DATABASES = {"default": _database("dbbridge"), "other": _database("dbbridge_other")}

INSTALLED_APPS = ["async_dbbridge", "tests.testapp"]
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
ASYNC_DBBRIDGE: dict[str, Any] = {"MAX_WORKERS": 8}
