"""Views that read the primary, the replica (through the router), and iterate."""

from __future__ import annotations

import os

from django.db import connections
from django.http import HttpRequest, JsonResponse

from tests.testapp.models import Item


def primary(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": Item.objects.using("default").count(), "pid": os.getpid()})


def replica(request: HttpRequest) -> JsonResponse:
    # The router sends reads to the replica.
    return JsonResponse({"count": Item.objects.count(), "pid": os.getpid()})


def iterate(request: HttpRequest) -> JsonResponse:
    # Chunks of 2: several fetches per request, which a named (server-side)
    # cursor would spread over PgBouncer's server sessions.
    total = sum(item.value for item in Item.objects.using("default").iterator(chunk_size=2))
    return JsonResponse({"total": total})


async def primary_async(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": await Item.objects.using("default").acount()})


def backend(request: HttpRequest) -> JsonResponse:
    """Which server session answered (behind PgBouncer: one of its server pool)."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return JsonResponse({"backend": pid})


def slow(request: HttpRequest) -> JsonResponse:
    """A query that holds its server session a while: enough of them fill a pool."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT pg_sleep(0.05)")
    return JsonResponse({"slept": True})
