"""Replicas starting together against one registry all pin the same base row.

Each start calls register_base_model in its own session; when they race, one inserts and the
others must find its row (by name, or by digest when it was committed between their two
reads, or after their own insert lost), never fail start-up. CI saw exactly that failure:
two gateways on one PostgreSQL, the second refusing with "these weights are already
registered as <its own name>"."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry import service
from registry.compat import BaseModelFingerprint
from registry.errors import BaseModelMismatch, DuplicateBaseModel

REPLICAS = 8


def another_base(base_fp: BaseModelFingerprint) -> BaseModelFingerprint:
    """The tiny base's fingerprint with its own digests (each test registers a new base)."""
    return dataclasses.replace(
        base_fp, weights_sha256=uuid.uuid4().hex * 2, tokenizer_sha256=uuid.uuid4().hex * 2
    )


async def start(
    sessions: async_sessionmaker[AsyncSession], name: str, fingerprint: BaseModelFingerprint
) -> int:
    async with sessions() as session:
        row = await service.register_base_model(
            session, name=name, fingerprint=fingerprint, actor="system"
        )
        return row.id


@pytest.mark.parametrize("attempt", range(5))
async def test_concurrent_starts_get_the_one_row(
    sessions: async_sessionmaker[AsyncSession], base_fp: BaseModelFingerprint, attempt: int
) -> None:
    name, fingerprint = f"race-{uuid.uuid4().hex[:8]}", another_base(base_fp)
    ids = await asyncio.gather(*(start(sessions, name, fingerprint) for _ in range(REPLICAS)))
    assert len(set(ids)) == 1
    async with sessions() as session:
        audit = await service.list_audit(session, action="base_model.register")
        assert sum(e.target == f"base:{name}" for e in audit) == 1  # inserted once


async def test_a_racing_start_with_other_bytes_is_still_refused(
    sessions: async_sessionmaker[AsyncSession], base_fp: BaseModelFingerprint
) -> None:
    name, genuine = f"race-{uuid.uuid4().hex[:8]}", another_base(base_fp)
    flipped = dataclasses.replace(genuine, weights_sha256=uuid.uuid4().hex * 2)
    outcomes = await asyncio.gather(
        start(sessions, name, genuine), start(sessions, name, flipped), return_exceptions=True
    )
    # Whichever inserted first decides; the other start is refused, by name, never served.
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], BaseModelMismatch), outcomes
    # The same weights under a second name stay refused too.
    with pytest.raises(DuplicateBaseModel, match="already registered as"):
        winner = genuine if isinstance(outcomes[1], BaseException) else flipped
        await start(sessions, f"{name}-alias", winner)
