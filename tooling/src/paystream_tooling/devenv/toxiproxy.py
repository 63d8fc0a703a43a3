"""Toxiproxy (Shopify's TCP fault proxy) as a child process, driven over its HTTP API: proxies
that slow a link down (latency with jitter) without breaking it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from paystream_tooling.devenv.processes import ChildProcess, free_port


class Toxiproxy:
    def __init__(self, binary: Path, home: Path) -> None:
        self.binary = binary
        self.home = home
        self.port = free_port()
        self._process: ChildProcess | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [str(self.binary), "-host", "127.0.0.1", "-port", str(self.port)]
        self._process = ChildProcess("toxiproxy", argv, self.home / "toxiproxy.log")
        self._process.wait_until(self._answers, 30, "answering its API")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.api + "/version", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.api + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
        return json.loads(text) if text else None

    def proxy(self, name: str, listen: str, upstream: str) -> None:
        """A proxy from `listen` to `upstream` (host:port each), replacing one of that name."""
        try:
            self._request("DELETE", f"/proxies/{name}")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        self._request("POST", "/proxies", {"name": name, "listen": listen, "upstream": upstream})

    def slow(self, proxy: str, latency_ms: int, jitter_ms: int) -> None:
        """Delay what the upstream sends back by latency ± jitter (a round trip that long)."""
        toxic = {
            "name": "slow",
            "type": "latency",
            "stream": "downstream",
            "toxicity": 1.0,
            "attributes": {"latency": latency_ms, "jitter": jitter_ms},
        }
        self._request("POST", f"/proxies/{proxy}/toxics", toxic)

    def unslow(self, proxy: str) -> None:
        self._request("DELETE", f"/proxies/{proxy}/toxics/slow")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None
