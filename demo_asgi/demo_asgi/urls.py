"""URLs: the dashboard, one endpoint per way to reach the database, and /stats."""

from __future__ import annotations

from django.urls import path
from shop import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("stats", views.stats, name="stats"),
    path("load", views.load, name="load"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("products/db-call", views.products_db_call, name="products-db-call"),
    path("products/sync-to-async", views.products_sync_to_async, name="products-sync-to-async"),
    path("products/sync", views.products_sync, name="products-sync"),
    path("products/async-orm", views.products_async_orm, name="products-async-orm"),
    path("orders", views.orders, name="orders"),
]
