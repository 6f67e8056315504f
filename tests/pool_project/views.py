"""Views that hold, share or lose pooled connections on the test's command.

The test steers them through :data:`probe`: a view announces that it arrived
at a named point, then waits on the named gate until the test opens it. uvicorn
serves them in a thread of the test process, so the module global is shared.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connections, transaction
from django.db.transaction import Atomic
from django.http import HttpRequest, JsonResponse

from async_dbbridge import PoolTimeout, db_call
from tests.conftest import backend_id
from tests.testapp.models import Item

from .middleware import current

#: Seconds a view waits for its gate: a test that never opens it fails (the
#: view answers 504) instead of hanging.
GATE_TIMEOUT = 30.0


class Gate:
    """Opened once by the test; waited on by sync views (threads) and async views (loops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = False
        self._event = threading.Event()
        # Async waiters: each on the loop it runs on, woken thread-safely.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def open(self) -> None:
        with self._lock:
            self._opened = True
            waiters, self._waiters = self._waiters, []
        self._event.set()
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    def wait(self, timeout: float = GATE_TIMEOUT) -> bool:
        return self._event.wait(timeout)

    async def wait_async(self, timeout: float = GATE_TIMEOUT) -> bool:  # noqa: ASYNC109 - a polling deadline, not a cancel scope
        event = asyncio.Event()
        with self._lock:
            if self._opened:
                return True
            self._waiters.append((asyncio.get_running_loop(), event))
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Probe:
    """Gates and arrival counts shared by the test and the views it drives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.gates: defaultdict[str, Gate] = defaultdict(Gate)
            self._arrived: defaultdict[str, int] = defaultdict(int)

    def gate(self, name: str) -> Gate:
        with self._lock:
            return self.gates[name]

    def arrive(self, name: str) -> None:
        with self._changed:
            self._arrived[name] += 1
            self._changed.notify_all()

    def arrived(self, name: str) -> int:
        with self._lock:
            return self._arrived[name]

    def wait_arrived(self, name: str, n: int, timeout: float = 20.0) -> None:
        """Block the test until `n` views reached point `name`, or fail."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._arrived[name] >= n, timeout):
                raise AssertionError(
                    f"{self._arrived[name]} of {n} requests reached {name!r} within {timeout}s"
                )


probe = Probe()


def _gate_closed(name: str) -> JsonResponse:
    return JsonResponse({"error": f"gate {name!r} never opened"}, status=504)


def hold(request: HttpRequest, name: str) -> JsonResponse:
    """Hold a connection inside ``atomic()`` (it cannot be given back) until the gate opens."""
    probe.arrive(f"{name}:arrived")
    with transaction.atomic():
        backend = backend_id()
        probe.arrive(name)
        if not probe.gate(name).wait():
            return _gate_closed(name)
    return JsonResponse({"backend": backend})


def count(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": Item.objects.count(), "backend": backend_id()})


async def acount(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": await Item.objects.acount()})


def catch(request: HttpRequest) -> JsonResponse:
    """The user's own answer when no connection is free (e.g. a cached page)."""
    try:
        return JsonResponse({"count": Item.objects.count()})
    except PoolTimeout as exc:
        return JsonResponse(
            {
                "fallback": True,
                "message": str(exc),
                "alias": exc.alias,
                "max_size": exc.max_size,
                "timeout": exc.timeout,
            }
        )


def _enter_and_write(atomic: Atomic, name: str) -> int:
    atomic.__enter__()
    try:
        Item.objects.create(name=f"span-{name}", value=1)
        return backend_id()
    except BaseException as exc:
        atomic.__exit__(type(exc), exc, exc.__traceback__)
        raise


def _write_and_exit(atomic: Atomic, name: str) -> int:
    try:
        Item.objects.create(name=f"span-{name}", value=2)
        backend = backend_id()
    except BaseException as exc:
        atomic.__exit__(type(exc), exc, exc.__traceback__)
        raise
    atomic.__exit__(None, None, None)
    return backend


async def span(request: HttpRequest, name: str) -> JsonResponse:
    """One transaction over two sync calls, with the event loop in between."""
    atomic = transaction.atomic()
    first = await sync_to_async(_enter_and_write)(atomic, name)
    probe.arrive(name)
    if not await probe.gate(name).wait_async():
        # Leave the transaction: the request's end would roll it back anyway.
        await sync_to_async(atomic.__exit__)(None, None, None)
        return _gate_closed(name)
    second = await sync_to_async(_write_and_exit)(atomic, name)
    return JsonResponse({"backends": [first, second]})


async def aquery_twice(request: HttpRequest, name: str) -> JsonResponse:
    """Two async-ORM queries with the event loop in between.

    Below a sync-only middleware Django runs this view through `async_to_sync`
    from the request's thread, and its queries run on that blocked thread.
    """
    first = await Item.objects.acount()
    probe.arrive(name)
    if not await probe.gate(name).wait_async():
        return _gate_closed(name)
    second = await Item.objects.acount()
    return JsonResponse({"counts": [first, second]})


def peek(request: HttpRequest) -> JsonResponse:
    """What another request sees of the span rows, and on which session."""
    probe.arrive("peek")
    values = sorted(Item.objects.filter(name__startswith="span-").values_list("value", flat=True))
    return JsonResponse({"values": values, "backend": backend_id()})


async def whoami(request: HttpRequest, name: str) -> JsonResponse:
    """Read the middleware's thread-local after every other request has set its own."""
    probe.arrive(name)
    if not await probe.gate(name).wait_async():
        return _gate_closed(name)

    def seen() -> tuple[str, str]:
        return current.request.GET["id"], threading.current_thread().name

    seen_id, thread = await sync_to_async(seen)()
    return JsonResponse({"id": request.GET["id"], "seen": seen_id, "thread": thread})


def backend(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"backend": backend_id(), "thread": threading.current_thread().name})


# -- per-session state (what HOLD="request" is for) ----------------------------


def _set_state(value: int) -> None:
    conn = connections["default"]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute("SELECT set_config('application_name', %s, false)", [str(value)])
        elif conn.vendor == "mysql":
            cursor.execute("SET @dbbridge_state = %s", [value])
        else:
            # Per connection on SQLite; PRAGMA takes no parameters (an int).
            cursor.execute(f"PRAGMA cache_size = {int(value)}")


def _get_state() -> tuple[int, int]:
    conn = connections["default"]
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute("SELECT current_setting('application_name')")
        elif conn.vendor == "mysql":
            cursor.execute("SELECT @dbbridge_state")
        else:
            cursor.execute("PRAGMA cache_size")
        value = int(cursor.fetchone()[0])
    return value, backend_id()


async def state(request: HttpRequest, value: int) -> JsonResponse:
    """Set session state in one sync call and read it back in a later one.

    With ``?wait=<gate>`` the request waits on that gate between the two calls.
    """
    await sync_to_async(_set_state)(value)
    wait = request.GET.get("wait")
    if wait:
        probe.arrive(wait)
        if not await probe.gate(wait).wait_async():
            return _gate_closed(wait)
    seen, backend = await sync_to_async(_get_state)()
    return JsonResponse({"set": value, "seen": seen, "backend": backend})


# -- a mix of every path for the burst ----------------------------------------------


async def db_call_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": await db_call(Item.objects.count)})


def write(request: HttpRequest) -> JsonResponse:
    with transaction.atomic():
        item = Item.objects.create(name="burst", value=1)
    return JsonResponse({"id": item.pk})


async def other(request: HttpRequest) -> JsonResponse:
    def both() -> dict[str, Any]:
        return {
            "default": Item.objects.count(),
            "other": Item.objects.using("other").count(),
        }

    return JsonResponse(await sync_to_async(both)())
