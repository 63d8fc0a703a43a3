"""No record halts intake: what the database refuses is decided by what it does, not by the
error's class. A record it refuses while it takes records like it is kept with the database's
own words; a database that refuses every payment is waited for, with the stall alarm; and the
gateway is asked once per payment however often the write is retried.

Each test runs the real processor against the real broker and PostgreSQL, the refusals made by
triggers as an operator's policy, an extension or a later constraint would make them."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

from paystream import rules
from paystream.codec import kept_id
from paystream_tooling.devenv.processes import free_port
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    caught_up,
    cli,
    migrated,
    processor,
    produce,
    unreported,
    wait_http_status,
)

# A class of every kind a server raises: data (22, 23, 54), transactions (40), access (42),
# resources (53), state (55), cancelled (57), not supported (0A), PL/pgSQL (P0), internal (XX),
# an operator's own code, and the codes a connection failure or a shutdown has (08, 57P01), said
# here of one record by a server that stays up.
REFUSALS = [
    "08006",
    "57P01",
    "22023",
    "23514",
    "40001",
    "42501",
    "53100",
    "54000",
    "55P03",
    "57014",
    "0A000",
    "P0001",
    "XX000",
    "PS001",
]

_REFUSE_CHOSEN = """
CREATE FUNCTION refuse_chosen() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payment_id LIKE 'refuse-%' THEN
        RAISE EXCEPTION 'refused by policy' USING ERRCODE = split_part(NEW.payment_id, '-', 2);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_chosen BEFORE INSERT ON payments
    FOR EACH ROW EXECUTE FUNCTION refuse_chosen();
CREATE FUNCTION refuse_keeping() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.payment_id LIKE '%-unkeepable' THEN
        RAISE EXCEPTION 'not kept either' USING ERRCODE = 'XX000';
    END IF;
    RETURN NEW;
