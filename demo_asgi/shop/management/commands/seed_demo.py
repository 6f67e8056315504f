"""``manage.py seed_demo``: create the demo products; safe to run again."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from shop.models import Order, Product

#: (name, price). Every product starts with STOCK units.
PRODUCTS = (
    ("Anchor", "12.50"),
    ("Barometer", "89.00"),
    ("Compass", "24.90"),
    ("Deck shoes", "64.00"),
    ("Echo sounder", "349.00"),
    ("Fender", "19.95"),
    ("Gimbal lamp", "42.00"),
    ("Halyard", "31.20"),
    ("Inflatable", "499.00"),
    ("Jib sheet", "27.80"),
    ("Knot board", "15.00"),
    ("Life jacket", "79.00"),
)
STOCK = 1000


class Command(BaseCommand):
    help = "Create the demo products (idempotent; --reset restores stock and deletes orders)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--reset",
            action="store_true",
            help=f"Set every demo product's stock back to {STOCK} and delete all orders.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        created = 0
        with transaction.atomic():
            if options["reset"]:
                Order.objects.all().delete()
            for name, price in PRODUCTS:
                product, was_created = Product.objects.get_or_create(
                    name=name, defaults={"price": Decimal(price), "stock": STOCK}
                )
                created += was_created
                if options["reset"] and not was_created:
                    product.stock = STOCK
                    product.save(update_fields=["stock"])
        self.stdout.write(
            f"seed_demo: {created} product(s) created, {Product.objects.count()} in total, "
            f"{Order.objects.count()} order(s)"
        )
