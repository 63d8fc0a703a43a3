"""The processor's health endpoints tell the truth, and /metrics exposes its counters."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from paystream_tooling.devenv.processes import free_port
from paystream_tooling.devenv.stack import Stack
from tests.conftest import (
    async_wait_for,
    new_env,
    private_postgres,
    processor,
    wait_http_status,
)


async def _metric(url: str, name: str) -> float | None:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


async def test_readiness_follows_the_database(
    stack: Stack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """/health/ready is 200 while the database answers, 503 while it is down, 200 once back;
    /health/live stays 200 throughout. The monitor's gauge follows, and its log says once that
    the database went away and once that it is back."""
    caplog.set_level(logging.INFO, logger="paystream.monitor")
    with private_postgres(tmp_path) as (server, url):
        env = new_env(stack, database_url=url)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        async with processor(env.settings(web_port=port), serve_web=True):
            await wait_http_status(base + "/health/ready", 200)
            server.stop()
            await wait_http_status(base + "/health/ready", 503)

            async def database_down() -> bool:
                return await _metric(base + "/metrics", "paystream_database_up") == 0.0

            async def database_up() -> bool:
                return await _metric(base + "/metrics", "paystream_database_up") == 1.0

            await async_wait_for(database_down, 30, "the monitor to see it down")
            async with aiohttp.ClientSession() as session:
                async with session.get(base + "/health/ready") as response:
                    body = await response.json()
                assert body["checks"] == {"database": False, "broker": True, "intake": True}
                async with session.get(base + "/health/live") as response:
                    assert response.status == 200
                server.start()
                await wait_http_status(base + "/health/ready", 200)
                await async_wait_for(database_up, 30, "the monitor to see it back")
                async with session.get(base + "/metrics") as response:
                    assert response.status == 200
                    assert "paystream_gateway_circuit_open" in await response.text()
    said = [r.getMessage() for r in caplog.records if r.name == "paystream.monitor"]
    assert 1 == sum("the database (dashboard and at-risk gauges) unavailable" in m for m in said)
    assert 1 == sum("the database (dashboard and at-risk gauges) answers again" in m for m in said)
