"""The processor's health endpoints tell the truth, and /metrics exposes its counters."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp

from paystream.devenv.processes import free_port
from paystream.devenv.stack import Stack
from tests.conftest import new_env, private_postgres, processor


async def _get(url: str) -> tuple[int, dict[str, object] | str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def test_readiness_follows_the_database(stack: Stack, tmp_path: Path) -> None:
    """/health/ready is 200 while the database answers, 503 while it is down, 200 once back;
    /health/live stays 200 throughout."""
    with private_postgres(tmp_path) as (server, url):
        env = new_env(stack, database_url=url)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        async with processor(env.settings(web_port=port), serve_web=True):

            async def status(path: str) -> int:
                code, _ = await _get(base + path)
                return code

            async def wait_status(path: str, expected: int, timeout_s: float = 30) -> None:
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline:
                    with contextlib.suppress(aiohttp.ClientError):
                        if await status(path) == expected:
                            return
                    await asyncio.sleep(0.05)  # poll interval, not a synchronisation
                raise AssertionError(f"{path} did not answer {expected} within {timeout_s} s")

            await wait_status("/health/ready", 200)
            server.stop()
            await wait_status("/health/ready", 503)
            code, body = await _get(base + "/health/ready")
            assert (code, body["checks"]["database"]) == (503, False)  # type: ignore[index]
            assert await status("/health/live") == 200
            server.start()
            await wait_status("/health/ready", 200)
            code, text = await _get(base + "/metrics")
            assert code == 200
            assert "paystream_gateway_circuit_open" in str(text)
