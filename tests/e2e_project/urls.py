from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("sync-query/", views.sync_query),
    path("async-orm/", views.async_orm),
    path("db-call/", views.db_call_view),
    path("atomic-write/", views.atomic_write),
    path("combo/", views.combo),
    path("in-transaction/combo/", views.combo),
    path("threads/", views.threads),
    path("nested/", views.nested),
    path("pure-async/", views.pure_async),
    path("default-executor/", views.default_executor),
    path("gate/<str:name>/", views.gate),
    path("stream/<str:name>/", views.stream),
    path("async-stream/<str:name>/", views.async_stream),
    path("long-poll/<str:name>/", views.long_poll),
    path("backend/", views.backend),
    path("leave-atomic/", views.leave_atomic),
]
