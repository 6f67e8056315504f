from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("hold/<str:name>/", views.hold),
    path("count/", views.count),
    path("acount/", views.acount),
    path("catch/", views.catch),
    path("span/<str:name>/", views.span),
    path("peek/", views.peek),
    path("aquery-twice/<str:name>/", views.aquery_twice),
    path("whoami/<str:name>/", views.whoami),
    path("backend/", views.backend),
    path("state/<int:value>/", views.state),
    path("db-call/", views.db_call_view),
    path("write/", views.write),
    path("other/", views.other),
]
