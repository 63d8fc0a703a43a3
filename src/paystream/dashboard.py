"""The live dashboard: a snapshot of this instance and the shared database, every second.

Who may read and replay is paystream.access's to say: reading is open on loopback and needs the
operator token beyond it; replaying needs the token in an `X-Paystream-Token` header (a custom
header cannot be sent cross-site without a CORS preflight, which we never grant, and a foreign
Origin is refused outright). Without a token, replay is disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

from paystream.access import Access
from paystream.errors import DatabaseUnavailable, SealedRecordUnreadable
from paystream.monitor import Monitor

Replay = Callable[[int], Awaitable[dict[str, int]]]


@dataclass(frozen=True, slots=True)
class Dashboard:
    """What the page shows (the monitor's snapshot) and what its button does (a replay)."""

    monitor: Monitor
    replay: Replay


def _static(name: str) -> bytes:
    return (resources.files("paystream") / "static" / name).read_bytes()


_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def add_routes(
    app: web.Application, access: Access, current: Callable[[], Dashboard | None]
) -> None:
    """The page, its state, feed and replay; `current` gives the dashboard once the processor
    has one (until then, the routes that need it answer 503)."""

    def state() -> Dashboard:
        found = current()
        if found is None:
            raise web.HTTPServiceUnavailable(
                text='{"error": "starting: waiting for the database"}',
                content_type="application/json",
            )
        return found

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=_static("dashboard.html"), content_type="text/html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ("dashboard.js", "dashboard.css"):
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=_TYPES["." + name.rsplit(".")[-1]])

    async def api_state(_: web.Request) -> web.Response:
        return web.Response(body=state().monitor.latest(), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        """The monitor's snapshots as they are made (one a second, however many pages)."""
        monitor = state().monitor
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            async with contextlib.aclosing(monitor.feed()) as feed:
                async for data in feed:
                    await response.write(b"data: " + data + b"\n\n")
        return response

    async def replay(request: web.Request) -> web.Response:
        if not access.same_origin(request):
            return web.json_response({"error": "cross-site request refused"}, status=403)
        refused = access.refusal(request)
        if refused is not None:
            return refused
        kept_id = request.match_info["id"]
        if not kept_id.isascii() or not kept_id.isdigit() or not 0 < int(kept_id) < 2**63:
            error = {"error": "a kept record's id is a positive integer"}
            return web.json_response(error, status=400)
        try:
            return web.json_response(await state().replay(int(kept_id)))
        except SealedRecordUnreadable as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except DatabaseUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/events", events)
    app.router.add_post("/api/replay/{id}", replay)
