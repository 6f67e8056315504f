"""Products with a stock count, and the orders that draw it down."""

from __future__ import annotations

from typing import ClassVar

from django.db import models


class Product(models.Model):
    name = models.CharField(max_length=100, unique=True)
    price = models.DecimalField(max_digits=10, decimal_places=2)
    stock = models.PositiveIntegerField(default=0)

    # Declared rather than implied: mypy's django plugin is configured with the
    # test settings, which do not install this app, so it cannot add it.
    objects: ClassVar[models.Manager[Product]] = models.Manager()

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name


class Order(models.Model):
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="orders")
    quantity = models.PositiveIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects: ClassVar[models.Manager[Order]] = models.Manager()

    class Meta:
        ordering = ("-created_at", "-id")

    def __str__(self) -> str:
        return f"order {self.pk}: {self.quantity} unit(s)"
