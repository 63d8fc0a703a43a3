"""Who may use the processor's web server, and what every answer of it carries.

- **Host.** Only the names the server is reached by (loopback's, PAYSTREAM_WEB_ALLOWED_HOSTS) or
  an IP address: any other Host is answered 400 before a route runs. A page on another site can
  point a name it controls at this machine (DNS rebinding) and read what it answers; it cannot
  make the browser send this server's own name or address as the Host.
- **Payment data** (the dashboard's state and feed): open on loopback; beyond it, only with the
  operator token in the `X-Paystream-Token` header, and never without a token configured.
  Health and metrics stay open everywhere: they carry no payment data.
- **Replay**: the operator token, and, when the browser names one, the page's own origin (scheme,
  host and port).
- **Every answer**: not cached, not sniffed, not framed, and the page may load its own files only.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import SecretStr

from paystream.config import Settings

TOKEN_HEADER = "X-Paystream-Token"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
}

_HOST_CHARS = re.compile(r"[A-Za-z0-9.:\[\]-]+")

PAYMENT_DATA = frozenset({"/api/state", "/events"})
"""The paths whose answers hold payment ids, amounts and error texts."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Access:
    """The web server's rules, from the settings (`of`)."""

    allowed_hosts: frozenset[str]
    exposed: bool
    token: SecretStr | None

    @classmethod
    def of(cls, settings: Settings) -> Access:
        return cls(settings.allowed_hosts, settings.web_exposed, settings.operator_token)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request's Host header names this server: an IP address, or an allowed
        name (`.example.com` allows it and its subdomains)."""
        if host is None or not _HOST_CHARS.fullmatch(host):
            return False  # a name, an address and a port hold nothing else (no userinfo)
        try:
            name = urlsplit("//" + host).hostname
        except ValueError:  # a port that is not a number, an unclosed bracket
            return False
        if not name:
            return False
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            return True
        if name in self.allowed_hosts:
            return True
        return any(
            allowed.startswith(".") and (name == allowed[1:] or name.endswith(allowed))
            for allowed in self.allowed_hosts
        )

    def refusal(self, request: web.Request) -> web.Response | None:
        """Why the request may not have what needs the operator token, as the answer to give;
        None when it may. A header that is not UTF-8 is a malformed request (400)."""
        if self.token is None:
            return web.json_response(
                {
                    "error": "no PAYSTREAM_OPERATOR_TOKEN is set: replay is disabled, and payment"
                    " data is served on loopback only (bind to 127.0.0.1, or set a token)"
                },
                status=403,
            )
        try:
            given = request.headers.get(TOKEN_HEADER, "").encode()
        except UnicodeEncodeError:
            return web.json_response({"error": f"{TOKEN_HEADER} is not UTF-8"}, status=400)
        if not hmac.compare_digest(given, self.token.get_secret_value().encode()):
            return web.json_response({"error": "missing or wrong operator token"}, status=401)
        return None

    def same_origin(self, request: web.Request) -> bool:
        """Whether the request's Origin, if the browser sent one, is this page's own: scheme,
        host and port (the scheme as a proxy in front says it, X-Forwarded-Proto, which a page
        on another site cannot set without a preflight we never grant)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme).lower()
        return origin.lower() == f"{scheme}://{request.host}".lower()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.host_allowed(request.host):
            return web.json_response(
                {"error": "this server does not answer to that Host (PAYSTREAM_WEB_ALLOWED_HOSTS)"},
                status=400,
            )
        if self.exposed and request.path in PAYMENT_DATA:
            refused = self.refusal(request)
            if refused is not None:
                return refused
        return await handler(request)


async def secure_headers(_: web.Request, response: web.StreamResponse) -> None:
    """Every answer's security headers (the app's on_response_prepare signal)."""
    response.headers.update(SECURITY_HEADERS)
