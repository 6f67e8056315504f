"""The Django app: ``"async_dbbridge"`` in ``INSTALLED_APPS`` registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig


class AsyncDBBridgeConfig(AppConfig):
    name = "async_dbbridge"
    verbose_name = "async_dbbridge"
    default = True

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the checks)
