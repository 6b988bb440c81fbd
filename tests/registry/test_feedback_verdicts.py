"""Feedback verdicts in the registry, on SQLite and PostgreSQL: the first verdict recorded for a
response is kept and reported to every later call (the gateway's replicas each call with their
own session), exactly one of many concurrent calls records, the row tells which call wrote it,
a recorded verdict never changes, and pruning deletes only what is past the window."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from registry import service
from registry.models import FeedbackVerdict

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


async def record(session, name: str, outcome: str, token: str, at: datetime = NOW) -> str | None:
    return await service.record_verdict(
        session, response_sha256=key(name), outcome=outcome, at=at, token=token
    )


async def test_the_first_verdict_is_kept_and_reported_to_every_later_call(sessions):
    async with sessions() as first:
        assert await record(first, "a", "failure", "call-1") is None
    async with sessions() as second:  # another replica
        again = await record(second, "a", "failure", "call-2")
        other = await record(second, "a", "success", "call-3", NOW + timedelta(seconds=1))
        assert (again, other) == ("failure", "failure")
        assert await record(second, "b", "success", "call-4") is None  # its own response
    async with sessions() as reader:
        rows = (await reader.scalars(select(FeedbackVerdict))).all()
        assert sorted(
            (r.response_sha256, r.outcome, r.recorded_at, r.recorded_by) for r in rows
        ) == sorted([(key("a"), "failure", NOW, "call-1"), (key("b"), "success", NOW, "call-4")])
        # What a caller whose commit raised reads back: whose row it is.
        assert await service.verdict_of(reader, response_sha256=key("a")) == ("failure", "call-1")
        assert await service.verdict_of(reader, response_sha256=key("none")) is None


async def test_of_many_replicas_recording_at_once_exactly_one_records(sessions):
    outcomes = ["success", "failure", "safety_incident", "human_override"] * 2

    async def one(i: int, outcome: str) -> str | None:
        async with sessions() as session:
            return await record(session, "raced", outcome, f"call-{i}")

    answers = await asyncio.gather(*(one(i, o) for i, o in enumerate(outcomes)))
    winners = [i for i, answer in enumerate(answers) if answer is None]
    assert len(winners) == 1, answers
    # Every other caller is told the winner's verdict (its own was not recorded).
    assert answers.count(outcomes[winners[0]]) == len(outcomes) - 1
    async with sessions() as reader:
        found = await service.verdict_of(reader, response_sha256=key("raced"))
        assert found == (outcomes[winners[0]], f"call-{winners[0]}")


async def test_a_recorded_verdict_never_changes(sessions):
    async with sessions() as session:
        await record(session, "c", "success", "call-1")
        row = await session.get(FeedbackVerdict, key("c"))
        assert row is not None
        row.outcome = "failure"
        with pytest.raises(ValueError, match="final"):
            await session.commit()


async def test_pruning_deletes_only_verdicts_recorded_before_the_cutoff(sessions):
    async with sessions() as session:
        for name, age_h in (("old", 200), ("edge", 100), ("new", 1)):
            assert (
                await record(session, name, "success", name, NOW - timedelta(hours=age_h)) is None
            )
        cutoff = NOW - timedelta(hours=100)
        assert await service.prune_verdicts(session, recorded_before=cutoff) == 1
        left = set((await session.scalars(select(FeedbackVerdict.response_sha256))).all())
        assert left == {key("edge"), key("new")}
        assert await service.prune_verdicts(session, recorded_before=cutoff) == 0
        # A pruned response's verdict can be recorded again (only past the window, where the
        # gateway refuses the id before it asks).
        assert await record(session, "old", "failure", "call-2") is None
