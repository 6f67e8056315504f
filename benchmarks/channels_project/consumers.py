"""The consumer both variants serve: each message runs a 20 ms query and answers its session id."""

from __future__ import annotations

import json
from typing import Any

from channels.generic import websocket
from django.db import connection

from async_dbbridge.integrations import channels as integration

QUERY_SECONDS = 0.02


def slow_query() -> int:
    """``pg_sleep(0.02)`` / ``SLEEP(0.02)``; the server's id for the session that ran it."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT pg_backend_pid(), pg_sleep(%s)", [QUERY_SECONDS])
        else:
            cursor.execute("SELECT CONNECTION_ID(), SLEEP(%s)", [QUERY_SECONDS])
        row: Any = cursor.fetchone()
        return int(row[0])


class OwnConsumer(websocket.WebsocketConsumer):
    """Channels' own: every handler on asgiref's one thread, close_old_connections() around it."""

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.send(text_data=json.dumps({"backend": slow_query()}))


class BridgeConsumer(integration.WebsocketConsumer):
    """The same handler on the integration's consumer: handlers on the bridge."""

    def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        self.send(text_data=json.dumps({"backend": slow_query()}))
