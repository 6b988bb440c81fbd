"""Base models: registered once from a fingerprint, then pinned by their weights digest.

At start the gateway fingerprints the checkpoint it serves and calls `register_base_model`:
the first start records it; later starts find the same digest and change nothing; a checkpoint
whose bytes differ from what was registered under that name raises BaseModelMismatch, and the
gateway must refuse to start (seed §1: one flipped bit halts init).
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from registry.compat.fingerprint import BaseModelFingerprint
from registry.compat.problems import Problem, ProblemCode
from registry.errors import (
    BaseModelMismatch,
    BaseModelNotFound,
    DuplicateBaseModel,
    InvalidName,
)
from registry.models import Adapter, BaseModel
from registry.naming import validate_base_name
from registry.service.audit import record


def _mismatches(row: BaseModel, fingerprint: BaseModelFingerprint) -> list[Problem]:
    problems = []
    if row.weights_sha256 != fingerprint.weights_sha256:
        problems.append(
            Problem(
                ProblemCode.BASE_MISMATCH,
                f"base {row.name!r} is registered with weights sha256 {row.weights_sha256[:16]}… "
                f"but the served checkpoint hashes to {fingerprint.weights_sha256[:16]}…",
            )
        )
    if row.tokenizer_sha256 != fingerprint.tokenizer_sha256:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"base {row.name!r} is registered with tokenizer {row.tokenizer_sha256[:16]}… but "
                f"the served tokenizer is {fingerprint.tokenizer_sha256[:16]}…",
            )
        )
    return problems


async def _registered(
    session: AsyncSession, *, name: str, fingerprint: BaseModelFingerprint
) -> BaseModel | None:
    """The row already recorded for this base, checked against the fingerprint; None if the
    name and the weights are both unrecorded. Raises BaseModelMismatch (same name, other
    bytes) or DuplicateBaseModel (these weights under another name)."""
    existing = await session.scalar(select(BaseModel).where(BaseModel.name == name))
    if existing is None:
        # Looked up by digest too: a replica that started at the same moment may have
        # committed the same base between the two reads, under this very name.
        existing = await session.scalar(
            select(BaseModel).where(BaseModel.weights_sha256 == fingerprint.weights_sha256)
        )
        if existing is not None and existing.name != name:
            raise DuplicateBaseModel(f"these weights are already registered as {existing.name!r}")
    if existing is not None:
        problems = _mismatches(existing, fingerprint)
        if problems:
            raise BaseModelMismatch(problems)
    return existing


async def register_base_model(
    session: AsyncSession, *, name: str, fingerprint: BaseModelFingerprint, actor: str
) -> BaseModel:
    """Record the base, or return it unchanged if already registered with the same digests.

    Idempotent under concurrency: replicas starting together against one database all get
    the one row, whichever of them inserted it."""
    validate_base_name(name)
    existing = await _registered(session, name=name, fingerprint=fingerprint)
    if existing is not None:
        return existing
    taken = await session.scalar(select(Adapter.name).where(Adapter.name == name))
    if taken is not None:
        # `model: name` would reach this base: the adapter's callers would silently get the
        # base model's answers instead of their adapter's.
        raise InvalidName(f"base name {name!r} is taken by adapter {taken!r}; serve it as another")
    row = BaseModel(
        name=name,
        weights_sha256=fingerprint.weights_sha256,
        tokenizer_sha256=fingerprint.tokenizer_sha256,
        model_type=fingerprint.model_type,
        hidden_size=fingerprint.hidden_size,
        intermediate_size=fingerprint.intermediate_size,
        num_layers=fingerprint.num_layers,
        num_heads=fingerprint.num_heads,
        num_kv_heads=fingerprint.num_kv_heads,
        head_dim=fingerprint.head_dim,
        vocab_size=fingerprint.vocab_size,
        modules={m: [d.in_features, d.out_features] for m, d in fingerprint.modules.items()},
        special_tokens=sorted(fingerprint.special_tokens),
        weight_files=list(fingerprint.weight_files),
    )
    session.add(row)
    record(
        session,
        actor=actor,
        action="base_model.register",
        target=f"base:{name}",
        details={"weights_sha256": row.weights_sha256, "tokenizer_sha256": row.tokenizer_sha256},
    )
    try:
        await session.commit()
    except IntegrityError:
        # Another replica inserted first: its row decides, exactly as if it had been there
        # before this call (the same base is returned, another one refused).
        await session.rollback()
        existing = await _registered(session, name=name, fingerprint=fingerprint)
        if existing is None:
            raise DuplicateBaseModel(f"base {name!r} was registered concurrently") from None
        return existing
    return row


async def get_served_base(session: AsyncSession, *, fingerprint: BaseModelFingerprint) -> BaseModel:
    """The registered row for the checkpoint actually served; its digests must match exactly."""
    row = await session.scalar(
        select(BaseModel).where(BaseModel.weights_sha256 == fingerprint.weights_sha256)
    )
    if row is None:
        raise BaseModelNotFound(
            f"the served base (weights sha256 {fingerprint.weights_sha256[:16]}…) is not "
            "registered; call register_base_model first"
        )
    problems = _mismatches(row, fingerprint)
    if problems:
        raise BaseModelMismatch(problems)
    return row


async def get_base_model(session: AsyncSession, *, name: str) -> BaseModel:
    row = await session.scalar(select(BaseModel).where(BaseModel.name == name))
    if row is None:
        raise BaseModelNotFound(f"base model {name!r} is not registered")
    return row


async def list_base_models(session: AsyncSession) -> list[BaseModel]:
    return list((await session.scalars(select(BaseModel).order_by(BaseModel.name))).all())
