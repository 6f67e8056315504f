"""Views covering every way a request reaches the database under ASGI.

Tests steer the blocking ones through :data:`probe`: a view waits on a named
gate that the test opens, and records which thread did what.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator

from asgiref.sync import async_to_sync, sync_to_async
from django.db import transaction
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse

from async_dbbridge import db_call
from tests.testapp.models import Item


class Probe:
    """Gates and records shared by the test and the views it drives."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        # Views on request threads wait on these; the test opens them.
        self.gates: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        # Set by a view when it reaches its gate, awaited by the test.
        self.entered: defaultdict[str, threading.Event] = defaultdict(threading.Event)
        # Streaming responses wait on these, on the event loop.
        self.async_gates: dict[str, asyncio.Event] = {}
        self.threads: defaultdict[str, list[str]] = defaultdict(list)


probe = Probe()


def _thread() -> str:
    return threading.current_thread().name


def sync_query(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": Item.objects.count(), "thread": _thread()})


async def async_orm(request: HttpRequest) -> JsonResponse:
    count = await Item.objects.acount()
    return JsonResponse({"count": count})


async def db_call_view(request: HttpRequest) -> JsonResponse:
    count = await db_call(Item.objects.count)
    return JsonResponse({"count": count, "thread": await db_call(_thread)})


def atomic_write(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        item = Item.objects.create(name="e2e", value=1)
    return JsonResponse({"id": item.pk})


async def combo(request: HttpRequest) -> JsonResponse:
    """Async ORM (thread-sensitive: the request thread) and db_call (the bridge) in one request."""
    first = await Item.objects.acount()
    second = await db_call(Item.objects.count)
    exists = await Item.objects.filter(value__gte=0).aexists()
    return JsonResponse({"counts": [first, second], "exists": exists})


async def threads(request: HttpRequest) -> JsonResponse:
    """Where each kind of thread-sensitive work of the request ran."""
    names = {
        "sync_to_async": await sync_to_async(_thread)(),
        "orm": await sync_to_async(lambda: (Item.objects.count(), _thread())[1])(),
        "db_call": await db_call(_thread),
    }
    await Item.objects.acount()
    names["sync_to_async_again"] = await sync_to_async(_thread)()
    return JsonResponse(names)


def nested(request: HttpRequest) -> JsonResponse:
    """A sync view calling async code that calls back into sync code."""

    async def inner() -> tuple[int, str]:
        return await Item.objects.acount(), await sync_to_async(_thread)()

    count, thread = async_to_sync(inner)()
    return JsonResponse({"view": _thread(), "inner": thread, "count": count})


async def pure_async(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


async def default_executor(request: HttpRequest) -> JsonResponse:
    loop = asyncio.get_running_loop()
    return JsonResponse({"thread": await loop.run_in_executor(None, _thread)})


def gate(request: HttpRequest, name: str) -> JsonResponse:
    """Query (so the thread holds a connection), then wait until the test opens the gate."""
    Item.objects.count()
    probe.threads[name].append(_thread())
    probe.entered[name].set()
    if not probe.gates[name].wait(timeout=20):
        return JsonResponse({"error": "gate never opened"}, status=500)
    return JsonResponse({"thread": _thread(), "count": Item.objects.count()})


def stream(request: HttpRequest, name: str) -> StreamingHttpResponse:
    """A sync view whose async streaming body still uses the ORM after the view returned."""
    probe.threads[name].append(_thread())
    opened = probe.async_gates[name]

    async def body() -> AsyncIterator[bytes]:
        yield b"start;"
        probe.entered[name].set()
        await opened.wait()
        count = await Item.objects.acount()
        probe.threads[name].append(await sync_to_async(_thread)())
        yield f"count={count}".encode()

    return StreamingHttpResponse(body())


async def async_stream(request: HttpRequest, name: str) -> StreamingHttpResponse:
    """An async view streaming from the event loop, no sync work: takes no request thread."""
    opened = probe.async_gates[name]

    async def body() -> AsyncIterator[bytes]:
        yield b"start;"
        probe.entered[name].set()
        await opened.wait()
        yield b"end"

    return StreamingHttpResponse(body())


async def long_poll(request: HttpRequest, name: str) -> HttpResponse:
    """An async view that waits for an event before it answers: takes no request thread."""
    probe.entered[name].set()
    await probe.async_gates[name].wait()
    return HttpResponse("event")


def backend(request: HttpRequest) -> JsonResponse:
    """The server's id for this thread's session."""
    from tests.conftest import backend_id

    return JsonResponse({"backend": backend_id(), "thread": _thread()})


def leave_atomic(request: HttpRequest) -> HttpResponse:
    """A bug: the atomic block is entered and never left."""
    transaction.atomic().__enter__()
    Item.objects.create(name="leftover", value=-1)
    return HttpResponse("left open")
