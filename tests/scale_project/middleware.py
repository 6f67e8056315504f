"""docs/scale.md's recipe: a database that cannot be reached is a 503, not a 500."""

from __future__ import annotations

from collections.abc import Callable

from django.db import OperationalError
from django.http import HttpRequest, HttpResponse


class DatabaseUnavailableMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, OperationalError):
            response = HttpResponse(
                f"503 Service Unavailable: {type(exception).__name__}\n",
                status=503,
                content_type="text/plain",
            )
            response["Retry-After"] = "1"
            return response
        return None
