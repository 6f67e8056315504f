"""A sync-only middleware keeping the current request in a ``threading.local``.

Projects do this (audit logs, "current user" helpers): it is only correct if
every sync call of a request runs on one thread that no other request uses
meanwhile.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from django.http import HttpRequest, HttpResponseBase

#: `request`: the request this thread is serving, while the middleware runs.
current = threading.local()


class RequestLocalMiddleware:
    """Sync-only: under ASGI, Django runs it through ``sync_to_async``, on the request thread."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        current.request = request
        try:
            return self.get_response(request)
        finally:
            current.request = None
