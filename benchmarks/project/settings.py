"""Settings for the project ``bench_project.py`` serves: ``startproject``'s, plus one app.

Everything ``startproject`` (Django 5.2) generates is kept as generated —
INSTALLED_APPS, MIDDLEWARE, TEMPLATES, password validators, i18n — except
DEBUG (off, as in production), ALLOWED_HOSTS and DATABASES. What is measured
comes from the environment, which the harness sets for each server:

* ``BENCH_VARIANT`` — ``stock``: Django's own ASGI handler, ``CONN_MAX_AGE=0``;
  ``djpool``: the same with psycopg's pool (PostgreSQL only; Django requires
  ``CONN_MAX_AGE=0`` with it), ``min_size = max_size = BENCH_POOL_SIZE``;
  ``wrapper``: ``async_dbbridge.asgi``, ``CONN_MAX_AGE=60``, ``async_dbbridge``
  in INSTALLED_APPS, and ``ASYNC_DBBRIDGE`` read from ``BENCH_ASYNC_DBBRIDGE``
  (a JSON object, passed through as is, so a new library setting needs no
  change here); ``wsgi``: Django's WSGI handler (``wsgi.py``, under gunicorn),
  ``CONN_MAX_AGE=60``; ``a2wsgi``: the same WSGI handler under
  ``a2wsgi.WSGIMiddleware`` (``asgi.py``), ``CONN_MAX_AGE=60``.
* ``BENCH_STACK`` — ``startproject`` (the default): startproject's middleware
  as generated; ``real``: what real projects put around it, where their docs
  say to — django-cors-headers first (``CORS_ALLOWED_ORIGINS``; the harness's
  requests carry a matching ``Origin``, so it adds its headers to every
  response), WhiteNoise right after ``SecurityMiddleware`` (serving
  ``STATIC_ROOT``, ``BENCH_STATIC_ROOT``, which the harness fills with
  ``collectstatic``), and Sentry's ``DjangoIntegration`` (``sentry_sdk.init``
  with a DSN on 127.0.0.1:9, never reached while nothing fails: events are
  counted by ``before_send`` and shown by ``/stats/``). Every variant alike.
* The database: ``BENCH_BACKEND`` (postgresql, mysql, sqlite),
  ``BENCH_DB_NAME`` (the database, or the SQLite file), ``BENCH_DB_USER`` /
  ``BENCH_DB_PASSWORD`` (the role the servers connect as, whose sessions the
  database server caps), and the usual ``PGHOST``/``PGPORT``,
  ``MYSQL_HOST``/``MYSQL_PORT``. The alias ``admin`` (``BENCH_ADMIN_USER``,
  default ``postgres`` / ``root``) is only for the harness: it creates the
  database and counts sessions; the servers never open it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from benchmarks._common import databases_setting, server_logging

VARIANTS = ("stock", "djpool", "wrapper", "wsgi", "a2wsgi")
STACKS = ("startproject", "real")

BENCH_VARIANT = os.environ.get("BENCH_VARIANT", "wrapper")
if BENCH_VARIANT not in VARIANTS:
    raise RuntimeError(f"BENCH_VARIANT must be one of {', '.join(VARIANTS)}, not {BENCH_VARIANT!r}")
BENCH_STACK = os.environ.get("BENCH_STACK", "startproject")
if BENCH_STACK not in STACKS:
    raise RuntimeError(f"BENCH_STACK must be one of {', '.join(STACKS)}, not {BENCH_STACK!r}")
BACKEND = os.environ.get("BENCH_BACKEND", "postgresql")
DB_NAME = os.environ.get("BENCH_DB_NAME", "dbbridge_bench_project")

BASE_DIR = Path(__file__).resolve().parent.parent

# The benchmark's own, never deployed.
SECRET_KEY = "benchmarks-only-not-secret"

DEBUG = False

ALLOWED_HOSTS = ["127.0.0.1", "localhost"]


# Application definition

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "benchmarks.project.benchapp",
]
if BENCH_VARIANT == "wrapper":
    # What a project adopting the wrapper adds (it registers the system checks).
    INSTALLED_APPS.append("async_dbbridge")

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

if BENCH_STACK == "real":
    INSTALLED_APPS.append("corsheaders")
    # django-cors-headers: "as high as possible"; WhiteNoise: "directly after
    # SecurityMiddleware" (their installation docs).
    MIDDLEWARE.insert(0, "corsheaders.middleware.CorsMiddleware")
    MIDDLEWARE.insert(
        MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,
        "whitenoise.middleware.WhiteNoiseMiddleware",
    )
    #: The Origin the harness's requests carry (bench_project.CORS_ORIGIN).
    CORS_ALLOWED_ORIGINS = ["http://app.bench.test"]
    CORS_ALLOW_CREDENTIALS = True

ROOT_URLCONF = "benchmarks.project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


# Database

# The pool requires CONN_MAX_AGE=0 (Django refuses persistent connections with
# it): closing a connection gives it back to the pool. The wrapper's whole point
# is to make persistent connections safe, so it runs with them; so do the WSGI
# variants, as a WSGI deployment would (one connection per thread).
CONN_MAX_AGE = 60 if BENCH_VARIANT in ("wrapper", "wsgi", "a2wsgi") else 0


DATABASES = databases_setting(
    BACKEND,
    DB_NAME,
    CONN_MAX_AGE,
    pool_size=int(os.environ.get("BENCH_POOL_SIZE", "8")) if BENCH_VARIANT == "djpool" else None,
    pool_needs="BENCH_VARIANT=djpool",
)


# Every variant alike: bench_project.py --health-checks.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = os.environ.get("BENCH_HEALTH_CHECKS") == "1"


def _bridge_settings() -> dict[str, Any]:
    raw = os.environ.get("BENCH_ASYNC_DBBRIDGE", "{}")
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise RuntimeError(f"BENCH_ASYNC_DBBRIDGE is not JSON: {exc}: {raw!r}") from exc
    if not isinstance(value, dict):
        raise RuntimeError(f"BENCH_ASYNC_DBBRIDGE must be a JSON object, not {raw!r}")
    return value


# The library validates the keys itself (an unknown one stops the server with
# an error naming it), so whatever the harness passes is what runs.
ASYNC_DBBRIDGE: dict[str, Any] = _bridge_settings()


# Password validation

AUTH_PASSWORD_VALIDATORS = [
    {
        "NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator",
    },
    {
        "NAME": "django.contrib.auth.password_validation.MinimumLengthValidator",
    },
    {
        "NAME": "django.contrib.auth.password_validation.CommonPasswordValidator",
    },
    {
        "NAME": "django.contrib.auth.password_validation.NumericPasswordValidator",
    },
]


# Internationalization

LANGUAGE_CODE = "en-us"

TIME_ZONE = "UTC"

USE_I18N = True

USE_TZ = True


# Static files (CSS, JavaScript, Images)

STATIC_URL = "static/"

if BENCH_STACK == "real":
    # collectstatic's output (the harness runs it once per run); WhiteNoise serves it.
    STATIC_ROOT = os.environ.get("BENCH_STATIC_ROOT") or None

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Errors (stock Django out of connections) go to stderr once each, without the
# traceback: the harness counts them ("too many clients"); see server_logging.
LOGGING: dict[str, Any] = server_logging()
# The wrapper's startup line (INFO: what ONE_HOP and FUSE_MIDDLEWARE applied to, or
# why not), for the report; the library logs nothing else at INFO but its stop line.
LOGGING["loggers"]["async_dbbridge"]["level"] = "INFO"


#: Events Sentry was handed to send (``/stats/`` shows them): none while nothing fails.
SENTRY_EVENTS: list[str] = []


def _count_event(event: Any, hint: Any) -> Any:
    SENTRY_EVENTS.append(str(event.get("level", "?")))
    return event


# The servers only: the harness reads these settings too, and reports nothing.
if BENCH_STACK == "real" and os.environ.get("BENCH_ROLE") != "harness":
    import sentry_sdk
    from sentry_sdk.integrations.django import DjangoIntegration

    sentry_sdk.init(
        # Port 9 (discard) on this machine: nothing listens, nothing leaves it.
        dsn="http://public@127.0.0.1:9/1",
        integrations=[DjangoIntegration()],
        traces_sample_rate=0,
        before_send=_count_event,
    )
