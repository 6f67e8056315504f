"""The application: Channels' router, set up as each variant's docs say.

``own``: Channels' tutorial's ``asgi.py`` (Django's handler for HTTP, no
lifespan: run it with ``--lifespan off``). ``bridge``: the integration's
page's (``async_dbbridge.asgi`` for HTTP and lifespan, whose shutdown closes
the pool).
"""

from __future__ import annotations

import os
from typing import Any, cast

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "benchmarks.channels_project.settings")


def _application() -> Any:
    from benchmarks._common import library_first

    library_first()
    own = os.environ.get("BENCH_VARIANT", "bridge") == "own"
    # Django's (or the wrapper's) get_asgi_application() first: it sets Django
    # up, which the consumers' modules need.
    if own:
        from django.core.asgi import get_asgi_application

        django_app: Any = get_asgi_application()
    else:
        from async_dbbridge.asgi import get_asgi_application as bridged_asgi_application

        django_app = bridged_asgi_application()
    from channels.routing import ProtocolTypeRouter, URLRouter
    from django.urls import path

    from benchmarks.channels_project.consumers import BridgeConsumer, OwnConsumer

    consumer = OwnConsumer if own else BridgeConsumer
    # Any: django-stubs types path()'s view as an HTTP view, not an ASGI app.
    websocket: list[Any] = [path("ws/", cast(Any, consumer.as_asgi()))]
    routes: dict[str, Any] = {"http": django_app, "websocket": URLRouter(websocket)}
    if not own:
        routes["lifespan"] = django_app
    return ProtocolTypeRouter(routes)


application = _application()
