"""The processor's health endpoints tell the truth, and /metrics exposes its counters."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from paystream_tooling.devenv.processes import free_port
from paystream_tooling.devenv.stack import Stack
from tests.conftest import new_env, private_postgres, processor, wait_http_status


async def test_readiness_follows_the_database(stack: Stack, tmp_path: Path) -> None:
    """/health/ready is 200 while the database answers, 503 while it is down, 200 once back;
    /health/live stays 200 throughout."""
    with private_postgres(tmp_path) as (server, url):
        env = new_env(stack, database_url=url)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        async with processor(env.settings(web_port=port), serve_web=True):
            await wait_http_status(base + "/health/ready", 200)
            server.stop()
            await wait_http_status(base + "/health/ready", 503)
            async with aiohttp.ClientSession() as session:
                async with session.get(base + "/health/ready") as response:
                    body = await response.json()
                assert body["checks"] == {"database": False, "broker": True}
                async with session.get(base + "/health/live") as response:
                    assert response.status == 200
                server.start()
                await wait_http_status(base + "/health/ready", 200)
                async with session.get(base + "/metrics") as response:
                    assert response.status == 200
                    assert "paystream_gateway_circuit_open" in await response.text()
