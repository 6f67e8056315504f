"""The ASGI entry point: ``uvicorn demo_asgi.asgi:application`` (from ``demo_asgi/``).

async_dbbridge's wrapper around Django's ASGI handler gives each request a
long-lived lane thread for its sync work (sync views, the async ORM, request
signals), so ``CONN_MAX_AGE`` connections are reused instead of stranded, and
shuts the bridge down (closing its connections) at lifespan shutdown.
"""

from __future__ import annotations

import os

from async_dbbridge.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "demo_asgi.settings")

application = get_asgi_application()
