"""The Channels integration: consumers served by a real uvicorn to real websocket clients.

uvicorn runs in a thread of the test process (as in test_e2e.py), serving
Channels' `ProtocolTypeRouter`/`URLRouter` with no channel layer, so the test
reads the handlers' own measurements (how many ran at once, on which threads)
and samples the server's session count while 50 clients send their messages.
Every workload runs twice: on this module's consumers and on Channels' own,
which shows what the drop-in changes (one handler at a time on one thread,
and a session per call at `CONN_MAX_AGE=0`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import pytest
import uvicorn
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, async_to_sync, iscoroutinefunction
from channels import consumer as channels_consumer
from channels.generic import websocket as channels_websocket
from channels.routing import ProtocolTypeRouter, URLRouter
from django.core.handlers.asgi import ASGIHandler
from django.db import connection, connections, transaction
from django.urls import path
from pytest_django.fixtures import Settings
from websockets.asyncio.client import connect

from async_dbbridge import DBExecutor, TransactionLeftOpenWarning, stats
from async_dbbridge.asgi import DBBridgeASGIApp
from async_dbbridge.integrations import channels as integration
from async_dbbridge.integrations.channels import (
    JsonWebsocketConsumer,
    SyncConsumer,
    WebsocketConsumer,
    database_sync_to_async,
)
from async_dbbridge.testing import server_session_count, wait_for_server_sessions
from tests.conftest import SetSetting
from tests.testapp.models import Item

CLIENTS = 50
MESSAGES = 4  # per client: 200 handler calls of 20 ms each
POOL_SIZE = 4
QUERY_SECONDS = 0.02

_F = TypeVar("_F", bound=Callable[..., Any])


def on_servers(test: _F) -> _F:
    """A test that serves consumers to real clients against PostgreSQL or MariaDB."""
    for mark in (
        pytest.mark.requires_server,
        pytest.mark.workers,
        pytest.mark.django_db(transaction=True, databases=["default", "other"]),
        pytest.mark.usefixtures("main_thread_closed"),
        pytest.mark.timeout(60),
    ):
        test = mark(test)
    return test


# -- what the handlers measure ------------------------------------------------------


@dataclass
class Probe:
    """Handlers running at once, their threads, the sessions they used."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    peak: int = 0
    calls: int = 0
    threads: set[str] = field(default_factory=set)
    backends: set[int] = field(default_factory=set)

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.calls += 1
            self.peak = max(self.peak, self.running)
            self.threads.add(threading.current_thread().name)

    def leave(self, backend: int) -> None:
        with self.lock:
            self.running -= 1
            self.backends.add(backend)


def slow_query() -> int:
    """A 20 ms query; returns the server's id for the session that ran it."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [QUERY_SECONDS])
        else:
            cursor.execute("SELECT CONNECTION_ID(), SLEEP(%s)", [QUERY_SECONDS])
        return int(cursor.fetchone()[0])


def handle(probe: Probe, payload: object) -> dict[str, Any]:
    probe.enter()
    backend = 0
    try:
        backend = slow_query()
    finally:
        probe.leave(backend)
    return {"n": payload, "backend": backend}


def load_consumer(base: type[Any], probe: Probe) -> type[Any]:
    """A websocket consumer on ``base`` whose every message runs the 20 ms query."""

    class LoadConsumer(base):  # type: ignore[misc]  # a base chosen at run time
        def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
            self.send(text_data=json.dumps(handle(probe, text_data)))

    return LoadConsumer


def item_seen(pk: int) -> dict[str, Any]:
    return {
        "seen": Item.objects.filter(pk=pk).exists(),
        "thread": threading.current_thread().name,
    }


class NestedConsumer(WebsocketConsumer):
    """A handler that calls back into async code which queries: where does that query run?"""

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        sensitive = text_data == "sensitive"
        with transaction.atomic():
            item = Item.objects.create(name="uncommitted", value=1)
            nested = async_to_sync(self.nested_query)(item.pk, sensitive)
            transaction.set_rollback(True)
        self.send(text_data=json.dumps({"outer_thread": threading.current_thread().name, **nested}))

    async def nested_query(self, pk: int, sensitive: bool) -> dict[str, Any]:
        return await database_sync_to_async(item_seen, thread_sensitive=sensitive)(pk)


# -- the server and the clients -------------------------------------------------------


class ServerThread:
    """uvicorn serving ``app`` with websockets on a free port, in a thread (see test_e2e.py)."""

    def __init__(self, app: Any, *, lifespan: str) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            lifespan=lifespan,  # type: ignore[arg-type]  # a Literal in uvicorn's stub
            log_level="warning",
            access_log=False,
            # The sans-I/O protocol: the "websockets" one imports websockets'
            # deprecated legacy API, whose warnings are errors here.
            ws="websockets-sansio",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn")
        self.port = 0

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        assert not self.thread.is_alive(), "uvicorn did not exit"

    def url(self, route: str) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/{route}/"


class SessionSampler(threading.Thread):
    """Samples the server's session count until stopped."""

    def __init__(self) -> None:
        super().__init__(name="session-sampler", daemon=True)
        self.samples: list[int] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.samples.append(server_session_count())
            self.stopped.wait(0.005)
        connections.close_all()

    def stop(self) -> int:
        self.stopped.set()
        self.join(10)
        return max(self.samples, default=0)


