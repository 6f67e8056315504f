"""Settings for serving ``tests.pool_project``.

The in-process tests apply :data:`OVERRIDES` on top of ``tests.settings`` with
pytest-django's ``settings`` fixture.
"""

from __future__ import annotations

from typing import Any

from tests.settings import *  # noqa: F403

ROOT_URLCONF = "tests.pool_project.urls"
# No middleware by default: under a sync-only middleware, an async view's
# sync_to_async calls run nested inside the middleware's one call on the
# request thread, so the connection is given back only when that call ends.
# The tests that need give-back between an async view's calls must not have one.
MIDDLEWARE: list[str] = []
#: The thread-local test adds it.
REQUEST_LOCAL_MIDDLEWARE = "tests.pool_project.middleware.RequestLocalMiddleware"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

OVERRIDES: dict[str, Any] = {
    "ROOT_URLCONF": ROOT_URLCONF,
    "MIDDLEWARE": MIDDLEWARE,
    "ALLOWED_HOSTS": ALLOWED_HOSTS,
}
