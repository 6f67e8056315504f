"""Three ways a request runs one query, and a ping that runs none (readiness)."""

from __future__ import annotations

import threading

from django.http import HttpRequest, HttpResponse, JsonResponse

from async_dbbridge import db_call
from async_dbbridge.conf import get_settings

from .models import Item


class _Served:
    """Requests the three query views began (from lanes, request threads and the loop)."""

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
    """A sync view: Django runs it on the request's thread (stock) or its lane."""
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
    """What the server did, for the harness: connections opened, lane and pool counters."""
    from django.db import connections

    from . import asgi
    from .apps import connects

    lanes = getattr(asgi.application, "lanes", None)
    pool = getattr(connections["default"], "pool", None)
    bridge = get_settings()
    return JsonResponse(
        {
            # What the wrapper really ran with (the library's defaults included).
            "settings": {
                "lanes": bridge.lanes,
                "lane_full": bridge.lane_full,
                "lane_wait_timeout": bridge.lane_wait_timeout,
            },
            "served": _served.count,
            "connects": connects(),
            "lanes": lanes.stats().as_dict() if lanes is not None else None,
            "pool": pool.get_stats() if pool is not None else None,
        }
    )
