"""Hostile or broken third parties, faked at the transport: a small aiohttp app on a free port
that answers as told and records what it received."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from paystream_tooling.devenv.processes import free_port

Answer = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


@dataclass
class Peer:
    url: str
    received: list[tuple[str, bytes]] = field(default_factory=list)
    """(path, body) of every request, in order."""


@contextlib.asynccontextmanager
async def peer(answer: Answer) -> AsyncIterator[Peer]:
    """A server on 127.0.0.1 that records each POST and answers it with `answer`."""
    port = free_port()
    server = Peer(url=f"http://127.0.0.1:{port}")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        server.received.append((request.path, body))
        return await answer(request, body)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield server
    finally:
        await runner.cleanup()


def status(code: int, **headers: str) -> Answer:
    """Answer every request with `code` (and `headers`), an empty body."""

    async def answer(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(status=code, headers=headers)

    return answer
