"""A backend name and a database name, as a Django ``DATABASES`` entry.

One place for the test settings and the benchmarks, which read the same
environment variables: ``PGHOST``, ``PGPORT``, ``PGUSER``, ``PGPASSWORD`` and
``MYSQL_HOST``, ``MYSQL_PORT``, ``MYSQL_USER``, ``MYSQL_PASSWORD``.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

BACKENDS = ("sqlite", "postgresql", "mysql")


def sqlite_file(name: str) -> str:
    """A file per process, never ``:memory:``: in-memory SQLite ignores close(),
    so cleanup could not be observed (nor counted as open descriptors)."""
    return os.path.join(tempfile.gettempdir(), f"{name}-{os.getpid()}.sqlite3")


def database(backend: str, name: str) -> dict[str, Any]:
    """The settings for database ``name`` on ``backend`` (a fresh dict to extend)."""
    if backend == "sqlite":
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": sqlite_file(name)}
    if backend == "postgresql":
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
    if backend == "mysql":
        return {
            "ENGINE": "django.db.backends.mysql",
            "NAME": name,
            "USER": os.environ.get("MYSQL_USER", "root"),
            "PASSWORD": os.environ.get("MYSQL_PASSWORD", ""),
            "HOST": os.environ.get("MYSQL_HOST", "127.0.0.1"),
            "PORT": os.environ.get("MYSQL_PORT", "3306"),
            "OPTIONS": {"charset": "utf8mb4"},
        }
    raise ValueError(f"the backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
