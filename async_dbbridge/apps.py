"""The Django app: ``"async_dbbridge"`` in ``INSTALLED_APPS`` registers the system checks."""

from __future__ import annotations

from django.apps import AppConfig


class AsyncDBBridgeConfig(AppConfig):
    name = "async_dbbridge"
    verbose_name = "async_dbbridge"
    default = True

    def ready(self) -> None:
        from . import _stranded, checks  # noqa: F401  (checks: registers the checks)

        # CLOSE_STRANDED: the receiver is connected at import; this reads the setting.
        _stranded.configure()
