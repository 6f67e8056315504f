"""Three ways a request runs one query, and a ping that runs none (readiness)."""

from __future__ import annotations

import threading

from django.http import HttpRequest, HttpResponse, JsonResponse

import async_dbbridge
from async_dbbridge import db_call
from async_dbbridge.conf import get_settings

from .models import Item


class _Served:
    """Requests the three query views began (from request threads and the loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self) -> None:
        with self._lock:
            self.count += 1


_served = _Served()


def _first_name() -> str:
    item = Item.objects.filter(pk=1).first()
    return item.name if item is not None else "-"


def sync_view(request: HttpRequest) -> HttpResponse:
    """A sync view: Django runs it on asgiref's thread (stock) or a request thread."""
    _served.add()
    return HttpResponse(_first_name())


async def async_orm_view(request: HttpRequest) -> HttpResponse:
    """The async ORM: a thread-sensitive ``sync_to_async`` hop, like the sync view's."""
    _served.add()
    item = await Item.objects.filter(pk=1).afirst()
    return HttpResponse(item.name if item is not None else "-")


async def db_call_view(request: HttpRequest) -> HttpResponse:
    """``db_call``: the query runs on the bridge's worker threads, not the request's."""
    _served.add()
    return HttpResponse(await db_call(_first_name))


async def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


async def stats(request: HttpRequest) -> JsonResponse:
    """What the server did, for the harness: connections opened, the pools and request threads."""
    from django.db import connections

    from . import asgi
    from .apps import connects

    # Django's psycopg pool ("pool" mode only): its own counters.
    pool = getattr(connections["default"], "pool", None)
    bridge = get_settings()
    return JsonResponse(
        {
            # What the wrapper really ran with (the library's defaults included).
            "settings": {
                "max_workers": bridge.max_workers,
                "pool_size": bridge.effective_pool_size,
                "pool_timeout": bridge.pool_timeout,
                "hold": bridge.hold,
            },
            # The wrapper's mode ("request-threads" or "per-request"); None for
            # Django's own handler.
            "wrapper_mode": getattr(asgi.application, "mode", None),
            "served": _served.count,
            "connects": connects(),
            # The library's pools, request threads and bridge, in every mode:
            # db_call's bridge takes its connections from the pool under stock
            # Django too.
            "dbbridge": async_dbbridge.stats().as_dict(),
            "pool": pool.get_stats() if pool is not None else None,
        }
    )
