"""Dataset n-gram filters in the registry (registry/ngram_filter.py): registered by an admin
from `loraplex datasets build-filter`, read when a version's eval suite is checked against the
datasets its Adaptation Card names."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from registry.errors import InvalidInput, NotFound
from registry.models import DatasetNgramFilter, utcnow
from registry.ngram_filter import (
    MAX_FALSE_POSITIVE_RATE,
    NGRAM_WORDS,
    BadFilter,
    FilterHeader,
    NgramFilter,
    decode,
)
from registry.service.audit import record
from registry.service.lineage import dataset_digest


class NgramFilterNotFound(NotFound):
    pass


def read_ngram_filter(
    data: bytes, *, dataset_sha256: str
) -> tuple[FilterHeader, NgramFilter, float]:
    """A filter file checked for registration (CPU-bound on a large filter: a caller on an
    event loop runs it in a thread): its header, filter and measured false-positive rate.
    Raises InvalidInput when it is malformed, names another dataset, or is too full to judge
    with."""
    digest = dataset_digest(dataset_sha256)
    try:
        header, ngram_filter = decode(data)
    except BadFilter as exc:
        raise InvalidInput(str(exc)) from None
    if header.dataset_sha256 != digest:
        raise InvalidInput(
            f"the filter was built from dataset sha256:{header.dataset_sha256}, not {digest}"
        )
    if header.ngram_words != NGRAM_WORDS:
        raise InvalidInput(
            f"the filter holds {header.ngram_words}-word sequences; suites are judged on "
            f"{NGRAM_WORDS}-word ones"
        )
    if not header.ngrams or not ngram_filter.bits.any():
        raise InvalidInput("the filter holds nothing: a check against it could find nothing")
    rate = ngram_filter.false_positive_rate()
    if rate > MAX_FALSE_POSITIVE_RATE:
        raise InvalidInput(
            f"the filter's false-positive rate is {rate:.2%} (more than "
            f"{MAX_FALSE_POSITIVE_RATE:.0%}): build it with more bytes"
        )
    return header, ngram_filter, rate


async def register_ngram_filter(
    session: AsyncSession,
    *,
    header: FilterHeader,
    ngram_filter: NgramFilter,
    false_positive_rate: float,
    actor: str,
) -> DatasetNgramFilter:
    """Store (or replace) a dataset's filter, as read_ngram_filter returned it."""
    try:
        return await _store(session, header, ngram_filter, false_positive_rate, actor)
    except IntegrityError:  # another call registered the dataset's first filter meanwhile
        await session.rollback()
        return await _store(session, header, ngram_filter, false_positive_rate, actor)


async def _store(
    session: AsyncSession,
    header: FilterHeader,
    ngram_filter: NgramFilter,
    rate: float,
    actor: str,
) -> DatasetNgramFilter:
    digest = header.dataset_sha256
    values: dict[str, Any] = dict(
        ngram_words=header.ngram_words,
        hash_count=header.hash_count,
        bit_count=header.bit_count,
        false_positive_rate=rate,
        ngrams=header.ngrams,
        texts=header.texts,
        lines=header.lines,
        dataset_bytes=header.dataset_bytes,
        # The received bytes themselves (the filter reads them in place): no copy.
        bits=ngram_filter.bits.base
        if isinstance(ngram_filter.bits.base, bytes)
        else ngram_filter.bits.tobytes(),
        registered_by=actor[:200],
        registered_at=utcnow(),
    )
    row = await session.get(DatasetNgramFilter, digest)
    replaced = row is not None
    if row is None:
        row = DatasetNgramFilter(dataset_sha256=digest, **values)
        session.add(row)
    else:
        for key, value in values.items():
            setattr(row, key, value)
    record(
        session,
        actor=actor,
        action="register_ngram_filter",
        target=f"dataset:{digest}",
        details={
            "replaced": replaced,
            "ngram_words": header.ngram_words,
            "bit_count": header.bit_count,
            "false_positive_rate": rate,
            "ngrams": header.ngrams,
            "dataset_bytes": header.dataset_bytes,
        },
    )
    await session.commit()
    return row


async def get_ngram_filter_info(
    session: AsyncSession, *, dataset_sha256: str
) -> DatasetNgramFilter:
    """The filter's description (its bits are not loaded). Raises NgramFilterNotFound."""
    digest = dataset_digest(dataset_sha256)
    row = await session.get(DatasetNgramFilter, digest)
    if row is None:
        raise NgramFilterNotFound(f"no n-gram filter is registered for dataset sha256:{digest}")
    return row


async def load_ngram_filters(
    session: AsyncSession, *, dataset_sha256s: list[str]
) -> dict[str, tuple[DatasetNgramFilter, NgramFilter]]:
    """The filters registered for these datasets (those without one are absent)."""
    if not dataset_sha256s:
        return {}
    rows = await session.scalars(
        select(DatasetNgramFilter)
        .options(undefer(DatasetNgramFilter.bits))
        .where(DatasetNgramFilter.dataset_sha256.in_(dataset_sha256s))
    )
    found = {}
    for row in rows:
        bits = NgramFilter.from_bytes(row.ngram_words, row.hash_count, row.bits)
        found[row.dataset_sha256] = (row, bits)
    return found


async def delete_ngram_filter(
    session: AsyncSession, *, dataset_sha256: str, actor: str
) -> DatasetNgramFilter:
    """The filter deleted (its description). Raises NgramFilterNotFound."""
    row = await get_ngram_filter_info(session, dataset_sha256=dataset_sha256)
    await session.delete(row)
    record(
        session,
        actor=actor,
        action="delete_ngram_filter",
        target=f"dataset:{row.dataset_sha256}",
        details={},
    )
    await session.commit()
    return row
