"""Settings for serving ``tests.e2e_project`` (e.g. ``uvicorn`` in a subprocess).

The in-process tests apply :data:`OVERRIDES` on top of ``tests.settings``
with pytest-django's ``settings`` fixture instead.
"""

from __future__ import annotations

from typing import Any

from tests.settings import *  # noqa: F403

ROOT_URLCONF = "tests.e2e_project.urls"
MIDDLEWARE = ["tests.e2e_project.middleware.SyncQueryMiddleware"]
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

OVERRIDES: dict[str, Any] = {
    "ROOT_URLCONF": ROOT_URLCONF,
    "MIDDLEWARE": MIDDLEWARE,
    "ALLOWED_HOSTS": ALLOWED_HOSTS,
}