async def chat(url: str, clients: int, messages: int) -> list[dict[str, Any]]:
    """``clients`` websockets, all connected first, each sending ``messages`` in turn."""
    connected = 0
    all_connected = asyncio.Event()

    async def one(client: int) -> list[dict[str, Any]]:
        nonlocal connected
        async with connect(url, open_timeout=10, close_timeout=10) as ws:
            connected += 1
            if connected == clients:
                all_connected.set()
            await asyncio.wait_for(all_connected.wait(), 10)
            replies = []
            for n in range(messages):
                await ws.send(f"{client}-{n}")
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
            return replies

    results = await asyncio.gather(*(one(c) for c in range(clients)))
    return [reply for replies in results for reply in replies]


def bridged_app(routes: dict[str, Any]) -> ProtocolTypeRouter:
    """A Channels project as the docs set it up: lifespan and HTTP through the wrapper."""
    django_app = DBBridgeASGIApp(ASGIHandler())
    return ProtocolTypeRouter(
        {
            "http": django_app,
            "lifespan": django_app,
            "websocket": URLRouter(
                [path(f"ws/{route}/", consumer.as_asgi()) for route, consumer in routes.items()]
            ),
        }
    )


def channels_app(routes: dict[str, Any]) -> ProtocolTypeRouter:
    """A Channels project as Channels' docs set it up (no lifespan)."""
    return ProtocolTypeRouter(
        {
            "http": ASGIHandler(),
            "websocket": URLRouter(
                [path(f"ws/{route}/", consumer.as_asgi()) for route, consumer in routes.items()]
            ),
        }
    )


@dataclass
class Run:
    replies: list[dict[str, Any]]
    probe: Probe
    peak_sessions: int


def serve_chat(server: ServerThread, route: str, probe: Probe, messages: int = MESSAGES) -> Run:
    sampler = SessionSampler()
    sampler.start()
    try:
        replies = asyncio.run(chat(server.url(route), CLIENTS, messages))
    finally:
        peak = sampler.stop()
    assert len(replies) == CLIENTS * messages
    assert probe.calls == CLIENTS * messages
    return Run(replies, probe, peak)


@pytest.fixture
def pooled(settings: Settings, db_settings: SetSetting) -> None:
    settings.ASYNC_DBBRIDGE = {"MAX_WORKERS": 8, "POOL_SIZE": POOL_SIZE, "POOL_TIMEOUT": 20}
    db_settings(CONN_MAX_AGE=60, CONN_HEALTH_CHECKS=True)


@pytest.fixture
def close_asgiref_thread() -> Iterator[None]:
    """Channels' own handlers run on asgiref's process-wide thread: close what it keeps."""
    yield

    async def close() -> None:
        await SyncToAsync(connections.close_all, thread_sensitive=True)()

    asyncio.run(close())


# -- under load: concurrency, the bound, shutdown -----------------------------------------


@on_servers
@pytest.mark.usefixtures("pooled")
def test_handlers_of_different_consumers_overlap_within_the_pool() -> None:
    probe = Probe()
    app = bridged_app({"load": load_consumer(WebsocketConsumer, probe)})
    with ServerThread(app, lifespan="on") as server:
        run = serve_chat(server, "load", probe)
        pool = stats().pools["default"]
    # Handlers of different consumers ran at the same time, on bridge workers.
    assert probe.peak > 1, probe
    assert all(name.startswith("dbbridge") for name in probe.threads), probe.threads
    # The bound is a bound, and connections were reused (CONN_MAX_AGE=60), not
    # opened per call: a few sessions served 200 calls.
    assert 1 <= run.peak_sessions <= POOL_SIZE, run.peak_sessions
    assert 1 <= len(probe.backends) <= POOL_SIZE, probe.backends
    assert 1 <= pool.opened <= POOL_SIZE, pool
    # Lifespan shutdown (routed to the wrapper) closed every session.
    assert wait_for_server_sessions("default", 0, timeout=10) == 0