END $$;
"""

_REFUSE_ALL = """
CREATE FUNCTION refuse_all() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payments are closed' USING ERRCODE = '{code}';
END $$;
CREATE TRIGGER refuse_all BEFORE INSERT ON payments FOR EACH ROW EXECUTE FUNCTION refuse_all();
"""


def _payment(payment_id: str, account_id: int, online: bool = False) -> bytes:
    return orjson.dumps(
        {
            "payment_id": payment_id,
            "account_id": account_id,
            "payment_type": "online" if online else "offline",
            "credit_card": "4847171163467501036" if online else "",
            "amount": 10 + account_id % 50,
        }
    )


def _produce(env: Env, values: list[tuple[str, bytes]]) -> None:
    for topic in {topic for topic, _ in values}:
        produce(env, topic, ((value, None) for to, value in values if to == topic))


async def _drained(env: Env, settings: Any) -> None:
    await async_wait_for(lambda: caught_up(env, settings), 90, "offsets at the end")
    await async_wait_for(lambda: unreported(env) == 0, 60, "every report delivered")


async def test_a_wide_payment_id_among_ordinary_payments_stops_nothing(
    env: Env, simulator: SimulatorClient
) -> None:
    """One offline record whose payment_id is 1 500 characters of 4 bytes (6 000 bytes, over an
    index entry's limit) among 300 ordinary payments: every payment is stored, the wide one is
    kept as invalid with its size, reported once, and found by `paystream show` under the id
    the producer sent."""
    wide = "\U00020000" * 1500
    values = [(env.offline_topic, _payment(f"ordinary-{i}", 1 + i)) for i in range(300)]
    values.insert(150, (env.offline_topic, _payment(wide, 7)))
    _produce(env, values)
    settings = env.settings()
    async with processor(settings):
        await _drained(env, settings)
    assert [(300,)] == env.query("SELECT count(*) FROM payments")
    kept = env.query("SELECT payment_id, reason, description FROM paystream.kept_records")
    assert 1 == len(kept)
    assert (kept_id(wide), "invalid") == kept[0][:2]
    assert "payment_id is 1500 characters (6000 bytes of UTF-8)" in kept[0][2]
    assert [kept_id(wide)] == [e["payment_id"] for e in simulator.logs()]
    shown = cli(env, "show", wide)
    assert 0 == shown.returncode, shown.stderr
    assert "1500 characters" in " ".join(shown.stdout.split())


async def test_a_refusal_of_any_class_keeps_its_record_and_stores_the_rest(
    env: Env, simulator: SimulatorClient
) -> None:
    """A trigger refuses one chosen payment for each SQLSTATE class, and another refuses the
    kept row of one of them: each refused record is kept as database_rejected with its SQLSTATE
    and the database's words, the unkeepable one is kept bare, every other payment is stored,
    each refusal is reported once, and the processor never stops."""
    env.execute(_REFUSE_CHOSEN)
    chosen = [f"refuse-{code}-{i}" for i, code in enumerate(REFUSALS)]
    unkeepable = "refuse-XX000-unkeepable"
    values = [(env.offline_topic, _payment(f"ordinary-{i}", 1 + i)) for i in range(200)]
    for i, payment_id in enumerate([*chosen, unkeepable]):
        values.insert(15 * i + 7, (env.offline_topic, _payment(payment_id, 3 + i)))
    settings = env.settings()
    async with processor(settings):
        # Installed once the processor's migrations have made the table.
        await async_wait_for(lambda: migrated(env), 30, "the migrations")
        env.execute(
            "CREATE TRIGGER refuse_keeping BEFORE INSERT ON paystream.kept_records"
            " FOR EACH ROW EXECUTE FUNCTION refuse_keeping()"
        )
        _produce(env, values)
        await _drained(env, settings)
    assert [(200,)] == env.query("SELECT count(*) FROM payments")
    kept = dict(
        env.query(
            "SELECT payment_id, description FROM paystream.kept_records"
            " WHERE reason = 'database_rejected' AND payment_id IS NOT NULL"
        )
    )
    assert set(chosen) == kept.keys()
    for payment_id in chosen:
        code = payment_id.split("-")[1]
        assert f" {code}: refused by policy" in kept[payment_id]
    bare = env.query("SELECT description, raw FROM paystream.kept_records WHERE payment_id IS NULL")
    assert [(rules.BARE_DESCRIPTION, _payment(unkeepable, 3 + len(chosen)))] == [
        (d, bytes(r)) for d, r in bare
    ]
    reported = sorted(str(e["payment_id"]) for e in simulator.logs())
    assert sorted([*chosen, "None"]) == reported


async def _metric(base: str, name: str) -> list[str]:
    """The lines of a metric's samples on /metrics."""
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        text = await response.text()
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def _json(base: str, path: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(base + path) as response:
        return await response.json()


@pytest.mark.parametrize(
    ("code", "error"),
    [("42501", "InsufficientPrivilege 42501"), ("25006", "ReadOnlySqlTransaction 25006")],
    ids=["permission-revoked", "read-only"],
)
async def test_a_database_that_refuses_every_payment_stalls_intake_with_the_alarm(
    env: Env, simulator: SimulatorClient, code: str, error: str
) -> None:
    """With every payment refused (a permission revoked, or a server turned read-only, as a
    trigger says them), nothing is kept or skipped: the stall alarm is raised in the metric,
    readiness, the dashboard's state and `paystream status`, naming the record and the error;
    once the refusal ends, every payment is stored and the alarm clears. The gateway was asked
    once per online payment, however often the write was retried."""
    env.execute(_REFUSE_ALL.replace("{code}", code))
    online = [f"online-{i}" for i in range(40)]
    values = [
        (env.online_topic, _payment(pid, 11 + i, online=True)) for i, pid in enumerate(online)
    ]
    values += [(env.offline_topic, _payment(f"offline-{i}", 1 + i)) for i in range(60)]
    _produce(env, values)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = env.settings(web_port=port, stall_after_s=1.0, db_retry_max_s=0.5)
    async with processor(settings, serve_web=True):
        await wait_http_status(base + "/health/live", 200)

        async def stalled() -> bool:
            ready = await _json(base, "/health/ready")
            return ready["checks"].get("intake") is False and bool(
                await _metric(base, "paystream_partition_stalled_seconds")
            )

        await async_wait_for(stalled, 60, "the stall alarm")
        state = await _json(base, "/api/state")
        assert state["stalls"]
        for stall in state["stalls"]:
            assert error in stall["error"]
            assert stall["record"].startswith(stall["partition"] + "@")
        assert any(
            f'error="{error}"' in line
            for line in await _metric(base, "paystream_partition_stalled_seconds")
        )
        # In a thread: the processor answering it runs in this event loop.
        status = await asyncio.to_thread(cli, env, "status", PAYSTREAM_WEB_PORT=str(port))
        assert 1 == status.returncode, status.stderr
        said = " ".join(status.stdout.split())
        assert "not ready: database, intake" in said  # refusing writes, and stalled
        assert "stalled" in said
        assert error in said

        failures = _failures(await _all_metrics(base))

        async def retried() -> bool:
            return _failures(await _all_metrics(base)) >= failures + 5

        await async_wait_for(retried, 60, "five more retries of the refused writes")
        assert [(0, 0)] == env.query(
            "SELECT (SELECT count(*) FROM payments), (SELECT count(*) FROM paystream.kept_records)"
        )
        env.execute("DROP TRIGGER refuse_all ON payments")
        await _drained(env, settings)

        async def clear() -> bool:
            ready = await _json(base, "/health/ready")
            return ready["ready"] is True and not await _metric(
                base, "paystream_partition_stalled_seconds"
            )

        await async_wait_for(clear, 30, "the alarm to clear")
    stored = {pid for (pid,) in env.query("SELECT payment_id FROM payments")}
    declined = {pid for (pid,) in env.query("SELECT payment_id FROM paystream.kept_records")}
    assert set(online) <= stored | declined  # the gateway declined a few
    assert not stored & declined
    assert {f"offline-{i}" for i in range(60)} <= stored
    calls = {pid: sum(simulator.gateway_calls(pid).values()) for pid in online}
    assert dict.fromkeys(online, 1) == calls


async def _all_metrics(base: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as response:
        return await response.text()


def _failures(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("paystream_database_failures_total "):
            return float(line.split()[1])
    return 0.0
