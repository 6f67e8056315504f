"""Settings for the demo project.

The database comes from ``DATABASE_URL`` (parsed by dj-database-url); without
it, an SQLite file next to ``manage.py``::

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/dbbridge_demo
    DATABASE_URL=mysql://root@127.0.0.1:3306/dbbridge_demo

Persistent connections are on (``CONN_MAX_AGE=60`` with health checks), the
setting that strands a connection per request under stock Django's ASGI
handler and that async_dbbridge makes safe.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-a-secret")
# Off by default: with DEBUG on, Django keeps every query of every connection
# in memory, which skews a demo meant to be put under load.
DEBUG = os.environ.get("DJANGO_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "async_dbbridge",
    "shop",
]

# Only middleware that is async-capable: a sync-only middleware would push
# every request through a thread and hide the difference between the views.
# No CSRF middleware: the only write is a JSON API endpoint (POST /orders)
# meant to be called with curl; the demo has no sessions or cookies.
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
]

ROOT_URLCONF = "demo_asgi.urls"
ASGI_APPLICATION = "demo_asgi.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": []},
    },
]

_default_db: dict[str, Any] = dict(
    dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=int(os.environ.get("CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
)
_options: dict[str, Any] = _default_db.setdefault("OPTIONS", {})
if _default_db["ENGINE"] == "django.db.backends.sqlite3":
    # Several threads write at once (bridge workers, request threads): IMMEDIATE takes
    # the write lock at BEGIN, so a transaction never fails halfway on
    # "database is locked", and the timeout makes writers queue instead.
    # Not WAL: its connections hold a lock on the file for their whole life,
    # and SQLite then defers closing the file of a closed connection, so the
    # open-file count /stats reports as SQLite's "server sessions" would lag.
    _options.setdefault("transaction_mode", "IMMEDIATE")
    _options.setdefault("timeout", 20)
elif _default_db["ENGINE"] == "django.db.backends.mysql":
    _options.setdefault("charset", "utf8mb4")

DATABASES = {"default": _default_db}

# 8 bridge threads, and a pool of 4 connections per alias: small, so that the
# dashboard's burst shows requests waiting for a connection, and a 503 (with
# Retry-After) for those that waited longer than POOL_TIMEOUT.
ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": 4, "POOL_TIMEOUT": 1.0}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = False

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # The bridge logs a warning when a call leaves a transaction open or when
    # cleanup fails: exactly what a demo should show.
    "loggers": {"async_dbbridge": {"handlers": ["console"], "level": "INFO"}},
}
