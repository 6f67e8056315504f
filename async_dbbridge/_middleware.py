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


def plain_run(chain: AsyncHandler) -> tuple[list[MiddlewareMixin], AsyncHandler]:
    """The outermost run of plain `MiddlewareMixin` layers of `chain`, and what they wrap."""
    layers: list[MiddlewareMixin] = []
    handler = chain
    while True:
        layer = _compat.unwrap_converted(handler)
        if layer is None or not _is_plain_mixin(layer):
            return layers, handler
        layers.append(layer)
        handler = layer.get_response


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
    ) -> None:
        if not layers:
            raise ValueError("FusedMiddleware needs at least one layer")
        self.layers: tuple[MiddlewareMixin, ...] = tuple(layers)
        self.inner = inner
        self.unfused = unfused
        # One SyncToAsync each, reused: it keeps no per-call state (asgiref
        # 3.13 copies the caller's context per call).
        self._request_phase = sync_to_async(self._process_requests, thread_sensitive=True)
        self._response_phase = sync_to_async(self._process_responses, thread_sensitive=True)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
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


def fuse(handler: Any) -> tuple[FusedMiddleware | None, Verdict]:
    """`fuse_middleware()`, and a verdict for the startup line: what was fused, or why not."""
    chain = _compat.middleware_chain(handler)
    if chain is None:
        return None, Verdict(False, f"{type(handler).__qualname__} has no async middleware chain")
    if isinstance(chain, FusedMiddleware):
        return chain, _fused_verdict(chain)
    mismatch = _compat.middleware_machinery_mismatch()
    if mismatch is not None:
        return None, Verdict(False, mismatch)
    layers, inner = plain_run(chain)
    if not layers:
        first = getattr(chain, "__wrapped__", chain)  # past Django's exception wrapper
        what = getattr(first, "__qualname__", None) or type(first).__qualname__
        return None, Verdict(
            False, f"the outermost middleware, {what}, is not a plain MiddlewareMixin"
        )
    fused = FusedMiddleware(layers, inner, unfused=chain)
    _compat.set_middleware_chain(handler, fused)
    return fused, _fused_verdict(fused)


def _fused_verdict(fused: FusedMiddleware) -> Verdict:
    names = ", ".join(type(layer).__qualname__ for layer in fused.layers)
    return Verdict(
        True, f"{len(fused.layers)} MiddlewareMixin layer(s) in two thread hops ({names})"
    )


def unfuse_middleware(handler: Any) -> None:
    """Give `handler` back the chain Django built, if `fuse_middleware` replaced it."""
    chain = _compat.middleware_chain(handler)
    if isinstance(chain, FusedMiddleware):
        _compat.set_middleware_chain(handler, chain.unfused)
