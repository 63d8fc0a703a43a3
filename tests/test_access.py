"""The operator surface against the processor's own web server on a real socket: who may read,
who may replay, which Host it answers to, what every answer carries, and what a malformed or
slow client gets. Hostile requests are sent byte for byte where a client library would refuse
to send them."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from paystream.access import SECURITY_HEADERS, Access
from paystream.config import Settings
from paystream_tooling.devenv.processes import free_port
from tests.conftest import Env, processor, wait_http_status

TOKEN = "an-operator-token-of-32-characters"
COMPOSE = Path(__file__).parent.parent / "docker-compose.yml"


async def _raw(port: int, request: bytes, host: str = "127.0.0.1") -> tuple[int, str, bytes]:
    """Send `request` as it is; the answer's status, head and body."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


def _get(path: str, port: int, *headers: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", f"Host: 127.0.0.1:{port}".encode()]
    lines += [*headers, b"Connection: close", b"Content-Length: 0"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.fixture
async def served(env: Env) -> AsyncIterator[int]:
    """A processor on loopback with an operator token; its web port."""
    port = free_port()
    async with processor(env.settings(web_port=port, operator_token=TOKEN), serve_web=True):
        await wait_http_status(f"http://127.0.0.1:{port}/health/ready", 200)
        yield port


async def test_a_foreign_host_is_refused_before_any_route(served: int) -> None:
    """A Host that names neither this server nor an IP address is 400 on every path (DNS
    rebinding); loopback's names and IP addresses are answered."""
    port = served
    for path in ("/", "/api/state", "/events", "/static/dashboard.js", "/metrics"):
        request = _get(path, port).replace(
            f"Host: 127.0.0.1:{port}".encode(), f"Host: rebind.attacker.example:{port}".encode()
        )
        assert 400 == (await _raw(port, request))[0], path
    for host in ("localhost", "127.0.0.1", "[::1]", "10.9.8.7"):
        request = _get("/api/state", port).replace(
            f"Host: 127.0.0.1:{port}".encode(), f"Host: {host}:{port}".encode()
        )
        assert 200 == (await _raw(port, request))[0], host
    replay = _get("/api/replay/1", port, f"X-Paystream-Token: {TOKEN}".encode(), method=b"POST")
    foreign = replay.replace(f"Host: 127.0.0.1:{port}".encode(), b"Host: rebind.example")
    assert 400 == (await _raw(port, foreign + b""))[0]


async def test_replay_checks_origin_by_scheme_host_and_port(served: int) -> None:
    """The page's own origin replays; another scheme, host or port is refused, as is a
    missing token; a proxy's X-Forwarded-Proto says the page's scheme."""
    port = served
    token = f"X-Paystream-Token: {TOKEN}".encode()

    async def replay(*headers: bytes) -> int:
        return (await _raw(port, _get("/api/replay/1", port, *headers, method=b"POST")))[0]

    assert 200 == await replay(token, f"Origin: http://127.0.0.1:{port}".encode())
    assert 200 == await replay(token)
    for origin in (
        f"https://127.0.0.1:{port}",
        f"http://127.0.0.1:{port + 1}",
        "http://127.0.0.1",
        f"http://evil.example:{port}",
        "null",
    ):
        assert 403 == await replay(token, f"Origin: {origin}".encode()), origin
    proxied = (b"X-Forwarded-Proto: https", f"Origin: https://127.0.0.1:{port}".encode())
    assert 200 == await replay(token, *proxied)
    assert 401 == await replay()
    assert 401 == await replay(b"X-Paystream-Token: " + TOKEN[:-1].encode())


async def test_malformed_tokens_and_ids_are_400s_not_500s(
    served: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A token header that is not UTF-8 and kept ids that are no row's (too large, negative,
    not a number) are answered 400, with nothing logged at ERROR."""
    port = served
    caplog.set_level(logging.INFO)
    token = f"X-Paystream-Token: {TOKEN}".encode()
    not_utf8 = _get("/api/replay/1", port, b"X-Paystream-Token: \xff\xfe", method=b"POST")
    assert 400 == (await _raw(port, not_utf8))[0]
    for kept_id in ("99999999999999999999", "9223372036854775808", "-1", "0", "1e3", "%C2%B2"):
        request = _get(f"/api/replay/{kept_id}", port, token, method=b"POST")
        assert 400 == (await _raw(port, request))[0], kept_id
    assert [] == [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_malformed_requests_are_400s_said_quietly_without_the_clients_bytes(
    served: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A request line too long, too many headers, bytes that are not HTTP: 400, logged at
    INFO at most, without what the client sent."""
    port = served
    caplog.set_level(logging.DEBUG)
    marker = "XMARKERX"
    requests = [
        f"GET /{marker * 2000} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode(),
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"".join(f"X-{marker}-{i}: v\r\n".encode() for i in range(300))
        + b"\r\n",
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: {marker * 3000}\r\n\r\n".encode(),
    ]
    for request in requests:
        assert 400 == (await _raw(port, request))[0]
    server_records = [r for r in caplog.records if r.name.startswith("paystream")]
    assert [] == [r.getMessage() for r in server_records if r.levelno > logging.INFO]
    assert not any(
        marker in r.getMessage() or (r.exc_text and marker in r.exc_text) for r in caplog.records
    )


async def test_every_answer_carries_the_security_headers(served: int) -> None:
    """Pages, data, metrics, health, static files and a 404 are not cached, sniffed or framed,
    and the page may load its own files only."""
    port = served
    for path in ("/", "/api/state", "/metrics", "/health/ready", "/static/dashboard.js", "/x"):
        _, head, _ = await _raw(port, _get(path, port))
        for name, value in SECURITY_HEADERS.items():
            assert f"\r\n{name}: {value}".lower() in head.lower(), (path, name)


async def test_slow_clients_are_timed_out(served: int) -> None:
    """Connections that trickle a request's head, or send nothing, are closed by the server
    (10 s idle), each handle freed; the health endpoint answers meanwhile."""
    port = served
    slow = []
    for _ in range(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow.append((reader, writer))

    async def trickle_until_closed(reader: asyncio.StreamReader, writer: Any) -> bool:
        for i in range(60):  # a header a second, never the end of the head
            if reader.at_eof():
                return True
            try:
                writer.write(f"X-{i}: a\r\n".encode())
                await writer.drain()
                if await asyncio.wait_for(reader.read(), 1.0) == b"" or reader.at_eof():
                    return True
            except TimeoutError:
                continue
            except ConnectionError:
                return True
        return False

    closed = asyncio.gather(*(trickle_until_closed(r, w) for r, w in slow))
    assert 200 == (await _raw(port, _get("/health/live", port)))[0]
    assert all(await closed)
    for _, writer in slow:
        writer.close()


def _compose_environment() -> dict[str, str]:
    """The processor's environment in docker-compose.yml, resolved as compose does with none
    of the variables it names set (`${VAR:-default}` → default)."""
    environment = yaml.safe_load(COMPOSE.read_text())["services"]["processor"]["environment"]
    resolved = {}
    for name, value in environment.items():
        resolved[name] = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(value))
    return resolved


async def test_the_compose_files_defaults_give_a_read_only_dashboard(
    env: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """docker-compose.yml's environment, applied as it is (listening beyond loopback, the
    operator token left empty): replay is refused, payment data is not served, health and
    metrics are, and the start-up log says it is read-only."""
    for name, value in _compose_environment().items():
        monkeypatch.setenv(name, value)
    compose = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (None, True) == (compose.operator_token, compose.web_exposed)
    port = free_port()
    here = env.settings(web_port=port)
    settings = compose.model_copy(
        update={
            name: getattr(here, name)
            for name in (
                "kafka_bootstrap_servers",
                "database_url",
                "gateway_url",
                "log_url",
                "group_id",
                "online_topic",
                "offline_topic",
                "web_port",
            )
        }
    )
    caplog.set_level(logging.WARNING, logger="paystream.app")
    async with processor(settings, serve_web=True):
        await wait_http_status(f"http://127.0.0.1:{port}/health/live", 200)
        for request, expected in [
            (_get("/api/replay/1", port, method=b"POST"), 403),
            (_get("/api/replay/1", port, b"X-Paystream-Token: ", method=b"POST"), 403),
            (_get("/api/state", port), 403),
            (_get("/events", port), 403),
            (_get("/metrics", port), 200),
            (_get("/health/live", port), 200),
            (_get("/", port), 200),
        ]:
            status, _, body = await _raw(port, request)
            assert expected == status, request
            if status == 403:
                assert b"PAYSTREAM_OPERATOR_TOKEN" in body
    assert any("read-only" in r.getMessage() for r in caplog.records)


async def test_beyond_loopback_payment_data_needs_the_token(env: Env) -> None:
    """Listening beyond loopback with a token: the state and the feed answer the token only;
    health and metrics stay open."""
    port = free_port()
    settings = env.settings(web_port=port, web_host="0.0.0.0", operator_token=TOKEN)
    async with processor(settings, serve_web=True):
        await wait_http_status(f"http://127.0.0.1:{port}/health/ready", 200)
        token = f"X-Paystream-Token: {TOKEN}".encode()
        assert 401 == (await _raw(port, _get("/api/state", port)))[0]
        assert 401 == (await _raw(port, _get("/api/state", port, b"X-Paystream-Token: x")))[0]
        assert 200 == (await _raw(port, _get("/api/state", port, token)))[0]
        assert 200 == (await _raw(port, _get("/metrics", port)))[0]


_ACCESS = Access(frozenset({"localhost", "127.0.0.1", "::1", ".example.com"}), True, None)


@settings(max_examples=500)
@given(st.text(max_size=80) | st.from_regex(r"[a-z0-9.:\[\]-]{0,40}", fullmatch=True))
def test_any_host_header_is_judged_without_an_error(host: str) -> None:
    """Whatever a Host header holds, the judgement is a yes or a no, never an error; and a
    Host holding anything but a name's, an address's and a port's characters is a no."""
    allowed = _ACCESS.host_allowed(host)
    assert isinstance(allowed, bool)
    if re.search(r"[^A-Za-z0-9.:\[\]-]", host):
        assert not allowed


def test_allowed_names_and_their_subdomains() -> None:
    """An allowed `.example.com` covers it and its subdomains, not a name that merely ends
    alike; ports are ignored; names are compared without case."""
    yes = ["localhost:8000", "LOCALHOST", "example.com", "a.b.Example.com:443", "[::1]:80"]
    no = ["evilexample.com", "example.com.evil", "", ":80", "[::1", "local host", "x:port"]
    no += ["evil@localhost", "localhost\x00", "127.0.0.1%2f", "rebind.attacker.example"]
    assert [True] * len(yes) == [_ACCESS.host_allowed(h) for h in yes]
    assert [False] * len(no) == [_ACCESS.host_allowed(h) for h in no]
