"""The workloads' views, as a logged-in project's views would be written.

Every view but ``io_view`` starts by checking the user, which is what makes
the session and auth middleware touch the database: ``SessionMiddleware`` and
``AuthenticationMiddleware`` only attach lazy objects, and the first look at
``request.user`` (or ``await request.auser()``) loads the session row, then the
user row. ``io_view`` is workload a, "no database": the same middleware runs
around it, but nothing reads the session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os

from django.db import connection, connections
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden, JsonResponse

from .apps import connects
from .models import Item

#: Seconds of I/O the views await, and of the slow query (workload d).
IO_SECONDS = float(os.environ.get("BENCH_IO_SECONDS", "0.2"))
SHORT_IO_SECONDS = float(os.environ.get("BENCH_SHORT_IO_SECONDS", "0.1"))
SLOW_QUERY_SECONDS = float(os.environ.get("BENCH_SLOW_QUERY_SECONDS", "0.05"))

_FORBIDDEN = "not logged in: the request's session cookie did not load a user"


async def io_view(request: HttpRequest) -> HttpResponse:
    """Workload a: an async view awaiting I/O, no database."""
    await asyncio.sleep(IO_SECONDS)
    return HttpResponse("ok")


async def query_io_query(request: HttpRequest) -> HttpResponse:
    """Workload b: a query, I/O, a query, on the async ORM."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponseForbidden(_FORBIDDEN)
    item = await Item.objects.aget(pk=1)
    await asyncio.sleep(SHORT_IO_SECONDS)
    count = await Item.objects.acount()
    return HttpResponse(f"{item.name} of {count}")


def one_query_sync(request: HttpRequest) -> HttpResponse:
    """Workload c, sync: one query of the view's own."""
    if not request.user.is_authenticated:
        return HttpResponseForbidden(_FORBIDDEN)
    return HttpResponse(Item.objects.get(pk=1).name)


async def one_query_async(request: HttpRequest) -> HttpResponse:
    """Workload c, async: one query of the view's own, on the async ORM."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponseForbidden(_FORBIDDEN)
    item = await Item.objects.aget(pk=1)
    return HttpResponse(item.name)


def slow_query(request: HttpRequest) -> HttpResponse:
    """Workload d: a sync view whose query takes 50 ms on the server."""
    if not request.user.is_authenticated:
        return HttpResponseForbidden(_FORBIDDEN)
    if connection.vendor == "postgresql":
        sql = "SELECT pg_sleep(%s)"
    elif connection.vendor == "mysql":
        sql = "SELECT SLEEP(%s)"
    else:
        raise RuntimeError(f"workload d needs PostgreSQL or MariaDB, not {connection.vendor}")
    with connection.cursor() as cursor:
        cursor.execute(sql, [SLOW_QUERY_SECONDS])
        cursor.fetchone()
    return HttpResponse("slept")


async def whoami(request: HttpRequest) -> HttpResponse:
    """The harness's check that a session cookie logs a request in (403 if it does not)."""
    user = await request.auser()
    if not user.is_authenticated:
        return HttpResponseForbidden(_FORBIDDEN)
    return HttpResponse(user.get_username())


async def ping(request: HttpRequest) -> HttpResponse:
    """Readiness: no session, no database."""
    return HttpResponse("ok")


def _is_json(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


async def stats(request: HttpRequest) -> JsonResponse:
    """What the server ran with and did, for the harness."""
    from django.conf import settings

    pool = getattr(connections["default"], "pool", None)
    bridge = None
    if "async_dbbridge" in settings.INSTALLED_APPS:
        from async_dbbridge.conf import get_settings

        # Every resolved setting (defaults included), whatever keys the
        # library has today: new keys appear here without a change.
        bridge = {
            key: value if _is_json(value) else str(value)
            for key, value in dataclasses.asdict(get_settings()).items()
        }
    import async_dbbridge

    sentry = None
    if getattr(settings, "BENCH_STACK", "") == "real":
        import sentry_sdk

        client = sentry_sdk.get_client()
        sentry = {
            "active": client.is_active(),
            "integrations": sorted(getattr(client, "integrations", {})),
            "events": len(getattr(settings, "SENTRY_EVENTS", ())),
        }
    try:
        # Under a WSGI server this view runs in async_to_sync's loop: says little.
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:
        loop = None
    return JsonResponse(
        {
            "variant": os.environ.get("BENCH_VARIANT", ""),
            # Which build the server imported: --wrapper-src can point at another checkout.
            "library": {"version": async_dbbridge.__version__, "file": async_dbbridge.__file__},
            "conn_max_age": connections["default"].settings_dict["CONN_MAX_AGE"],
            "connects": connects(),
            "bridge": bridge,
            "pool": pool.get_stats() if pool is not None else None,
            "stack": getattr(settings, "BENCH_STACK", None),
            "middleware": list(settings.MIDDLEWARE),
            "loop": loop,
            "sentry": sentry,
        }
    )
