"""System checks for the ``ASYNC_DBBRIDGE`` setting and the databases it serves."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .conf import SETTING_NAME, parse_settings

__all__ = ("check_settings",)


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: ``ASYNC_DBBRIDGE`` is invalid. W001: lanes asked for, but asgiref is too old."""
    from django.conf import settings

    from ._lanes import LANES_SUPPORTED

    try:
        parsed = parse_settings(getattr(settings, SETTING_NAME, None))
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="async_dbbridge.E001")]
    if parsed.lanes and not LANES_SUPPORTED:
        return [
            checks.Warning(
                f"{SETTING_NAME}['LANES'] is {parsed.lanes}, but request lanes need "
                "asgiref >= 3.13 (ThreadSensitiveContext(executor=...)).",
                hint="Upgrade asgiref. Until then each request runs on its own thread, "
                "whose connections are closed when the request ends (no reuse), "
                f"or set {SETTING_NAME}['LANES'] = 0 to silence this.",
                id="async_dbbridge.W001",
            )
        ]
    return []
