"""`paystream prune` against a database the processor wrote: it removes the bookkeeping past the
retention that nothing needs, and never a kept record or a stored payment's origin."""

from __future__ import annotations

import orjson
import pytest

from tests.conftest import Env, async_wait_for, caught_up, cli, processor, produce

OLD = "now() - interval '100 days'"


def _counts(env: Env) -> dict[str, int]:
    tables = ("replays", "done_ranges", "positions", "partition_writers", "payment_origins")
    found = {t: int(env.query(f"SELECT count(*) FROM paystream.{t}")[0][0]) for t in tables}
    found["kept_records"] = int(env.query("SELECT count(*) FROM paystream.kept_records")[0][0])
    found["payments"] = int(env.query("SELECT count(*) FROM payments")[0][0])
    return found


async def test_prune_removes_only_bookkeeping_past_its_retention(env: Env) -> None:
    settings = env.settings()
    payments = [
        {
            "payment_id": f"p-{i}",
            "account_id": 1 + i,
            "payment_type": "offline",
            "credit_card": "",
            "amount": 5,
        }
        for i in range(10)
    ]
    unknown = {**payments[0], "payment_id": "no-account", "account_id": 999_999}
    values = [(orjson.dumps(p), 0) for p in [*payments, unknown]]
    async with processor(settings):
        produce(env, env.offline_topic, values)
        await async_wait_for(lambda: caught_up(env, settings), 60, "the payments")
    [(kept_id,)] = env.query("SELECT id FROM paystream.kept_records")
    # Two replays of the kept record, one past the retention.
    env.execute(
        "INSERT INTO paystream.replays (kept_id, replayed_at, outcome, attempted) VALUES"
        f" (%(id)s, {OLD}, 'kept', true), (%(id)s, now(), 'kept', true)",
        {"id": kept_id},
    )
    # A partition at 50 (moved there by a rebuild, say) with a span wholly below it left over,
    # and one beyond it.
    env.execute(
        'INSERT INTO paystream.positions (topic, "partition", next_offset) VALUES (%(t)s, 2, 50)'
        ' ON CONFLICT (topic, "partition") DO UPDATE SET next_offset = 50',
        {"t": env.offline_topic},
    )
    env.execute(
        "INSERT INTO paystream.done_ranges VALUES (%(t)s, 2, 10, 20), (%(t)s, 2, 60, 70)",
        {"t": env.offline_topic},
    )
    # Positions of a topic no longer read: one untouched for long, with its span and writer,
    # one touched lately; and the read topics' own positions, aged.
    env.execute(
        'INSERT INTO paystream.positions (topic, "partition", next_offset, updated_at) VALUES'
        f" ('gone-long-ago', 0, 7, {OLD}), ('gone-lately', 0, 7, now())"
    )
    env.execute("INSERT INTO paystream.done_ranges VALUES ('gone-long-ago', 0, 9, 12)")
    env.execute(
        'INSERT INTO paystream.partition_writers (topic, "partition", writer)'
        " VALUES ('gone-long-ago', 0, gen_random_uuid())"
    )
    env.execute(f"UPDATE paystream.positions SET updated_at = {OLD} WHERE topic NOT LIKE 'gone-%'")
    # Origins: every one aged; p-1 purged by the retailer; p-2 stored again after a purge (an
    # older origin of it replaced); p-3 purged only lately (its origin is young).
    env.execute(f"UPDATE paystream.payment_origins SET stored_at = {OLD}")
    env.execute("DELETE FROM payments WHERE payment_id IN ('p-1', 'p-3')")
    env.execute("UPDATE paystream.payment_origins SET stored_at = now() WHERE payment_id = 'p-3'")
    env.execute(
        'INSERT INTO paystream.payment_origins (payment_id, topic, "partition", "offset",'
        f' kafka_ts, stored_at) SELECT payment_id, topic, "partition", "offset" + 100,'
        f" kafka_ts, {OLD} - interval '1 day' FROM paystream.payment_origins"
        " WHERE payment_id = 'p-2'"
    )
    before = _counts(env)

    dry = cli(env, "prune", "--older-than-days", "30")
    assert 0 == dry.returncode, dry.stderr
    said = "1 replays, 1 done ranges, 1 positions, 2 origins"
    assert f"would remove {said}: pass --yes" in dry.stderr
    assert before == _counts(env)

    done = cli(env, "prune", "--older-than-days", "30", "--yes")
    assert 0 == done.returncode, done.stderr
    assert f"removed {said}" in done.stdout, done.stdout + done.stderr
    after = _counts(env)
    assert after == {
        **before,
        "replays": before["replays"] - 1,
        "done_ranges": before["done_ranges"] - 2,  # the folded span and the gone topic's
        "positions": before["positions"] - 1,
        "partition_writers": before["partition_writers"] - 1,
        "payment_origins": before["payment_origins"] - 2,
    }
    left = {r[0] for r in env.query("SELECT DISTINCT payment_id FROM paystream.payment_origins")}
    assert {f"p-{i}" for i in range(10)} - {"p-1"} == left
    assert [(1,)] == env.query(
        "SELECT count(*) FROM paystream.payment_origins WHERE payment_id = 'p-2'"
    )
    assert [("gone-lately",)] == env.query(
        "SELECT topic FROM paystream.positions WHERE topic LIKE 'gone-%'"
    )
    again = cli(env, "prune", "--older-than-days", "30", "--yes")
    assert "removed 0 replays, 0 done ranges, 0 positions, 0 origins" in again.stdout


@pytest.mark.parametrize("days", ["0", str(10**12), "1e3", ""])
def test_prune_refuses_a_retention_it_cannot_use(env: Env, days: str) -> None:
    """Under a day, beyond a century (no date is that old), or not a whole number of days: one
    line naming the option, exit 2, nothing removed."""
    refused = cli(env, "prune", "--older-than-days", days, "--yes")
    assert 2 == refused.returncode
    assert "older-than-days" in refused.stderr
    assert "Traceback" not in refused.stderr
