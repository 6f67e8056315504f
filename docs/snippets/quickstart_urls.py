# mysite/urls.py — replaces the file startproject wrote
from django.urls import path

from myapp import views

urlpatterns = [
    path("items/", views.items),
    path("items/count/", views.item_count),
]
