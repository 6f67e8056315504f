"""The ASGI entry point: ``uvicorn demo_asgi.asgi:application`` (from ``demo_asgi/``).

async_dbbridge's wrapper around Django's ASGI handler runs each request's sync
work (sync views, the async ORM, request signals) on a reused request thread,
with connections from one bounded pool per database alias (``POOL_SIZE``), so
``CONN_MAX_AGE`` connections are reused instead of stranded; lifespan shutdown
closes them all.
"""

from __future__ import annotations

import os

from async_dbbridge.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_asgi.settings")

application = get_asgi_application()
