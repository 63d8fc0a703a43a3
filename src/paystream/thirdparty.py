"""The HTTP client for the third party's gateway and log API, and the one way both are called:
a POST of a JSON body whose answer is its status, or Unanswered."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from pyreqwest.client import Client, ClientBuilder
from pyreqwest.exceptions import RequestError

from paystream.errors import ConfigurationError, Unanswered

_JSON_HEADERS = {"Content-Type": "application/json"}


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
) -> int:
    """POST a JSON body and read the whole answer; its HTTP status."""
    request = client.post(url).body_bytes(body).timeout(timeout)
    for name, value in (headers or {}).items():
        request = request.header(name, value)
    try:
        response = await request.build().send()
    except TimeoutError as exc:
        raise Unanswered("timed out", timed_out=True) from exc
    except RequestError as exc:
        raise Unanswered(f"connection failed ({type(exc).__name__})", timed_out=False) from exc
    return response.status