@on_servers
@pytest.mark.usefixtures("pooled", "close_asgiref_thread")
def test_channels_own_consumers_run_one_handler_at_a_time_on_one_thread() -> None:
    # The same workload on Channels' own class: every handler of every
    # consumer on asgiref's one thread, so one at a time; its connection is
    # reused under CONN_MAX_AGE, and nothing closes it when the server stops.
    probe = Probe()
    app = channels_app({"load": load_consumer(channels_websocket.WebsocketConsumer, probe)})
    with ServerThread(app, lifespan="off") as server:
        run = serve_chat(server, "load", probe)
    assert probe.peak == 1, probe
    assert len(probe.threads) == 1, probe.threads
    assert not any(name.startswith("dbbridge") for name in probe.threads)
    assert len(probe.backends) == 1, probe.backends
    assert run.peak_sessions == 1, run.peak_sessions
    # Left open after the server stopped (closed by close_asgiref_thread).
    assert server_session_count() == 1


@on_servers
@pytest.mark.usefixtures("pooled", "close_asgiref_thread")
@pytest.mark.parametrize("variant", ["channels", "bridge"])
def test_at_conn_max_age_0_every_call_opens_a_session(
    variant: str, db_settings: SetSetting
) -> None:
    # Channels closes around every call (close_old_connections()), which at
    # Django's default CONN_MAX_AGE=0 means a session per handler call. The
    # drop-in honours CONN_MAX_AGE too: set it above 0 to reuse connections.
    db_settings(CONN_MAX_AGE=0)
    probe = Probe()
    if variant == "channels":
        app = channels_app({"load": load_consumer(channels_websocket.WebsocketConsumer, probe)})
    else:
        app = bridged_app({"load": load_consumer(WebsocketConsumer, probe)})
    with ServerThread(app, lifespan="off" if variant == "channels" else "on") as server:
        serve_chat(server, "load", probe, messages=1)
        pool = stats().pools.get("default")
    assert len(probe.backends) == CLIENTS, probe.backends
    if variant == "channels":
        assert probe.peak == 1, probe
    else:
        # (Not the sampled server count: a session closed a moment ago may
        # still be listed while its replacement is open; the bound under reuse
        # is checked at CONN_MAX_AGE=60 above.)
        assert probe.peak > 1, probe
        assert pool is not None
        assert pool.max_size == POOL_SIZE
        assert pool.opened == CLIENTS, pool
    assert wait_for_server_sessions("default", 0, timeout=10) == 0


# -- where calls run: nested calls, JSON consumers ----------------------------------------


class EchoJsonConsumer(JsonWebsocketConsumer):
    def receive_json(self, content: Any, **kwargs: Any) -> None:
        self.send_json({"echo": content, "thread": threading.current_thread().name})


async def exchange(url: str, messages: list[str]) -> list[dict[str, Any]]:
    async with connect(url, open_timeout=10, close_timeout=10) as ws:
        replies = []
        for message in messages:
            await ws.send(message)
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 20)))
        return replies


@on_servers
@pytest.mark.usefixtures("pooled")
def test_a_nested_thread_sensitive_call_runs_inside_the_handlers_call() -> None:
    app = bridged_app({"nested": NestedConsumer, "json": EchoJsonConsumer})
    with ServerThread(app, lifespan="on") as server:
        sensitive, free = asyncio.run(exchange(server.url("nested"), ["sensitive", "free"]))
        (echo,) = asyncio.run(exchange(server.url("json"), [json.dumps({"a": 1})]))
    # thread_sensitive=True, awaited by async code the handler waits on
    # (async_to_sync): the handler's own thread, its connection, its
    # uncommitted row, as asgiref runs a thread-sensitive call there.
    assert sensitive["thread"] == sensitive["outer_thread"], sensitive
    assert sensitive["seen"] is True
    # thread_sensitive=False: another bridge worker, another connection, which
    # cannot see the handler's open transaction.
    assert free["thread"] != free["outer_thread"], free
    assert free["thread"].startswith("dbbridge")
    assert free["seen"] is False
    assert echo == {"echo": {"a": 1}, "thread": echo["thread"]}
    assert echo["thread"].startswith("dbbridge"), echo
    assert wait_for_server_sessions("default", 0, timeout=10) == 0
    assert not Item.objects.exists()


# -- the call surface (no server) ---------------------------------------------------------


def test_public_names() -> None:
    assert integration.__all__ == (
        "JsonWebsocketConsumer",
        "SyncConsumer",
        "WebsocketConsumer",
        "database_sync_to_async",
    )


