"""The third-party HTTP service: gateway (`POST /payment`), log API (`POST /log`, `GET /logs`),
and the producer behind `GET /start`. FastAPI documents it all at /docs."""

from __future__ import annotations

import contextlib
import html
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from paystream_tooling.simulator.state import Faults, FaultUpdate, Simulator
from paystream_tooling.simulator.streams import Profile


class _Gateway:
    """ASGI middleware that answers `POST /payment` itself, outside the framework, whose routing
    and middleware took two thirds of the simulator's CPU a call: its one thread served at most
    2 900 calls a second, and at a 100 ms latency 256 callers got answers in 114-124 ms (now
    9 000 a second, and 104 ms).

    It also aborts the connection of a share of gateway calls, like a network drop.
    """

    def __init__(self, app: ASGIApp, simulator: Simulator) -> None:
        self.app = app
        self.simulator = simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (scope["type"] == "http" and scope["path"] == "/payment"):
            await self.app(scope, receive, send)
            return
        if self.simulator.roll(self.simulator.faults.drop_rate):
            # `send` is still uvicorn's own here, bound to the connection's transport.
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None:
                transport.abort()
                return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])  # one pass over the request's headers
        given = headers.get(self.simulator.config.auth_header.lower().encode())
        if not self.simulator.authorized(None if given is None else given.decode()):
            await _answer(send, 401, {"error": "missing or wrong credentials"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        key = headers.get(b"idempotency-key")
        traceparent = headers.get(b"traceparent")
        if traceparent is not None:
            self.simulator.traceparents["payment"].append(traceparent.decode("latin-1"))
        status, document = await self.simulator.validate(
            body, None if key is None else key.decode()
        )
        await _answer(send, status, document)


async def _answer(send: Send, status: int, document: dict[str, str]) -> None:
    answer = orjson.dumps(document)
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


_PAGE = """<!doctype html><html><head><title>paystream simulator</title>
<style>body{{font-family:system-ui,sans-serif;max-width:48rem;margin:3rem auto;color:#222}}
a.button{{display:inline-block;padding:.6rem 1.2rem;margin-right:1rem;border-radius:.4rem;
background:#2557a7;color:#fff;text-decoration:none}}table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #ddd;padding:.3rem;text-align:left;font-size:.9rem}}</style></head>
<body><h1>Technical Test Inc. — third-party service</h1>
<p>Gateway <code>POST /payment</code>, log API <code>POST /log</code>.
API docs: <a href="/docs">/docs</a>.</p>
<p><a class="button" href="/start">Start</a><a class="button" href="/logs">Logs</a></p>
{body}</body></html>"""


def create_app(simulator: Simulator) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await simulator.stop_production()

    app = FastAPI(
        title="paystream simulator",
        description="The retailer's third-party service: payment gateway, error log API, producer.",
        lifespan=lifespan,
    )

    _producer_routes(app, simulator)
    _third_party_routes(app, simulator)
    return app


def _producer_routes(app: FastAPI, simulator: Simulator) -> None:
    """The home page, the producer, its ledger and the fault knobs."""

    @app.get("/", response_class=HTMLResponse, summary="Home page with Start and Logs buttons")
    async def home() -> str:
        return _PAGE.format(body="")

    @app.get("/start", summary="Clear payments and logs, then produce the stream to Kafka")
    async def start(
        request: Request,
        profile: Profile | None = None,
        records: Annotated[int | None, Query(ge=1, le=10_000_000)] = None,
        rate: Annotated[
            float | None, Query(ge=0, description="records/s; 0 = as fast as possible")
        ] = None,
        seed: int | None = None,
    ) -> Response:
        production = await simulator.start(
            profile=profile or simulator.config.profile,
            records=records or simulator.config.records,
            rate=simulator.config.rate if rate is None else rate,
            seed=simulator.config.seed if seed is None else seed,
        )
        body = {"started": True, "records": len(production.entries), "profile": production.profile}
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(
                _PAGE.format(body=f"<p>Started: {len(production.entries)} records.</p>")
            )
        return JSONResponse(body)

    @app.get("/status", summary="Progress of the producer")
    async def status() -> dict[str, Any]:
        return simulator.status()

    @app.get("/ledger", summary="Every record produced and the outcome it must have")
    async def ledger() -> Response:
        production = simulator.production
        entries = [] if production is None else [e.as_json() for e in production.entries]
        return Response(
            orjson.dumps({"status": simulator.status(), "records": entries}),
            media_type="application/json",
        )

    @app.get("/faults", summary="Current fault knobs")
    async def get_faults() -> Faults:
        return simulator.faults

    @app.post("/faults", summary="Change fault knobs at run time")
    async def set_faults(update: FaultUpdate) -> Faults:
        changes = update.model_dump(exclude_unset=True)
        simulator.faults = simulator.faults.model_copy(update=changes)
        return simulator.faults


def _third_party_routes(app: FastAPI, simulator: Simulator) -> None:
    """The gateway and the log API, and what they received."""

    @app.post("/payment", summary="Validate a payment: 2XX approves, 4xx declines")
    async def payment(request: Request) -> Response:
        # Documents the call; as the simulator runs, `_Gateway` answers it before this route.
        key = request.headers.get("idempotency-key")
        status, document = await simulator.validate(await request.body(), key)
        return Response(orjson.dumps(document), status, media_type="application/json")

    @app.get("/calls", summary="Gateway calls of one payment, counted by their Idempotency-Key")
    async def calls(payment_id: str) -> dict[str, int]:
        return {
            "" if key is None else key: n
            for (pid, key), n in simulator.gateway_calls.items()
            if pid == payment_id
        }

    @app.get("/traceparents", summary="W3C traceparent headers received, by endpoint")
    async def traceparents() -> dict[str, list[str]]:
        return {name: list(values) for name, values in simulator.traceparents.items()}

    @app.post("/log", status_code=201, summary="Store an error report")
    async def post_log(request: Request) -> Response:
        if not simulator.authorized(request.headers.get(simulator.config.auth_header)):
            return JSONResponse({"error": "missing or wrong credentials"}, status_code=401)
        if simulator.faults.log_outage:
            return JSONResponse({"error": "service unavailable"}, status_code=503)
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            simulator.traceparents["log"].append(traceparent)
        try:
            document = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return JSONResponse({"error": "expected JSON"}, status_code=400)
        if not isinstance(document, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        error_type = document.get("error_type") or document.get("error")
        if error_type not in ("database", "network", "other"):
            return JSONResponse(
                {"error": "error_type (or error) must be database, network or other"},
                status_code=422,
            )
        entry = {
            "payment_id": document.get("payment_id"),
            "error_type": error_type,
            "error": error_type,
            "error_description": document.get("error_description"),
            "created_at": datetime.now(UTC).isoformat(),
        }
        simulator.logs.append(entry)
        return JSONResponse(entry, status_code=201)

    @app.get("/logs", summary="Received error reports: HTML, or JSON with Accept: application/json")
    async def logs(request: Request) -> Response:
        if "application/json" in request.headers.get("accept", ""):
            return Response(orjson.dumps(simulator.logs), media_type="application/json")
        rows = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(e.get(k)))}</td>"
                for k in ("created_at", "payment_id", "error_type", "error_description")
            )
            + "</tr>"
            for e in simulator.logs[-500:]
        )
        table = (
            f"<h2>{len(simulator.logs)} error reports</h2><table><tr><th>at</th><th>payment</th>"
            f"<th>type</th><th>description</th></tr>{rows}</table>"
        )
        return HTMLResponse(_PAGE.format(body=table))


def create_asgi_app(simulator: Simulator) -> ASGIApp:
    """The service as uvicorn runs it: the gateway's calls answered outermost."""
    return _Gateway(create_app(simulator), simulator)
