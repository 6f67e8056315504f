from __future__ import annotations

from django.contrib import admin
from django.urls import path

from .benchapp import views

urlpatterns = [
    # As startproject leaves it: the admin is part of the project's shape.
    path("admin/", admin.site.urls),
    path("io/", views.io_view),
    path("query-io-query/", views.query_io_query),
    path("one-query/sync/", views.one_query_sync),
    path("one-query/async/", views.one_query_async),
    path("slow-query/", views.slow_query),
    path("whoami/", views.whoami),
    path("ping/", views.ping),
    path("stats/", views.stats),
]
