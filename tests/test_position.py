"""Where a partition is read from and what an instance knows it made durable (paystream.position):
pure, no broker, no database."""

from __future__ import annotations

import pytest

from paystream.position import Commits, Progress, Source, Start, resolve


def _ends(*offsets: tuple[int, int]) -> dict[tuple[str, int], int]:
    return {("t", p): o for p, o in offsets}


def test_offsets_advance_only_over_finished_batches() -> None:
    """A batch finishing before an older one moves nothing until the older one finishes."""
    progress = Progress()
    first, second = progress.begin({}), progress.begin({})
    progress.finish(second, _ends((0, 11), (1, 6)), {("t", 0): 0, ("t", 1): 0})
    assert {} == progress.durable
    progress.finish(first, _ends((0, 4), (2, 8)), {("t", 0): 0, ("t", 2): 0})
    assert {("t", 0): 11, ("t", 1): 6, ("t", 2): 8} == progress.durable


def test_a_batch_fetched_before_a_restart_no_longer_moves_the_partition() -> None:
    """After reading a partition restarts (a rewind), a batch fetched before it is durable but
    says nothing of where this instance reads now; until it ends the partition is unsettled."""
    progress = Progress()
    key = ("t", 0)
    old = progress.begin(progress.epochs([key]))
    progress.restart(key, 100)
    assert not progress.settled(key)
    new = progress.begin(progress.epochs([key]))
    progress.finish(old, _ends((0, 501)), {key: 0})
    assert progress.settled(key)
    assert 100 == progress.durable[key]
    progress.finish(new, _ends((0, 151)), progress.epochs([key]))
    assert 151 == progress.durable[key]


@pytest.mark.parametrize(
    ("recorded", "committed", "low", "high", "start"),
    [
        (40, 40, 0, 100, Start(offset=40, source=Source.RECORDED)),
        (None, 40, 0, 100, Start(offset=40, source=Source.COMMITTED)),
        (None, None, 7, 100, Start(offset=7, source=Source.EARLIEST)),
        (30, 40, 0, 100, Start(offset=30, source=Source.RECORDED, behind_by=10)),
        (50, 40, 0, 100, Start(offset=50, source=Source.RECORDED)),
        (10, 40, 25, 100, Start(offset=25, source=Source.RECORDED, expired=(10, 24), behind_by=30)),
        (None, 10, 25, 100, Start(offset=25, source=Source.COMMITTED, expired=(10, 24))),
        (100, 100, 0, 100, Start(offset=100, source=Source.RECORDED)),
        (150, 150, 0, 20, Start(offset=0, source=Source.RECORDED, beyond_end=True)),
        (None, 150, 3, 20, Start(offset=3, source=Source.COMMITTED, beyond_end=True)),
    ],
    ids=[
        "recorded",
        "upgrade-from-committed",
        "new-group-from-earliest",
        "database-behind-the-group",
        "database-ahead-of-the-group",
        "expired-and-behind",
        "expired-while-stopped",
        "at-the-end",
        "topic-created-again",
        "committed-past-the-end",
    ],
)
def test_a_start_is_chosen_from_the_database_first(
    recorded: int | None, committed: int | None, low: int, high: int, start: Start
) -> None:
    """The database's position first, the group's offset only when it has none, the log start
    when neither; records wanted but gone from the log are a gap; a position past the end
    reads the log from its start."""
    assert start == resolve(recorded, committed, low, high)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


K0, K1 = ("t", 0), ("t", 1)


def test_only_owned_partitions_beyond_the_group_are_committed() -> None:
    """A commit covers partitions owned now, and only offsets past the group's committed offset:
    it never moves the group back."""
    commits = Commits(clock=Clock())
    commits.assigned([K0, K1], {K0: 50})
    assert {K1: 10} == commits.due({K0: 40, K1: 10, ("t", 2): 99})
    commits.sending({K0: 60})
    assert {} == commits.due({K0: 60})
    commits.answered({K0: 60}, {})
    assert 60 == commits.committed(K0)
    assert {K0: 61} == commits.due({K0: 61})


def test_a_rebalance_between_a_batch_start_and_end_commits_nothing_of_the_old_share() -> None:
    """A partition revoked while its batch ran: the batch ends durable, but its offset is not
    committed (its new owner commits from its own start); an answer to a commit of it later
    changes nothing."""
    commits = Commits(clock=Clock())
    commits.assigned([K0, K1], {})
    commits.sending({K0: 5})
    commits.revoked([K0])
    assert {K1: 3} == commits.due({K0: 10, K1: 3})
    commits.answered({}, {K0: 5})


def test_one_commit_is_on_its_way_at_a_time() -> None:
    """While a commit waits for its answer nothing more is sent, not even the last one: two on
    their way can land out of order. No answer within `answer_s` counts as a failure."""
    clock = Clock()
    commits = Commits(retry_s=1.0, answer_s=60.0, clock=clock)
    commits.assigned([K0, K1], {})
    commits.sending({K0: 5})
    assert commits.on_its_way
    assert {} == commits.due({K0: 9, K1: 3})
    assert {} == commits.due({K0: 9, K1: 3}, last=True)
    commits.answered({K0: 5}, {})
    assert not commits.on_its_way
    assert {K0: 9, K1: 3} == commits.due({K0: 9, K1: 3})
    commits.sending({K0: 9, K1: 3})
    clock.now += 59.9
    assert {} == commits.due({K0: 12, K1: 3})
    clock.now += 0.1
    assert {} == commits.due({K0: 12, K1: 3})  # failed: its pause comes first
    assert not commits.on_its_way
    clock.now += 1.0
    assert {K0: 12, K1: 3} == commits.due({K0: 12, K1: 3})


def test_a_commit_that_failed_or_was_not_sent_waits_its_pause_except_the_last() -> None:
    """After a failed answer or a commit that could not be sent, nothing is sent for `retry_s`
    on the clock; the last commit, on the way out, is sent regardless."""
    clock = Clock()
    commits = Commits(retry_s=1.0, clock=clock)
    commits.assigned([K0], {})
    commits.sending({K0: 5})
    commits.answered({}, {K0: 5})
    assert {} == commits.due({K0: 5})
    assert {K0: 5} == commits.due({K0: 5}, last=True)
    clock.now += 1.0
    assert {K0: 5} == commits.due({K0: 5})
    commits.sending({K0: 5})
    commits.not_sent({K0: 5})
    assert {} == commits.due({K0: 6})
    clock.now += 1.0
    assert {K0: 6} == commits.due({K0: 6})
