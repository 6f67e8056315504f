"""``/ping/``: the harness waits for it before the clients connect."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.urls import path


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


urlpatterns = [path("ping/", ping)]