def test_the_consumers_are_channels_own_with_the_dispatch_rewrapped() -> None:
    assert issubclass(SyncConsumer, channels_consumer.SyncConsumer)
    assert issubclass(WebsocketConsumer, channels_websocket.WebsocketConsumer)
    assert issubclass(WebsocketConsumer, SyncConsumer)
    assert issubclass(JsonWebsocketConsumer, channels_websocket.JsonWebsocketConsumer)
    assert issubclass(JsonWebsocketConsumer, WebsocketConsumer)
    # Channels' dispatch, its function unchanged, in this module's wrapper.
    channels_dispatch = channels_consumer.SyncConsumer.__dict__["dispatch"]
    for consumer in (SyncConsumer, WebsocketConsumer, JsonWebsocketConsumer):
        ours = consumer.__dict__.get("dispatch") or SyncConsumer.__dict__["dispatch"]
        assert ours is SyncConsumer.__dict__["dispatch"]
        assert ours.func is channels_dispatch.func
        assert consumer.dispatch is ours  # read on the class: the wrapper itself
    assert iscoroutinefunction(SyncConsumer.__dict__["dispatch"])


def thread_name(suffix: str = "") -> str:
    return threading.current_thread().name + suffix


@database_sync_to_async
def decorated(suffix: str) -> str:
    return thread_name(suffix)


@database_sync_to_async(thread_sensitive=False)
def decorated_free(suffix: str) -> str:
    return thread_name(suffix)


class Holder:
    @database_sync_to_async
    def method(self, suffix: str) -> tuple[Holder, str]:
        return self, thread_name(suffix)


async def test_every_call_shape_runs_on_the_bridge() -> None:
    for result in (
        await decorated("!"),
        await decorated_free("!"),
        await database_sync_to_async(thread_name)("!"),
        await database_sync_to_async(thread_name, thread_sensitive=False)("!"),
        await database_sync_to_async(thread_name, False)("!"),
    ):
        assert result.startswith("dbbridge"), result
        assert result.endswith("!"), result
    holder = Holder()
    same, name = await holder.method("?")
    assert same is holder
    assert name.startswith("dbbridge")
    # What Channels' wrapper (asgiref's SyncToAsync) carries.
    assert decorated.__name__ == "decorated"
    assert decorated.__wrapped__.__name__ == "decorated"  # type: ignore[attr-defined]  # set by functools.wraps
    assert iscoroutinefunction(decorated)
    assert iscoroutinefunction(Holder.method)
    bound = database_sync_to_async(holder.method.__wrapped__.__get__(holder))  # type: ignore[attr-defined]  # a plain bound method
    assert bound.__self__ is holder  # type: ignore[attr-defined]  # copied from the bound method


async def test_the_process_wide_thread_is_never_used() -> None:
    # Channels' wrapper would put both on asgiref's one thread; here they overlap.
    started = threading.Barrier(2, timeout=10)

    def meet() -> str:
        started.wait()
        return thread_name()

    first, second = await asyncio.gather(
        database_sync_to_async(meet)(), database_sync_to_async(meet)()
    )
    assert first != second
    assert first.startswith("dbbridge")
    assert second.startswith("dbbridge")


async def test_inside_a_thread_sensitive_context_the_call_runs_on_its_thread() -> None:
    # An HTTP request's context (Django's, or the ASGI wrapper's request
    # thread): thread-sensitive calls stay on the request's thread.
    async with ThreadSensitiveContext():
        here = await SyncToAsync(thread_name, thread_sensitive=True)()
        assert await database_sync_to_async(thread_name)() == here
        assert (await database_sync_to_async(thread_name, thread_sensitive=False)()).startswith(
            "dbbridge"
        )
    assert not here.startswith("dbbridge")


async def test_arguments_are_checked_as_asgiref_checks_them() -> None:
    async def not_sync() -> None:
        pass

    with pytest.raises(TypeError, match="sync_to_async can only be applied to sync functions"):
        database_sync_to_async(not_sync)
    executor = DBExecutor(max_workers=1)
    try:
        with pytest.raises(TypeError, match="executor must not be set when thread_sensitive"):
            database_sync_to_async(thread_name, executor=executor)
        name = await database_sync_to_async(
            thread_name, thread_sensitive=False, executor=executor
        )()
        assert name.startswith("dbbridge")
    finally:
        executor.shutdown()
    context = contextvars.copy_context()
    assert await database_sync_to_async(thread_name, context=context)() != ""


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
async def test_a_transaction_left_open_is_rolled_back_with_a_warning() -> None:
    # The documented choice: a transaction cannot outlive its call (nor, so,
    # span several handlers of one websocket); Channels' close_old_connections()
    # rolls it back silently by closing the connection, this says so.
    def leave_open() -> None:
        transaction.set_autocommit(False)
        Item.objects.create(name="never committed")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with pytest.warns(TransactionLeftOpenWarning):
            await database_sync_to_async(leave_open)()
    assert await database_sync_to_async(Item.objects.count)() == 0
