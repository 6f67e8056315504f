from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("primary/", views.primary),
    path("replica/", views.replica),
    path("iterate/", views.iterate),
    path("async/", views.primary_async),
    path("backend/", views.backend),
    path("slow/", views.slow),
]
