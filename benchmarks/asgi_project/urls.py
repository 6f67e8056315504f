from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("sync/", views.sync_view),
    path("async-orm/", views.async_orm_view),
    path("db-call/", views.db_call_view),
    path("ping/", views.ping),
    path("stats/", views.stats),
]
