"""A sync-only middleware that queries the database, as many real ones do."""

from __future__ import annotations

import threading
from collections.abc import Callable

from django.db import transaction
from django.http import HttpRequest, HttpResponseBase

from tests.testapp.models import Item


class SyncQueryMiddleware:
    """Sync-only: under ASGI, Django runs it through ``sync_to_async`` — on the request thread."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path.startswith("/in-transaction/"):
            # The rest of the request inside this middleware's transaction: its
            # connection cannot be given back until the view is done.
            with transaction.atomic():
                Item.objects.exists()
                response = self.get_response(request)
            return response
        Item.objects.exists()
        thread = threading.current_thread().name
        response = self.get_response(request)
        response["X-Middleware-Thread"] = thread
        return response
