"""Test settings: the backend comes from ``DB_BACKEND`` (sqlite, postgresql, mysql)."""

from __future__ import annotations

import os
from typing import Any

from tests.dbconfig import database

BACKEND = os.environ.get("DB_BACKEND", "sqlite")


def _database(name: str) -> dict[str, Any]:
    settings = database(BACKEND, name)
    if BACKEND == "sqlite":
        settings["TEST"] = {"NAME": settings["NAME"].replace(".sqlite3", "-test.sqlite3")}
        return settings
    # One test database per process: concurrent runs (several checkouts, or a
    # developer and CI on one machine) must not drop each other's databases.
    settings["TEST"] = {"NAME": f"test_{name}_{os.getpid()}"}
    if BACKEND == "mysql":
        settings["TEST"]["CHARSET"] = "utf8mb4"
    return settings


DATABASES = {"default": _database("dbbridge"), "other": _database("dbbridge_other")}

INSTALLED_APPS = ["async_dbbridge", "tests.testapp"]
SECRET_KEY = "tests-only"
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# CLOSE_STRANDED off: the suite's controls show what stock Django strands on
# plain threads (and the leak fixture catches it); tests/test_stranded.py turns
# it on, as the default is.
ASYNC_DBBRIDGE: dict[str, Any] = {"MAX_WORKERS": 8, "CLOSE_STRANDED": False}
