"""One thread hop per sync request: the whole sync part of a request in one call.

Under ASGI, Django serves a request whose view is sync in many round trips
between the event loop and the request's thread: `request_started`, every
`MiddlewareMixin`'s `process_request` and `process_response` (fused into two
by `_middleware`, when the chain allows), every `process_view`, the view,
template rendering, `response.close()`. Each is a loop wake-up, a thread
wake-up and a GIL hand-over. Django's WSGI handler makes none: the whole
request runs on the server's thread.

`OneHop` replaces the `handle()` of Django's `ASGIHandler` instance (not its
class, and not `__call__`, so whatever wraps `__call__` — Sentry's ASGI
middleware, say — still runs). For a request whose URL resolves to a sync
view it does what Django's WSGI handler does, in **one** call on the
request's thread:

1. on the loop: read the body (Django's own `read_body`);
2. on the request's thread, one call: `request_started`, `create_request`,
   `get_response` through a chain of the same middleware built in **sync**
   mode (as `WSGIHandler` builds it), with `process_view`, the view,
   `process_exception`, `process_template_response` and the rendering;
   then the call hands the response to the loop and waits;
3. on the loop: Django's own `send_response`, while listening for the client's
   disconnect as Django's `handle()` does;
4. still in that call, once the body was sent: `response.close()`
   (`request_finished`), as Django's WSGI handler does after writing the
   body; a client gone before the response was ready gets
   `request_finished` alone, from the loop, as in Django.

A streaming response (a `FileResponse` too) cannot wait in the call: the loop
iterates a sync iterator through thread-sensitive calls on that same thread.
Its call returns the response, and `response.close()` is a second call after
the body was sent, as before.

So a sync request costs one round trip to its thread instead of six to a
dozen (two for a streaming response). Any other
request — an async view, a URL that does not resolve with the default
URLconf to a sync view — takes Django's own `handle()`, unchanged, with the
fused middleware chain.

What differs from Django's ASGI path, by design:

* the middleware runs in sync mode, as under WSGI: same hooks, same order,
  same exception handling, on the request's thread; each middleware class is
  instantiated twice at startup (once per chain), so a middleware keeping
  state in its instance between requests sees only its own chain's requests;
* a middleware that sets `request.urlconf` to a URLconf whose view is async
  gets that view run through `async_to_sync` on the request's thread, as
  Django's WSGI handler runs it.

It applies only when every middleware is sync-capable (an async-only
middleware would otherwise be adapted with `async_to_sync`), and only on a
Django whose request machinery matches what this module was checked against
(`_compat.request_machinery_matches`); otherwise the wrapper says why at
startup and Django's own path serves every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import weakref
from collections.abc import Awaitable, Callable
from queue import SimpleQueue
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.base import BaseHandler
from django.core.signals import setting_changed
from django.http import FileResponse
from django.urls import Resolver404, get_resolver, set_script_prefix
from django.utils.module_loading import import_string

from . import _compat
from ._binding import current_request_state
from ._gate import SyncGate, SyncRequestsBusy
from ._middleware import Verdict
from ._request_threads import RequestThread, idle_give_back

if TYPE_CHECKING:
    from django.core.handlers.asgi import ASGIHandler
    from django.http import HttpResponseBase

__all__ = ("OneHop", "Verdict", "install_one_hop", "uninstall_one_hop")

logger = logging.getLogger("async_dbbridge")

Handle = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def _sync_view(urlconf: str, path_info: str) -> bool:
    """Does `path_info` resolve, with `urlconf`, to a sync view (or to nothing: a 404)?"""
    try:
        match = get_resolver(urlconf).resolve(path_info)
    except Resolver404:
        return True  # Django's 404 handling runs in sync mode as under WSGI
    return not iscoroutinefunction(match.func)


# Resolving costs a few microseconds per URL pattern tried; the answer depends
# only on the URLconf and the path (Django's own resolvers are cached alike).
_sync_view_cached = functools.lru_cache(maxsize=4096)(_sync_view)


def _clear_cache(*, setting: str, **kwargs: object) -> None:
    if setting in ("ROOT_URLCONF", "FORCE_SCRIPT_NAME"):
        _sync_view_cached.cache_clear()


setting_changed.connect(_clear_cache, dispatch_uid="async_dbbridge.one_hop")


class OneHop:
    """The `handle()` of one `ASGIHandler` instance: sync requests in one hop.

    Args:
        handler: Django's handler, whose `handle` this replaces.
    """

    def __init__(self, handler: ASGIHandler) -> None:
        self.handler = handler
        # Django's own handle(), bound: every request that is not for a sync
        # view, and the path back when this is uninstalled.
        self.general: Handle = type(handler).handle.__get__(handler)
        # The same middleware as a sync chain, as WSGIHandler builds it.
        self.sync_handler = BaseHandler()
        self.sync_handler.load_middleware(is_async=False)
        self.handler_class = type(handler)
        self.reason = f"{len(settings.MIDDLEWARE)} middleware in one sync chain"
        # One SyncToAsync each, reused (asgiref 3.13 keeps no per-call state in it).
        self._respond = sync_to_async(self._respond_on_thread, thread_sensitive=True)
        self._close = sync_to_async(_close_after_send, thread_sensitive=True)
        # SYNC_REQUESTS (_gate): one gate per event loop, made on its first request.
        self._gate_settings: tuple[int, float, int] | None = None
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SyncGate] = (
            weakref.WeakKeyDictionary()
        )

    def serves(self, scope: dict[str, Any]) -> bool:
        """Whether this request goes through the one hop (a sync view), not Django's handle()."""
        return self._is_for_a_sync_view(scope)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self._is_for_a_sync_view(scope):
            await self.general(scope, receive, send)
            return
        try:
            body_file = await self.handler.read_body(receive)
        except RequestAborted:
            return
        loop = asyncio.get_running_loop()
        gate = self._gate(loop)
        if gate is None:
            await self._serve(scope, receive, send, body_file, loop)
            return
        try:
            await gate.enter()
        except SyncRequestsBusy as exc:
            body_file.close()
            await _answer_busy(exc, send)
            return
        try:
            await self._serve(scope, receive, send, body_file, loop)
        finally:
            gate.leave()

    def limit_sync_requests(self, limit: int, *, timeout: float, max_waiting: int) -> None:
        """Let `limit` sync requests run at once per event loop (0: no limit); see `_gate`."""
        self._gate_settings = (limit, timeout, max_waiting) if limit else None
        self._gates.clear()

    def _gate(self, loop: asyncio.AbstractEventLoop) -> SyncGate | None:
        gate_settings = self._gate_settings
        if gate_settings is None:
            return None
        gate = self._gates.get(loop)
        if gate is None:
            limit, timeout, max_waiting = gate_settings
            gate = self._gates[loop] = SyncGate(limit, timeout=timeout, max_waiting=max_waiting)
        return gate

    async def _serve(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        body_file: Any,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        handler = self.handler
        # Set when the server cancels the request (its graceful timeout): it has
        # answered the client itself, so the response must not be sent.
        abandoned = False

        async def process() -> tuple[HttpResponseBase, bool]:
            """The response, and whether the thread's call closed it after the send."""
            handoff = _Handoff(loop)
            call = asyncio.ensure_future(self._respond(scope, body_file, handoff))
            try:
                try:
                    handed = await handoff.ready
                except asyncio.CancelledError:
                    # The client left while the view ran (or the server gave
                    # up): the response is discarded, as Django's handle()
                    # discards it (the finally below releases the thread
                    # without a close), and the call is cancelled as Django's is.
                    call.cancel()
                    raise
                if handed is None:
                    # Not handed over: a streaming response, sent from here
                    # and closed in a second call, or an exception.
                    try:
                        response = await call
                    except BaseException:
                        # Propagating (DEBUG_PROPAGATE_EXCEPTIONS, a failing
                        # request_started receiver): nothing will close the body but us.
                        body_file.close()
                        raise
                    await self._send(response, send, abandoned)
                    return response, False
                try:
                    await self._send(handed, send, abandoned)
                finally:
                    # Sent, or the server answered for us: the thread's call
                    # closes the response (request_finished) and returns.
                    handoff.release(close=True)
                await _wait_out(call)
                return handed, True
            finally:
                # Whatever ended this coroutine, the thread must not wait for good.
                handoff.release(close=False)

        # As Django's handle() does: listen for the client's disconnect while the
        # request is served, and stop waiting for it (the thread finishes its
        # call regardless) when the client goes away first.
        listen = asyncio.create_task(handler.listen_for_disconnect(receive))
        work = asyncio.create_task(process())
        try:
            await asyncio.wait((listen, work), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # The server cancelled the request. Unlike Django's handle(), leave
            # no task behind: the thread's call cannot be interrupted, and a
            # leftover would send after the server's answer ("Unexpected ASGI
            # message") and call into the request's context once it exited.
            abandoned = True
            await self._end_abandoned(listen, work, body_file)
            raise
        for task in (listen, work):
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        try:
            response, closed = work.result()
        except asyncio.CancelledError:
            await signals.request_finished.asend(sender=self.handler_class)
            body_file.close()
        else:
            if not closed:
                # A streaming response, after its body was sent: request_finished
                # and the response's resource closers, on the request's thread.
                await self._close(response, body_file)

    async def _send(self, response: HttpResponseBase, send: Any, abandoned: bool) -> None:
        if abandoned:
            return
        try:
            await self.handler.send_response(response, send)
        except asyncio.CancelledError:
            pass  # the client disconnected during the send, as in Django

    async def _end_abandoned(
        self,
        listen: asyncio.Task[None],
        work: asyncio.Task[tuple[HttpResponseBase, bool]],
        body_file: Any,
    ) -> None:
        """A cancelled request: its call ends, then request_finished; every error swallowed.

        Nobody is left to hear of an error: the server answered the client and
        the cancellation goes on. A second cancellation (the loop ending)
        cancels `work` too, which still waits for the thread's call.
        """
        listen.cancel()
        try:
            response, closed = await work
        except BaseException:
            body_file.close()
        else:
            if not closed:
                with contextlib.suppress(Exception):
                    # On the request's thread, like a served request's end.
                    await self._close(response, body_file)
        with contextlib.suppress(asyncio.CancelledError, RequestAborted):
            await listen

    def _is_for_a_sync_view(self, scope: dict[str, Any]) -> bool:
        urlconf = getattr(settings, "ROOT_URLCONF", None)
        if urlconf is None:
            return False  # Django's own path reports the missing setting
        try:
            return _sync_view_cached(urlconf, _compat.asgi_path_info(scope))
        except Exception:
            # A broken URLconf: Django's own path reports it as it always does.
            return False

    def _respond_on_thread(
        self, scope: dict[str, Any], body_file: Any, handoff: _Handoff
    ) -> HttpResponseBase:
        """The request's whole sync part, in one call on its thread.

        A non-streaming response is handed to the loop, which sends it; the
        call then waits, holding no idle connection, until it was sent and
        closes it — `request_finished` — as Django's WSGI handler does after
        writing the body. A streaming response is returned instead: the loop
        iterates a sync iterator through thread-sensitive calls on this very
        thread, which must therefore be free, and closes it in a second call.
        """
        try:
            response = self._get_response(scope, body_file)
        except BaseException:
            handoff.hand(None)
            raise
        if response.streaming:
            handoff.hand(None)
            return response
        handoff.hand(response)
        thread = threading.current_thread()
        give_back = idle_give_back(thread)
        if give_back is not None:
            # As after any call with HOLD="transaction": the send may take a
            # while (a slow client), and this thread needs no connection for it.
            give_back()
        if handoff.wait(thread):
            _close_after_send(response, body_file)
        return response

    def _get_response(self, scope: dict[str, Any], body_file: Any) -> HttpResponseBase:
        """Everything Django's handle() does up to sending, on the request's thread."""
        handler = self.handler
        set_script_prefix(_compat.asgi_script_prefix(scope))
        signals.request_started.send(sender=self.handler_class, scope=scope)
        request, error_response = handler.create_request(scope, body_file)
        if request is None:
            body_file.close()
            assert error_response is not None
            return error_response
        response: HttpResponseBase = self.sync_handler.get_response(request)
        # What ASGIHandler.run_get_response() adds (Django 5.2.19 and 6.1.3):
        # request_finished names the ASGI handler, and files go out in the
        # ASGI chunk size.
        response._handler_class = self.handler_class  # type: ignore[attr-defined]
        if isinstance(response, FileResponse):
            response.block_size = handler.chunk_size
        return response


class _Handoff:
    """A non-streaming response, handed from the request's thread to the loop, and the word back.

    The thread hands the response over (or `None`: it has none to hand, and the
    loop awaits the call instead), then waits until the loop says whether to
    close it: yes once it was sent or the server answered for us, no when it
    was discarded because the client left first — what Django's handle() does
    in each case. A request thread waits on its own inbox, running any call
    the loop makes for the request meanwhile (`RequestThread.serve_until`);
    the loop's word is this object, put in that inbox.
    """

    __slots__ = ("_close", "_inbox", "_loop", "_mutex", "_released", "ready")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.ready: asyncio.Future[HttpResponseBase | None] = loop.create_future()
        # Orders the loop's release against the thread starting to wait.
        self._mutex = threading.Lock()
        self._inbox: SimpleQueue[object] | None = None
        self._released = False
        self._close = False

    # -- on the request's thread

    def hand(self, response: HttpResponseBase | None) -> None:
        self._loop.call_soon_threadsafe(self._set, response)

    def wait(self, thread: threading.Thread) -> bool:
        """Until the loop releases this call of `thread` (the current one); whether to close."""
        serving = thread if isinstance(thread, RequestThread) else None
        inbox: SimpleQueue[object] = serving.inbox if serving is not None else SimpleQueue()
        with self._mutex:
            if self._released:
                return self._close
            self._inbox = inbox
        if serving is not None:
            serving.serve_until(self)
        else:
            inbox.get()
        return self._close

    # -- on the loop

    def _set(self, response: HttpResponseBase | None) -> None:
        if not self.ready.done():  # cancelled: the client left first
            self.ready.set_result(response)

    def release(self, *, close: bool) -> None:
        """Let the thread's call go on (once; later calls do nothing)."""
        with self._mutex:
            if self._released:
                return
            self._released = True
            self._close = close
            inbox = self._inbox
        if inbox is not None:
            inbox.put(self)


async def _answer_busy(error: SyncRequestsBusy, send: Any) -> None:
    """The request never started: the ASGI wrapper turns this into its 503 (see `asgi`).

    The request's state carries the cause, as for a pool checkout that timed
    out, and the 500 sent here is what the wrapper replaces with the 503, its
    `Retry-After` and its log line. Django never saw the request: no signal,
    no middleware, nothing to close but the body.
    """
    state = current_request_state.get()
    if state is not None:
        state.pool_timed_out = True
        if state.pool_timeout is None:
            state.pool_timeout = error
    await send({"type": "http.response.start", "status": 500, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _wait_out(call: asyncio.Future[HttpResponseBase]) -> None:
    """Await the thread's call to its end; a cancellation meanwhile cannot stop it.

    Once the response was sent, the call only closes it: the request is
    served, and the client leaving now (or the server giving up) must not make
    it look discarded — that would send `request_finished` a second time.
    """
    while not call.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(call)
    call.result()


def _close_after_send(response: HttpResponseBase, body_file: Any) -> None:
    try:
        response.close()
    finally:
        body_file.close()


def _async_only_middleware() -> list[str]:
    """The middleware in settings.MIDDLEWARE that cannot run in sync mode."""
    return [
        path
        for path in settings.MIDDLEWARE
        if not getattr(import_string(path), "sync_capable", True)
    ]


def install_one_hop(handler: object) -> Verdict:
    """Serve `handler`'s sync requests in one hop, if that is safe; say why not otherwise.

    Idempotent. `handler` must be Django's `ASGIHandler` (or a subclass that
    keeps its `handle`).
    """
    from django.core.handlers.asgi import ASGIHandler

    if not isinstance(handler, ASGIHandler):
        return Verdict(False, f"the wrapped app is {type(handler).__qualname__}, not ASGIHandler")
    current = _compat.instance_handle(handler)
    if isinstance(current, OneHop):
        return Verdict(True, current.reason)
    if type(handler).handle is not ASGIHandler.handle:
        return Verdict(False, f"{type(handler).__qualname__} overrides handle()")
    mismatch = _compat.request_machinery_mismatch()
    if mismatch is not None:
        return Verdict(False, mismatch)
    async_only = _async_only_middleware()
    if async_only:
        return Verdict(
            False, f"middleware {', '.join(async_only)} is async-only (sync_capable = False)"
        )
    one_hop = OneHop(handler)
    _compat.set_instance_handle(handler, one_hop)
    return Verdict(True, one_hop.reason)


def uninstall_one_hop(handler: object) -> None:
    """Give `handler` back Django's own `handle()`, if `install_one_hop` replaced it."""
    if isinstance(_compat.instance_handle(handler), OneHop):
        _compat.set_instance_handle(handler, None)
