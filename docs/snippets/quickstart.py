# myapp/views.py — an async view on the bridge, and a sync view
from django.http import HttpRequest, JsonResponse

from async_dbbridge import db_call, db_sync_to_async
from myapp.models import Item


def top_items(limit: int) -> list[dict[str, object]]:
    rows = Item.objects.order_by("-value").values("name", "value")
    return list(rows[:limit])


async def items(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"items": await db_call(top_items, 10)})


def item_count(request: HttpRequest) -> JsonResponse:
    # A sync view: under the wrapper its connection comes from the same pool.
    return JsonResponse({"count": Item.objects.count()})


@db_sync_to_async
def add_item(name: str) -> int:
    return Item.objects.create(name=name).pk
