"""Dataset n-gram filters in the registry, on SQLite and PostgreSQL: registered from the file
`loraplex datasets build-filter` writes, read back bit for bit, replaced whole, audited,
deleted; a file built from another dataset, malformed, or too full to judge with is refused
before anything is stored; the datasets a card lists are read from it once each."""

from __future__ import annotations

import numpy as np
import pytest

from registry import service
from registry.errors import InvalidInput
from registry.ngram_filter import MAGIC, FilterHeader, NgramFilter, ngram_hashes

DIGEST = "ab" * 32
OTHER = "cd" * 32
TEXT = "the refund policy allows returns within thirty days of purchase"


def filter_file(
    digest: str = DIGEST, text: str = TEXT, size: int = 1024, ngram_words: int = 8, ngrams: int = 3
) -> bytes:
    ngram_filter = NgramFilter(ngram_words, 10, np.zeros(size, dtype=np.uint8))
    ngram_filter.add(ngram_hashes(text, ngram_words))
    header = FilterHeader(
        dataset_sha256=digest,
        ngram_words=ngram_words,
        hash_count=ngram_filter.hash_count,
        bit_count=ngram_filter.bit_count,
        ngrams=ngrams,
        texts=1,
        lines=1,
        dataset_bytes=64,
    )
    return ngram_filter.encode(header)


async def register(session, data: bytes, digest: str = DIGEST, actor: str = "root"):
    header, ngram_filter, rate = service.read_ngram_filter(data, dataset_sha256=digest)
    return await service.register_ngram_filter(
        session, header=header, ngram_filter=ngram_filter, false_positive_rate=rate, actor=actor
    )


async def stored_bits(sessions) -> NgramFilter | None:
    """The filter as the database holds it (a new session: none of the writer's objects)."""
    async with sessions() as fresh:
        loaded = await service.load_ngram_filters(fresh, dataset_sha256s=[DIGEST])
    return loaded[DIGEST][1] if DIGEST in loaded else None


async def test_a_filter_is_stored_read_back_replaced_and_deleted(sessions, session) -> None:
    row = await register(session, filter_file())
    assert (row.dataset_sha256, row.ngram_words, row.ngrams, row.registered_by) == (
        DIGEST,
        8,
        3,
        "root",
    )
    assert 0 < row.false_positive_rate < 1e-15  # 30 bits of 8192 set, 10 hashes
    loaded = await service.load_ngram_filters(session, dataset_sha256s=[DIGEST, OTHER])
    assert list(loaded) == [DIGEST]
    stored = await stored_bits(sessions)
    assert stored is not None and bytes(stored.bits) == bytes(loaded[DIGEST][1].bits)
    assert stored.contains(ngram_hashes(TEXT)).all()
    assert not stored.contains(ngram_hashes("a different sentence of at least eight words")).any()

    replacement = "every order ships from the warehouse nearest to the customer"
    await register(session, filter_file(text=replacement, size=2048), actor="ops")
    info = await service.get_ngram_filter_info(session, dataset_sha256="SHA256:" + DIGEST.upper())
    assert (info.bit_count, info.registered_by) == (2048 * 8, "ops")
    stored = await stored_bits(sessions)
    assert stored is not None and stored.contains(ngram_hashes(replacement)).all()
    assert not stored.contains(ngram_hashes(TEXT)).any()

    await service.delete_ngram_filter(session, dataset_sha256=DIGEST, actor="ops")
    assert await stored_bits(sessions) is None
    with pytest.raises(service.NgramFilterNotFound):
        await service.get_ngram_filter_info(session, dataset_sha256=DIGEST)
    with pytest.raises(service.NgramFilterNotFound):
        await service.delete_ngram_filter(session, dataset_sha256=DIGEST, actor="ops")
    audit = await service.list_audit(session, target=f"dataset:{DIGEST}")
    assert [(a.action, a.actor, a.details.get("replaced")) for a in audit] == [
        ("delete_ngram_filter", "ops", None),
        ("register_ngram_filter", "ops", True),
        ("register_ngram_filter", "root", False),
    ]


async def test_a_wrong_malformed_or_too_full_filter_is_refused_before_it_is_stored(session) -> None:
    with pytest.raises(InvalidInput, match=f"built from dataset sha256:{DIGEST}, not {OTHER}"):
        service.read_ngram_filter(filter_file(), dataset_sha256=OTHER)
    with pytest.raises(InvalidInput, match="not an n-gram filter"):
        service.read_ngram_filter(b"hello", dataset_sha256=DIGEST)
    with pytest.raises(InvalidInput, match="64 hex digits"):
        service.read_ngram_filter(filter_file(), dataset_sha256="nope")
    full = filter_file(text=" ".join(f"w{i}" for i in range(400)), size=8)  # 64 bits, ~all set
    with pytest.raises(InvalidInput, match=r"false-positive rate is 100.00% .*more bytes"):
        service.read_ngram_filter(full, dataset_sha256=DIGEST)
    with pytest.raises(InvalidInput, match="holds 5-word sequences; suites are judged on 8"):
        service.read_ngram_filter(filter_file(ngram_words=5), dataset_sha256=DIGEST)
    with pytest.raises(InvalidInput, match="holds nothing"):
        service.read_ngram_filter(filter_file(text="too short", ngrams=0), dataset_sha256=DIGEST)
    with pytest.raises(InvalidInput, match="holds nothing"):  # a header that claims n-grams
        service.read_ngram_filter(filter_file(text="too short", ngrams=9), dataset_sha256=DIGEST)
    assert MAGIC  # the refusals above never reached the database:
    assert await service.load_ngram_filters(session, dataset_sha256s=[DIGEST]) == {}


async def test_a_first_filter_registered_meanwhile_is_replaced_not_a_failure(
    sessions, session, monkeypatch
) -> None:
    """Two first registrations at once: the one that finds the row written under it replaces
    it (its insert failed on the key) instead of failing."""
    async with sessions() as other:
        await register(other, filter_file(), actor="first")
    real_get = session.get
    calls = 0

    async def missed_once(*args, **kwargs):
        nonlocal calls
        calls += 1
        return None if calls == 1 else await real_get(*args, **kwargs)

    monkeypatch.setattr(session, "get", missed_once)
    row = await register(session, filter_file(size=2048), actor="second")
    assert calls == 2 and (row.bit_count, row.registered_by) == (2048 * 8, "second")
    async with sessions() as fresh:
        info = await service.get_ngram_filter_info(fresh, dataset_sha256=DIGEST)
        assert (info.bit_count, info.registered_by) == (2048 * 8, "second")


def test_the_datasets_of_a_card_are_its_digests_once_each_in_order() -> None:
    card = {
        "datasets": [
            {"name": "b", "sha256": "sha256:" + OTHER.upper()},
            {"name": "a", "sha256": DIGEST},
            {"name": "b again", "sha256": OTHER},
            {"name": "no digest"},
            "not a dataset",
        ]
    }
    assert service.card_datasets(card) == [OTHER, DIGEST]
    assert service.card_datasets(None) == [] and service.card_datasets({"datasets": "x"}) == []
