"""Settings for Django's own ``tests/runtests.py`` with the bridge's wrapper in place.

``runtests.py --settings=tests.peers.django_settings``; the backend comes from
``DB_BACKEND`` (sqlite, postgresql, mysql) as in ``tests/settings.py``. Like
Django's ``test_sqlite.py`` otherwise, plus the test runner that puts
``async_dbbridge.asgi.get_asgi_application`` in place.
"""

from __future__ import annotations

import os
from typing import Any

from tests.dbconfig import database

BACKEND = os.environ.get("DB_BACKEND", "sqlite")


def _database(name: str) -> dict[str, Any]:
    settings = database(BACKEND, f"peers_{name}")
    if BACKEND == "sqlite":
        # File-backed, as in the project's tests: in-memory SQLite ignores
        # close(), so the bridge's cleanup would go unexercised.
        settings["TEST"] = {"NAME": settings["NAME"].replace(".sqlite3", "-test.sqlite3")}
        return settings
    # With the pid: concurrent runs on one server must not drop each other's databases.
    settings["TEST"] = {"NAME": f"test_peers_{name}_{os.getpid()}"}
    if BACKEND == "mysql":
        settings["TEST"]["CHARSET"] = "utf8mb4"
    return settings


DATABASES = {"default": _database("default"), "other": _database("other")}

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False

TEST_RUNNER = "tests.peers.django_runner.PeerTestRunner"
