"""Django's `MiddlewareMixin` middleware in two thread hops per request, not two per layer.

Under ASGI Django runs every `MiddlewareMixin` middleware (all the middleware
Django ships, and most projects' own) in async mode: its `__acall__` awaits
``sync_to_async(process_request, thread_sensitive=True)``, then the next layer,
then ``sync_to_async(process_response, thread_sensitive=True)``. With the seven
middlewares `startproject` generates that is 12 round trips per request
between the event loop's thread and the request's thread, each one a GIL
hand-off and two thread wake-ups — the largest share of what a simple view
costs under ASGI (profiled on the project benchmark: ~140 µs of CPU per hop).

`fuse_middleware(handler)` replaces the outermost run of such layers in the
chain Django built with a `FusedMiddleware`, which runs every
``process_request`` of the run in one thread-sensitive call, awaits the rest of
the chain on the loop (the first layer that is not a plain `MiddlewareMixin`,
or Django's view handler — an async view still runs on the loop, as Django
runs it), and runs every ``process_response`` in a second call.
The same methods run in the same order, on the same thread (the request's),
with the same exception handling as Django's nested layers:

- ``process_request`` returning a response skips the inner layers, and that
  layer's own ``process_response`` and the outer ones run on it;
- an exception in layer *i*'s ``process_request`` or ``process_response``
  becomes Django's response for it (`response_for_exception`, as the
  ``convert_exception_to_response`` wrapper around layer *i* does), and the
  layers outside *i* process that response.

What differs, by design: fewer event-loop turns between two middleware methods
(other requests interleave at the two hops instead of at each), and
`response_for_exception` for an exception raised by a fused layer runs on the
request's thread rather than on any thread (Django uses
``thread_sensitive=False`` there; the request's thread is where the request's
thread-locals are). A layer qualifies only if it is exactly a
`MiddlewareMixin` in async mode: a class overriding ``__call__`` or
``__acall__``, or defining ``process_request``/``process_response`` as
coroutine functions, stops the run, and that layer and everything inside it run
as Django built them. The ``FUSE_MIDDLEWARE`` setting turns this off.

The walk over Django's chain touches private structure; it lives in
`_compat` (``middleware_chain``, ``unwrap_converted``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from asgiref.sync import iscoroutinefunction, sync_to_async

from . import _compat

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponseBase
    from django.utils.deprecation import MiddlewareMixin

__all__ = ("FusedMiddleware", "Verdict", "fuse", "fuse_middleware", "unfuse_middleware")

AsyncHandler = Callable[["HttpRequest"], Awaitable["HttpResponseBase"]]


@dataclass(frozen=True)
class Verdict:
    """Whether a rewrite of Django's request machinery applies to this app, and why (not)."""

    applied: bool
    reason: str


def _is_plain_mixin(layer: object) -> bool:
    """Is `layer` a `MiddlewareMixin` whose async path is exactly the mixin's own?"""
    from django.utils.deprecation import MiddlewareMixin

    if not isinstance(layer, MiddlewareMixin) or not getattr(layer, "async_mode", False):
        return False
    cls = type(layer)
    if cls.__call__ is not MiddlewareMixin.__call__:
        return False
    if cls.__acall__ is not MiddlewareMixin.__acall__ or "__acall__" in vars(layer):
        return False
    return not any(
        iscoroutinefunction(getattr(layer, name, None))
        for name in ("process_request", "process_response")
    )


@dataclass(frozen=True)
class PlainRun:
    """The outermost run of plain `MiddlewareMixin` layers of a chain, and what ends it."""

    layers: list[MiddlewareMixin]
    inner: AsyncHandler
    #: How many of the layers were reached through Sentry's wrapper (seen through).
    through_sentry: int = 0
    #: Why the run ended at `inner`, when `inner` is a layer that was not taken.
    stopped_at: str | None = None


def plain_run(chain: AsyncHandler) -> PlainRun:
    """The outermost run of plain `MiddlewareMixin` layers of `chain`, and what they wrap.

    A layer Sentry's DjangoIntegration wrapped counts as the middleware it
    holds when the wrapper adds nothing to it (`middleware_spans` off, and a
    sentry-sdk whose wrapper is the code `_compat` checked): every one of its
    calls is then its inner's. `FusedMiddleware` asks again on every request.
    """
    layers: list[MiddlewareMixin] = []
    handler = chain
    through_sentry = 0
    while True:
        layer = _compat.unwrap_converted(handler)
        if layer is None:
            return PlainRun(layers, handler, through_sentry)
        candidate = layer
        inner = _compat.sentry_inner(layer)
        if inner is not None:
            why_not = _compat.sentry_wrapper_mismatch()
            if why_not is None and not _compat.sentry_middleware_spans_off():
                why_not = (
                    "Sentry's DjangoIntegration has middleware_spans on (fusing would drop them)"
                )
            if why_not is not None:
                return PlainRun(layers, handler, through_sentry, f"{_name(inner)}: {why_not}")
            candidate = inner
            through_sentry += 1
        if not _is_plain_mixin(candidate):
            # Django's view handler (a bound method) ends every chain: no news.
            stopped_at = (
                None
                if inspect.ismethod(candidate)
                else f"{_name(candidate)}, not a plain MiddlewareMixin"
            )
            return PlainRun(layers, handler, through_sentry, stopped_at)
        layers.append(candidate)
        handler = candidate.get_response


