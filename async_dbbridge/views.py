"""A JSON status endpoint for a live server process: mount it in your URLconf.

```python
# Not runnable: a project's urls.py.
from django.urls import path

from async_dbbridge.views import status

urlpatterns = [path("-/dbbridge/", status)]
```

Nothing is served unless you mount it. By default only an active staff user
may read it (others get 403); `status_view(allow=...)` makes one with another
rule, e.g. a token header checked by your own function. The report is the
process's own: under `--workers N` each request sees the worker that served
it (its `pid` says which). It names aliases and thread names, never hosts,
users or passwords.
"""

from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from ._status import snapshot

__all__ = ("is_staff", "status", "status_view")


def is_staff(request: HttpRequest) -> bool:
    """The default rule: an authenticated, active staff user."""
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


def status_view(
    allow: Callable[[HttpRequest], bool] = is_staff,
) -> Callable[[HttpRequest], HttpResponse]:
    """A status view that serves the report to requests `allow(request)` accepts, else 403."""

    @never_cache
    @require_GET
    def view(request: HttpRequest) -> HttpResponse:
        if not allow(request):
            return JsonResponse({"error": "forbidden"}, status=403)
        return JsonResponse(snapshot())

    return view


#: The staff-only status view (`status_view()` with the default rule).
status = status_view()
