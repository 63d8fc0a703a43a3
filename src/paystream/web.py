"""The processor's HTTP side: Prometheus /metrics and truthful /health/live, /health/ready, and the
dashboard, behind the rules of paystream.access."""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from paystream.access import Access, secure_headers
from paystream.dashboard import Dashboard, add_routes
from paystream.monitor import Checks


class _MalformedRequests(logging.Filter):
    """aiohttp says of a request it could not parse (a line too long, too many headers, bytes
    that are not HTTP) at ERROR, with a traceback that quotes the client's bytes: any anonymous
    client could fill the log and trip alerts. Said at INFO instead, by its kind alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        if not logging.getLogger("paystream").isEnabledFor(logging.INFO):
            return False
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "malformed request refused (400): %s", (type(exc).__name__,)
        record.exc_info, record.exc_text = None, None
        return True


SERVER_LOG = logging.getLogger("paystream.web.server")
"""The web server's own log (aiohttp's, for this server): malformed requests said quietly."""
SERVER_LOG.addFilter(_MalformedRequests())


def make_app(
    ready: Checks, access: Access, dashboard: Callable[[], Dashboard | None] | None = None
) -> web.Application:
    """`dashboard`: the page's state once there is one (its routes answer 503 until then)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def readiness(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    app = web.Application(middlewares=[access.middleware])
    app.on_response_prepare.append(secure_headers)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health/live", live)
    app.router.add_get("/health/ready", readiness)
    if dashboard is not None:
        add_routes(app, access, dashboard)
    return app
