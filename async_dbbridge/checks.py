"""System checks for the ``ASYNC_DBBRIDGE`` setting and the databases it serves."""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.exceptions import ImproperlyConfigured

from .conf import SETTING_NAME, parse_settings

__all__ = ("check_settings",)


@checks.register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: ``ASYNC_DBBRIDGE`` is invalid."""
    from django.conf import settings

    try:
        parse_settings(getattr(settings, SETTING_NAME, None))
    except ImproperlyConfigured as exc:
        return [checks.Error(str(exc), id="async_dbbridge.E001")]
    return []
