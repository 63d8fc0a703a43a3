"""The HTTP client for the third party's gateway and log API, and the one way both are called:
a POST of a JSON body whose answer is its status (and, for a redirect, where to), or Unanswered.

Both peers are treated as possibly hostile or broken: a redirect is never followed (the body,
card number included, would be sent wherever it points, and that server's 2XX would count as
the gateway's), and no more than MAX_ANSWER_BYTES of an answer is read.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import RequestError
from pyreqwest.response import Response

from paystream.errors import ConfigurationError, Unanswered

_JSON_HEADERS = {"Content-Type": "application/json"}

MAX_ANSWER_BYTES = 64 * 1024
"""What is read of an answer's body (paystream needs only its status): enough for any error page
whose connection is worth keeping; past it the connection is dropped. A gateway or a proxy in
front of it answering 256 calls at once with huge bodies cannot exhaust memory."""

_HOST = re.compile(r"[A-Za-z0-9.:\[\]-]{1,300}")


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer as paystream reads it."""

    status: int
    redirect_host: str | None = None
    """For a 3xx: the host its Location names (`the same host` when relative), safe to log."""

    @property
    def redirected(self) -> bool:
        return 300 <= self.status < 400

    def describe(self) -> str:
        """The answer in a description's words: the status, and for a redirect its target."""
        if self.redirected:
            return f"HTTP {self.status}, a redirect to {self.redirect_host} (not followed)"
        return f"HTTP {self.status}"


def third_party_client(
    connections: int,
    headers: Mapping[str, str] | None = None,
    ca_file: Path | None = None,
) -> Client:
    """The HTTP client for the third party's gateway and log API: every call carries `headers`
    (its credentials), and HTTPS trusts `ca_file`'s certificates besides the system's. The bench
    measures the gateway's capacity through one made here, sending the body the processor sends.
    """
    builder = (
        ClientBuilder()
        .max_connections(connections)
        .follow_redirects(False)
        # A SYN nobody answers (the provider's host partitioned away): fail the attempt after
        # 2 s so the retries and the circuit breaker act, instead of spending the whole call
        # timeout on a connection that will never open. Loopback or a LAN connects in < 1 ms,
        # an intercontinental TLS endpoint in ~0.3 s.
        .connect_timeout(timedelta(seconds=2))
        # Pooled connections that died silently while idle are found by keepalive probes
        # (5 s idle, then 3 probes 2 s apart: 11 s) and dropped, instead of each costing a
        # payment a timed-out attempt after a partition heals.
        .tcp_keepalive(timedelta(seconds=5))
        .tcp_keepalive_interval(timedelta(seconds=2))
        .tcp_keepalive_retries(3)
    )
    builder = builder.default_headers({**_JSON_HEADERS, **(headers or {})})
    if ca_file is not None:
        try:
            bundle = ca_file.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"Cannot read PAYSTREAM_THIRD_PARTY_CA_FILE ({ca_file}): "
                f"{exc.strerror or type(exc).__name__}."
            ) from exc
        builder = builder.add_root_certificate_pem(bundle)
    return builder.build()


async def post(
    client: Client,
    url: str,
    body: bytes,
    timeout: timedelta,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """POST a JSON body; the answer, of whose body at most MAX_ANSWER_BYTES are read."""
    request = (
        client.post(url)
        .body_bytes(body)
        .timeout(timeout)
        .streamed_read_buffer_limit(MAX_ANSWER_BYTES)
    )
    for name, value in (headers or {}).items():
        request = request.header(name, value)
    try:
        async with request.build_streamed() as response:
            await _read_bounded(response)
            return Answer(response.status, _redirect_host(response))
    except TimeoutError as exc:
        raise Unanswered("timed out", timed_out=True) from exc
    except RequestError as exc:
        raise Unanswered(f"connection failed ({type(exc).__name__})", timed_out=False) from exc


async def _read_bounded(response: Response) -> None:
    """Read the body to its end (the connection is then reused) unless it is longer than
    MAX_ANSWER_BYTES: leaving the rest unread drops the connection when the response closes."""
    length = response.get_header("Content-Length")
    if length is not None and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
        return
    read = 0
    while read <= MAX_ANSWER_BYTES and (chunk := await response.body_reader.read_chunk()):
        read += len(chunk)


def _redirect_host(response: Response) -> str | None:
    """Where a 3xx points, as a host safe to log: a peer's header may hold anything."""
    if not 300 <= response.status < 400:
        return None
    location = response.get_header("Location")
    if not location:
        return "nowhere (no Location)"
    try:
        target = urllib.parse.urlsplit(location)
        host, port = target.hostname, target.port
    except ValueError:
        return "an unreadable host"
    if not target.netloc:
        return "the same host"
    if host is None or not _HOST.fullmatch(host):
        return "an unreadable host"
    return host if port is None else f"{host}:{port}"
