"""What an operator sees: `paystream show` trails, `paystream errors` that never truncates
silently, the money at risk in metrics and on the dashboard, and kept records sealed at rest."""

from __future__ import annotations

import asyncio
import base64
import os
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Producer

from paystream.sealing import key_id
from paystream_tooling.devenv.processes import free_port
from tests.conftest import (
    Env,
    SimulatorClient,
    async_wait_for,
    caught_up,
    cli,
    drain,
    processor,
)

CARD = "4111111111111111"


def _produce(env: Env, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": env.bootstrap})
    for value in values:
        producer.produce(env.offline_topic, value)
    assert 0 == producer.flush(10)


def _offline(pid: str, account_id: int, amount: int) -> bytes:
    document = {
        "payment_id": pid,
        "account_id": account_id,
        "payment_type": "offline",
        "credit_card": CARD,
        "amount": amount,
    }
    return orjson.dumps(document)


async def _process(env: Env, **overrides: Any) -> None:
    await drain(env, env.settings(**overrides))


async def test_show_follows_a_payment_through_a_duplicate_and_a_replay(
    env: Env, simulator: SimulatorClient
) -> None:
    """`paystream show` lists every record that carried a payment_id with its outcome, its
    report and its replays; no card number; exit 1 for an id no record carried."""
    _produce(
        env,
        [_offline("p-dup", 1, 10), _offline("p-dup", 1, 11), _offline("p-late", 5555, 30)],
    )
    await _process(env)

    dup = cli(env, "show", "p-dup", "--json")
    assert 0 == dup.returncode, dup.stderr
    trail = orjson.loads(dup.stdout)
    assert 1 == trail["stored"]["account_id"]
    assert 1 == len(trail["kept"])
    kept = trail["kept"][0]
    assert ("duplicate", "other", True) == (kept["reason"], kept["error_type"], kept["reported"])
    # The two records sit on partitions of their own: either may be the one stored.
    assert {10, 11} == {trail["stored"]["amount"], kept["amount"]}
    assert kept["record_time"] is not None
    assert kept["reported_at"] is not None
    assert trail["stored"]["record"] != f"{kept['topic']}/{kept['partition']}@{kept['offset']}"

    env.execute("INSERT INTO accounts (account_id, email) VALUES (5555, 'late@example.com')")
    replayed = cli(env, "replay", "--reason", "unknown_account")
    assert 0 == replayed.returncode, replayed.stderr
    late = orjson.loads(cli(env, "show", "p-late", "--json").stdout)
    assert 5555 == late["stored"]["account_id"]
    assert ["stored"] == [r["outcome"] for r in late["kept"][0]["replay_history"]]
    assert late["kept"][0]["resolved_at"] is not None

    table = cli(env, "show", "p-late")
    assert 0 == table.returncode, table.stderr
    assert "stored" in table.stdout
    assert "unknown_account" in table.stdout
    for output in (dup.stdout, table.stdout):
        assert CARD not in output
    missing = cli(env, "show", "never-seen")
    assert 1 == missing.returncode
    assert "no record carried payment_id 'never-seen'" in missing.stdout


async def test_errors_says_what_its_limit_left_out(env: Env, simulator: SimulatorClient) -> None:
    """A listing cut by --limit says "N of M shown" (in the table, or on stderr for --json and
    --jsonl); --all lists every row; --jsonl streams one object a line."""
    _produce(env, [b"not json %d" % i for i in range(5)])
    await _process(env)

    table = cli(env, "errors", "--limit", "2")
    assert 0 == table.returncode, table.stderr
    assert "2 of 5 kept records shown" in table.stdout
    assert "--all" in table.stdout
    assert "5 kept records" in cli(env, "errors", "--all").stdout

    cut = cli(env, "errors", "--json", "--limit", "2")
    assert 2 == len(orjson.loads(cut.stdout))
    assert "2 of 5 shown" in cut.stderr

    lines = cli(env, "errors", "--jsonl", "--all")
    assert 0 == lines.returncode, lines.stderr
    rows = [orjson.loads(line) for line in lines.stdout.splitlines()]
    assert 5 == len(rows)
    assert {"malformed"} == {r["reason"] for r in rows}
    assert "shown" not in lines.stderr


async def test_show_lists_every_record_of_a_payment_however_many(
    env: Env, simulator: SimulatorClient
) -> None:
    """A payment_id that 2 500 kept records carried (more than a page of the listing): the trail
    shows every one of them, none cut off."""
    _produce(env, [b"not json"])
    await _process(env)  # the schema is the processor's own
    env.execute(
        'INSERT INTO paystream.kept_records (topic, "partition", "offset", kafka_ts,'
        " payment_id, error_type, reason, description)"
        " SELECT 'elsewhere', 0, g, 1, 'p-many', 'other', 'duplicate', 'seen before'"
        " FROM generate_series(1, 2500) AS g"
    )
    trail = cli(env, "show", "p-many", "--json")
    assert 0 == trail.returncode, trail.stderr
    records = orjson.loads(trail.stdout)["kept"]
    assert list(range(1, 2501)) == sorted(r["offset"] for r in records)


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        body: bytes = response.read()
    return body


def _at_risk(port: int) -> dict[str, float]:
    """The at-risk gauges of reason unknown_account, by name."""
    samples = {}
    for line in _get(port, "/metrics").decode().splitlines():
        if line.startswith("paystream_kept_") and 'reason="unknown_account"' in line:
            name, value = line.rsplit(" ", 1)
            samples[name.split("{")[0]] = float(value)
    return samples


def _kept_on_page(port: int) -> dict[str, dict[str, Any]]:
    """The dashboard's kept records by reason, from its latest snapshot."""
    state = orjson.loads(_get(port, "/api/state"))
    return {k["reason"]: k for k in state.get("database", {}).get("kept", [])}


async def test_money_waiting_shows_in_metrics_and_on_the_dashboard(
    env: Env, simulator: SimulatorClient
) -> None:
    """Unresolved kept payments are counted, summed and aged by reason in the metrics and the
    dashboard's state; once a replay resolves them the numbers fall to zero with no traffic."""
    port = free_port()
    settings = env.settings(web_port=port)
    _produce(env, [_offline(f"risk-{n}", 7000 + n, n * 10) for n in (1, 2, 3)])
    count, amount, age = (
        "paystream_kept_unresolved",
        "paystream_kept_unresolved_amount",
        "paystream_kept_oldest_unresolved_age_seconds",
    )
    async with processor(settings, serve_web=True):
        await async_wait_for(lambda: caught_up(env, settings), 60, "offsets at the end")
        await async_wait_for(
            lambda: (3, 60) == (_at_risk(port).get(count), _at_risk(port).get(amount)),
            30,
            "the gauges to count and sum the waiting payments",
        )
        # The processor runs in this event loop: its pages are read from another thread.
        assert (await asyncio.to_thread(_at_risk, port))[age] > 0
        # The page's snapshot is made once a second: it may lag the gauges by one.
        await async_wait_for(
            lambda: "unknown_account" in _kept_on_page(port), 10, "the page's next snapshot"
        )
        row = (await asyncio.to_thread(_kept_on_page, port))["unknown_account"]
        assert (3, 60, True) == (row["unresolved"], row["unresolved_amount"], row["waits"])
        assert row["oldest_unresolved_s"] > 0

        for n in (1, 2, 3):
            env.execute(
                "INSERT INTO accounts (account_id, email) VALUES (%s, %s)",
                (7000 + n, f"r{n}@example.com"),
            )
        result = await asyncio.to_thread(cli, env, "replay", "--reason", "unknown_account")
        assert 0 == result.returncode, result.stderr
        await async_wait_for(
            lambda: {count: 0, amount: 0, age: 0} == _at_risk(port),
            30,
            "the gauges to fall to zero with no traffic",
        )


def _key_file(folder: Path, *keys: bytes) -> Path:
    path = folder / f"keys-{len(keys)}-{keys[-1][:2].hex()}"
    path.write_text("".join(base64.b64encode(k).decode() + "\n" for k in keys))
    return path


async def test_kept_records_are_sealed_at_rest_and_open_only_to_replay(
    env: Env, simulator: SimulatorClient, tmp_path: Path
) -> None:
    """With a key file, no card number is readable in kept_records; a replay without the key,
    or with the wrong one, fails in one sentence and changes nothing; with the key (after a
    rotation too) it stores the payment."""
    old, new = os.urandom(32), os.urandom(32)
    _produce(env, [_offline("sealed-1", 8123, 25), b'{"credit_card": "' + CARD.encode() + b'"'])
    await _process(env, kept_key_file=_key_file(tmp_path, old))

    assert [(2, 2, 0)] == env.query(
        "SELECT count(*), count(*) FILTER (WHERE raw_key = %s),"
        " count(*) FILTER (WHERE position(%s::bytea IN raw) > 0) FROM paystream.kept_records",
        (key_id(old), CARD.encode()),
    )
    before = env.query("SELECT id, raw, reason, replays FROM paystream.kept_records ORDER BY id")
    env.execute("INSERT INTO accounts (account_id, email) VALUES (8123, 'sealed@example.com')")

    without = cli(env, "replay")
    assert 2 == without.returncode
    assert "is sealed with key" in without.stderr
    assert "set PAYSTREAM_KEPT_KEY_FILE" in without.stderr
    wrong = cli(env, "replay", PAYSTREAM_KEPT_KEY_FILE=str(_key_file(tmp_path, new)))
    assert 2 == wrong.returncode
    assert "which PAYSTREAM_KEPT_KEY_FILE does not hold" in wrong.stderr
    for failed in (without, wrong):
        assert CARD not in failed.stderr + failed.stdout
    assert before == env.query(
        "SELECT id, raw, reason, replays FROM paystream.kept_records ORDER BY id"
    )
    assert [(0,)] == env.query("SELECT count(*) FROM payments")

    rotated = _key_file(tmp_path, old, new)
    replayed = cli(env, "replay", PAYSTREAM_KEPT_KEY_FILE=str(rotated))
    assert 0 == replayed.returncode, replayed.stderr
    assert [("sealed-1", 25)] == env.query("SELECT payment_id, amount::int FROM payments")
    assert [("malformed", 1)] == env.query(
        "SELECT reason, replays FROM paystream.kept_records WHERE resolved_at IS NULL"
    )
