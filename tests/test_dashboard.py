"""The dashboard in a real headless Chromium, and its access rules."""

from __future__ import annotations

import asyncio
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from confluent_kafka import Producer

from paystream_tooling.devenv.processes import free_port
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    caught_up,
    processor,
    wait_http_status,
)

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _produce(env: Env, documents: list[dict[str, object]]) -> None:
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for document in documents:
        producer.produce(env.offline_topic, orjson.dumps(document))
    assert producer.flush(10) == 0


def _offline(pid: str, account_id: int) -> dict[str, object]:
    return {
        "payment_id": pid,
        "account_id": account_id,
        "payment_type": "offline",
        "credit_card": "",
        "amount": 12,
    }


async def test_dashboard_shows_live_numbers_and_replays(
    env: Env, simulator: SimulatorClient
) -> None:
    """The page loads without a CDN, its numbers change as payments flow, the amount waiting on
    a kept payment shows until the replay button stores it once its account exists. Saves
    test-artifacts/dashboard.png."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium: install Debian's 'chromium' package to run the browser test")
    from playwright.async_api import async_playwright

    port = free_port()
    settings = env.settings(web_port=port, operator_token="s3cret-token-of-the-browser-test")

    def stored(count: int) -> str:  # the processor's own count, from 0 when it started
        return f"document.getElementById('t-stored').textContent === '{count:,.0f}'"

    _produce(env, [_offline(f"p{i}", i + 1) for i in range(30)] + [_offline("orphan", 9999)])
    async with processor(settings, serve_web=True):
        await async_wait_for(lambda: caught_up(env, settings), 60, "the first records")
        # The throughput of before the page opened is served with it: the chart is not empty.
        state_url = f"http://127.0.0.1:{port}/api/state"
        await async_wait_for(
            lambda: _history_reaches(state_url, 31), 20, "the snapshot to count the records"
        )
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=chromium, args=CHROMIUM_FLAGS
            )
            try:
                page = await browser.new_page(viewport={"width": 1440, "height": 1000})
                requests: list[str] = []
                page.on("request", lambda request: requests.append(request.url))
                await page.goto(f"http://127.0.0.1:{port}/")
                await _until_shown(page, stored(30), timeout=20_000)
                served = await page.evaluate("history.filter((h) => h.processed === 31).length")
                assert served >= 1  # points made before the page opened
                assert all(url.startswith(f"http://127.0.0.1:{port}/") for url in requests)

                _produce(env, [_offline(f"q{i}", i + 100) for i in range(20)])
                await _until_shown(page, stored(50), timeout=20_000)
                assert "9999" in await page.locator("#latest").inner_text()
                # The orphan's amount waits on its account: money at risk, at a glance.
                await _until_shown(
                    page, "document.getElementById('t-risk').textContent === '12'", timeout=20_000
                )
                assert "1 payment, oldest" in await page.locator("#t-risk-detail").inner_text()

                env.execute("INSERT INTO accounts (account_id, email) VALUES (9999, 'x@y.z')")
                await page.fill("#token", "s3cret-token-of-the-browser-test")
                kept_id = env.query("SELECT id FROM paystream.kept_records")[0][0]
                await page.click(f"button.replay[data-id='{kept_id}']")
                await _until_shown(
                    page,
                    "document.getElementById('replay-result').textContent.includes('stored 1')",
                    timeout=20_000,
                )
                await _until_shown(
                    page,
                    stored(51) + " && document.getElementById('t-risk').textContent === '0'",
                    timeout=20_000,
                )
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            finally:
                await browser.close()
    assert env.query("SELECT resolved_at IS NOT NULL FROM paystream.kept_records") == [(True,)]
    assert env.query("SELECT count(*) FROM payments WHERE payment_id = 'orphan'") == [(1,)]


async def _until_shown(page: Any, expression: str, timeout: float) -> None:
    """Poll an expression on the page until it holds (`timeout` in ms). Asked with evaluate:
    Playwright's wait_for_function polls with an eval, which the page's Content-Security-Policy
    refuses, as it should."""

    async def holds() -> bool:
        return bool(await page.evaluate(expression))

    await async_wait_for(holds, timeout / 1000, expression)


def _history_reaches(url: str, processed: int) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        state = orjson.loads(response.read())
    return any(point["processed"] == processed for point in state.get("history", []))


async def _post(url: str, headers: dict[str, str]) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers) as response:
        return response.status


async def test_replay_needs_the_token_and_refuses_cross_site(env: Env) -> None:
    """Without a configured token the dashboard is read-only; with one, a wrong token is 401 and
    a foreign Origin is 403 even with the right token; no page shows a secret."""
    port = free_port()
    async with processor(env.settings(web_port=port), serve_web=True):
        url = f"http://127.0.0.1:{port}/api/replay/1"
        await wait_http_status(f"http://127.0.0.1:{port}/health/ready", 200)
        assert await _post(url, {"X-Paystream-Token": "anything"}) == 403
    port = free_port()
    token = "t0k-Secret-5521-of-the-replay-test"
    settings = env.settings(web_port=port, operator_token=token, gateway_token="gw-Secret-8804")
    async with processor(settings, serve_web=True):
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/api/replay/1"
        await wait_http_status(f"{base}/health/ready", 200)
        assert await _post(url, {"X-Paystream-Token": "wrong"}) == 401
        assert await _post(url, {"X-Paystream-Token": token, "Origin": "http://evil.test"}) == 403
        assert await _post(url, {"X-Paystream-Token": token}) == 200
        async with aiohttp.ClientSession() as session:
            for path in ("/", "/api/state", "/metrics", "/health/ready"):
                async with session.get(base + path) as response:
                    page = await response.text()
                for secret in (token, "gw-Secret-8804"):
                    assert secret not in page, path


async def _events(url: str, count: int) -> list[dict[str, object]]:
    """The first `count` snapshots of the page's feed."""
    received: list[dict[str, object]] = []
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        async for line in response.content:
            if line.startswith(b"data: "):
                received.append(orjson.loads(line[len(b"data: ") :]))
                if len(received) == count:
                    return received
    raise AssertionError(f"the feed ended after {len(received)} snapshots")


async def test_many_pages_share_one_snapshot_on_one_connection(env: Env) -> None:
    """A dozen open pages: every one receives the same snapshots (made once a second, not once
    a page), and the watching takes one database connection of its own, whatever the number of
    pages."""
    port = free_port()
    async with processor(env.settings(web_port=port), serve_web=True):
        base = f"http://127.0.0.1:{port}"
        await wait_http_status(f"{base}/health/ready", 200)
        pages = [asyncio.create_task(_events(f"{base}/events", 4)) for _ in range(12)]
        await async_wait_for(lambda: all(p.done() for p in pages), 30, "every page's snapshots")
        connections = env.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'paystream-monitor'"
            " AND datname = current_database()"
        )
        feeds = [p.result() for p in pages]
    assert [(1,)] == connections
    # After the first (the latest snapshot when the page opened), each page gets the snapshots
    # as they are made: all pages together saw a handful, not 12 times 3.
    made = {snapshot["at"] for feed in feeds for snapshot in feed[1:]}
    assert len(made) <= 5
    assert all(snapshot["health"] for feed in feeds for snapshot in feed[1:])
    assert all("history" in feed[0] and "history" not in feed[1] for feed in feeds)