def _name(layer: object) -> str:
    name = getattr(layer, "__qualname__", None)
    return name if isinstance(name, str) else type(layer).__qualname__


def _response_for_exception(request: HttpRequest, exc: Exception) -> HttpResponseBase:
    from django.core.handlers.exception import response_for_exception

    response: HttpResponseBase = response_for_exception(request, exc)
    return response


#: Where Django's own exception wrappers build the response for an exception
#: that escaped a layer: on any thread (`convert_exception_to_response`).
_respond_on_any_thread = sync_to_async(_response_for_exception, thread_sensitive=False)


class FusedMiddleware:
    """A run of `MiddlewareMixin` layers, as Django nests them, in two thread hops.

    Args:
        layers: The layers, outermost first, each a plain `MiddlewareMixin` in
            async mode whose ``get_response`` is the next one's wrapper.
        inner: What the innermost layer wraps (an async handler).
        unfused: The chain this replaces, which `unfuse_middleware` restores.
    """

    def __init__(
        self,
        layers: Sequence[MiddlewareMixin],
        inner: AsyncHandler,
        *,
        unfused: AsyncHandler,
        guard: Callable[[], bool] | None = None,
        adapter: Any | None = None,
        above: Sequence[str] = (),
    ) -> None:
        if not layers:
            raise ValueError("FusedMiddleware needs at least one layer")
        self.layers: tuple[MiddlewareMixin, ...] = tuple(layers)
        self.inner = inner
        self.unfused = unfused
        # Asked before every request when some layer was seen through Sentry's
        # wrapper: False (middleware spans turned on since) sends the request
        # down the chain Django built, wrappers and spans included.
        self.guard = guard
        # Django's AsyncToSync adapter whose target this replaced (None: the
        # handler's chain itself), and the sync-only layers above it, by name.
        self.adapter = adapter
        self.above = tuple(above)
        # One SyncToAsync each, reused: it keeps no per-call state (asgiref
        # 3.13 copies the caller's context per call).
        self._request_phase = sync_to_async(self._process_requests, thread_sensitive=True)
        self._response_phase = sync_to_async(self._process_responses, thread_sensitive=True)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if self.guard is not None and not self.guard():
            return await self.unfused(request)
        try:
            entered, response = await self._request_phase(request)
            if response is None:
                try:
                    response = await self.inner(request)
                except Exception as exc:
                    # Django's wrapper around the innermost layer would turn
                    # this into a response that layer's own process_response
                    # never sees (inner is itself such a wrapper in every
                    # chain Django builds, so this is a safety net).
                    entered -= 1
                    response = await _respond_on_any_thread(request, exc)
            return await self._response_phase(request, response, entered)
        except Exception as exc:
            # The outermost layer's wrapper: nothing escapes the chain as an
            # exception (the executor refusing work at shutdown, say).
            return await _respond_on_any_thread(request, exc)

    def _process_requests(self, request: HttpRequest) -> tuple[int, HttpResponseBase | None]:
        """Every layer's ``process_request``; how many layers were entered, and a response if any.

        "Entered" layers are those whose ``process_response`` must run: all of
        them, the one that answered included, but not one whose
        ``process_request`` raised (its exception wrapper answers for it).
        """
        for index, layer in enumerate(self.layers):
            if not hasattr(layer, "process_request"):
                continue
            try:
                response = layer.process_request(request)
            except Exception as exc:
                return index, _response_for_exception(request, exc)
            if response:  # MiddlewareMixin: `response or await self.get_response(request)`
                return index + 1, response
        return len(self.layers), None

    def _process_responses(
        self, request: HttpRequest, response: HttpResponseBase, entered: int
    ) -> HttpResponseBase:
        """``process_response`` of the entered layers, innermost first."""
        for layer in reversed(self.layers[:entered]):
            if not hasattr(layer, "process_response"):
                continue
            try:
                response = layer.process_response(request, response)
            except Exception as exc:
                response = _response_for_exception(request, exc)
        return response

    def __repr__(self) -> str:
        names = ", ".join(type(layer).__qualname__ for layer in self.layers)
        return f"<{type(self).__name__} [{names}] inner={self.inner!r}>"


