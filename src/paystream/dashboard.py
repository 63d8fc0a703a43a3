"""The live dashboard: a snapshot of this instance and the shared database, every second.

Reading needs no credentials. Replaying needs the operator token (PAYSTREAM_OPERATOR_TOKEN) in an
`X-Paystream-Token` header: a custom header cannot be sent cross-site without a CORS preflight,
which we never grant, and a foreign Origin is refused outright. Without a token, read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web
from pydantic import SecretStr

from paystream.errors import DatabaseUnavailable, SealedRecordUnreadable
from paystream.monitor import Monitor

Replay = Callable[[int], Awaitable[dict[str, int]]]


@dataclass(frozen=True, slots=True)
class Dashboard:
    """What the page shows (the monitor's snapshot) and what its button does (a replay)."""

    monitor: Monitor
    operator_token: SecretStr | None
    replay: Replay


def _static(name: str) -> bytes:
    return (resources.files("paystream") / "static" / name).read_bytes()


_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def add_routes(app: web.Application, state: Dashboard) -> None:
    async def page(_: web.Request) -> web.Response:
        return web.Response(body=_static("dashboard.html"), content_type="text/html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ("dashboard.js", "dashboard.css"):
            raise web.HTTPNotFound()
        return web.Response(body=_static(name), content_type=_TYPES["." + name.rsplit(".")[-1]])

    async def api_state(_: web.Request) -> web.Response:
        return web.Response(body=state.monitor.latest(), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        """The monitor's snapshots as they are made (one a second, however many pages)."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            async with contextlib.aclosing(state.monitor.feed()) as feed:
                async for data in feed:
                    await response.write(b"data: " + data + b"\n\n")
        return response

    async def replay(request: web.Request) -> web.Response:
        token = state.operator_token
        if token is None:
            return web.json_response(
                {"error": "read-only: set PAYSTREAM_OPERATOR_TOKEN to enable replay"}, status=403
            )
        origin = request.headers.get("Origin")
        if origin is not None and origin.split("://", 1)[-1] != request.host:
            return web.json_response({"error": "cross-site request refused"}, status=403)
        given = request.headers.get("X-Paystream-Token", "")
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            return web.json_response({"error": "missing or wrong operator token"}, status=401)
        try:
            kept_id = int(request.match_info["id"])
        except ValueError:
            raise web.HTTPBadRequest() from None
        try:
            return web.json_response(await state.replay(kept_id))
        except SealedRecordUnreadable as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except DatabaseUnavailable as exc:
            return web.json_response({"error": str(exc)}, status=503)

    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/events", events)
    app.router.add_post("/api/replay/{id}", replay)
