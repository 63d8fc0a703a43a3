"""The processor's HTTP side: Prometheus /metrics and truthful /health/live, /health/ready."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from paystream.dashboard import Dashboard, add_routes
from paystream.monitor import Checks


def make_app(ready: Checks, dashboard: Dashboard | None = None) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readiness(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", readiness)
    if dashboard is not None:
        add_routes(app, dashboard)
    return app
