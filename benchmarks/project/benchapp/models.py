from __future__ import annotations

from typing import ClassVar

from django.db import models


class Item(models.Model):
    """The table the views read: a few rows."""

    name = models.CharField(max_length=50)
    value = models.IntegerField(default=0)

    # Declared for mypy: the type checker's settings (tests.settings) do not
    # install this app, so django-stubs would not add the default manager.
    objects: ClassVar[models.Manager[Item]] = models.Manager()

    def __str__(self) -> str:
        return self.name