def fuse_middleware(handler: Any) -> FusedMiddleware | None:
    """Fuse the outermost run of plain `MiddlewareMixin` layers of `handler`'s chain.

    `handler` is Django's `ASGIHandler` (any `BaseHandler` whose middleware was
    loaded for async). Idempotent: an already fused chain is returned as is.
    Returns None when the chain does not start with such a layer, or on a
    Django whose middleware machinery is not the code this was checked
    against (`_compat.middleware_machinery_mismatch`), and leaves it untouched.
    """
    return fuse(handler)[0]


#: How deep `_async_part` looks for the async part of a chain (layers are few).
_MAX_DEPTH = 200


def _async_part(chain: Any) -> tuple[Any | None, Any, list[str]] | None:
    """Where the async-mode part of `chain` starts: (its adapter, the part, the sync layers above).

    A chain whose outermost layer runs in async mode is async from the top:
    (None, chain, []). A chain with a sync-only middleware in it (WhiteNoise)
    is sync from the top down to that layer, then goes back to async mode
    through Django's `AsyncToSync` adapter: (that adapter, what it runs, the
    names of the sync layers above it). None when neither shape is found.
    Nothing is changed; the sync layers are only looked through, by the
    `get_response` they keep (Django's convention for the next layer).
    """
    if _compat.unwrap_converted(chain) is not None or isinstance(chain, FusedMiddleware):
        return None, chain, []
    node = _compat.sync_adapter_target(chain)
    above: list[str] = []
    for _ in range(_MAX_DEPTH):
        if node is None:
            return None
        target = _compat.async_adapter_target(node)
        if target is not None:
            return node, target, above
        layer = _compat.unwrap_converted_sync(node)
        if layer is None:
            return None
        inner = _compat.sentry_inner(layer)
        above.append(_name(inner if inner is not None else layer))
        node = getattr(layer, "get_response", None)
    return None


def fuse(handler: Any) -> tuple[FusedMiddleware | None, Verdict]:
    """`fuse_middleware()`, and a verdict for the startup line: what was fused, or why not."""
    chain = _compat.middleware_chain(handler)
    if chain is None:
        return None, Verdict(False, f"{type(handler).__qualname__} has no async middleware chain")
    part = _async_part(chain)
    if part is None:
        return None, Verdict(
            False, f"nothing to fuse: no async-mode middleware in the chain ({_name(chain)} on top)"
        )
    adapter, start, above = part
    if isinstance(start, FusedMiddleware):
        return start, _fused_verdict(start)
    mismatch = _compat.middleware_machinery_mismatch()
    if mismatch is None and adapter is not None:
        mismatch = _compat.async_adapter_mismatch()
    if mismatch is not None:
        return None, Verdict(False, mismatch)
    run = plain_run(start)
    if not run.layers:
        return None, Verdict(
            False, f"nothing to fuse: the outermost middleware is {run.stopped_at or _name(start)}"
        )
    guard = _compat.sentry_middleware_spans_off if run.through_sentry else None
    fused = FusedMiddleware(
        run.layers, run.inner, unfused=start, guard=guard, adapter=adapter, above=above
    )
    if adapter is None:
        _compat.set_middleware_chain(handler, fused)
    else:
        _compat.set_async_adapter_target(adapter, fused)
    return fused, _fused_verdict(fused, run)


def _fused_verdict(fused: FusedMiddleware, run: PlainRun | None = None) -> Verdict:
    names = ", ".join(type(layer).__qualname__ for layer in fused.layers)
    reason = f"{len(fused.layers)} MiddlewareMixin layer(s) in two thread hops ({names})"
    if fused.adapter is not None:
        reason += (
            f", inside {len(fused.above)} layer(s) in sync mode, run as Django runs them "
            f"({', '.join(fused.above)})"
        )
    if run is not None and run.through_sentry:
        reason += f"; {run.through_sentry} of them through Sentry's wrapper (middleware_spans off)"
    if run is not None and run.stopped_at is not None:
        reason += f"; the run stops at {run.stopped_at}"
    return Verdict(True, reason)


def unfuse_middleware(handler: Any) -> None:
    """Give `handler` back the chain Django built, if `fuse_middleware` replaced part of it."""
    chain = _compat.middleware_chain(handler)
    if chain is None:
        return
    part = _async_part(chain)
    if part is None or not isinstance(part[1], FusedMiddleware):
        return
    fused = part[1]
    if fused.adapter is None:
        _compat.set_middleware_chain(handler, fused.unfused)
    else:
        _compat.set_async_adapter_target(fused.adapter, fused.unfused)
