"""Drive an ASGI app directly: one HTTP request, or the lifespan protocol."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from async_dbbridge.asgi import ASGIApp


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call_http(
    app: ASGIApp,
    path: str,
    *,
    method: str = "GET",
    on_start: Callable[[], None] | None = None,
) -> Response:
    """Send one request; the client disconnects only once the response is complete."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    sent: list[Mapping[str, Any]] = []
    complete = asyncio.Event()
    body_sent = False

    async def receive() -> MutableMapping[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.start" and on_start is not None:
            on_start()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete.set()

    await app(scope, receive, send)
    start = sent[0]
    return Response(
        status=start["status"],
        headers={name.lower(): value for name, value in start["headers"]},
        body=b"".join(m.get("body", b"") for m in sent[1:]),
    )


class Lifespan:
    """The server side of the lifespan protocol."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[Mapping[str, Any]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def _receive(self) -> dict[str, Any]:
        return await self.to_app.get()

    async def _send(self, message: Mapping[str, Any]) -> None:
        await self.from_app.put(message)

    async def startup(self) -> Mapping[str, Any]:
        scope: dict[str, Any] = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}

        async def run() -> None:
            await self.app(scope, self._receive, self._send)

        self.task = asyncio.create_task(run())
        await self.to_app.put({"type": "lifespan.startup"})
        return await self.from_app.get()

    async def shutdown(self) -> Mapping[str, Any]:
        assert self.task is not None
        await self.to_app.put({"type": "lifespan.shutdown"})
        message = await self.from_app.get()
        await self.task
        return message
