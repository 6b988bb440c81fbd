"""Dataset n-gram filters: every 8-word sequence of every text a dataset holds is found (never a
miss), spelling that does not change the words (case, punctuation, spacing, NFKC forms) does
not hide a copy, the false-positive rate measured from the bits matches what the filter was
sized for and what random lookups see, the 70 % rule decides at its boundary, and a file that
is not a filter, is cut short or padded is refused by name."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from registry import ngram_filter as nf

VOCAB = [f"w{i}" for i in range(3000)]


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choices(VOCAB, k=words))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    rng = random.Random(7)
    rows: list[dict[str, object]] = []
    for i in range(800):
        if i % 2:
            rows.append({"prompt": sentence(rng, 30), "completion": sentence(rng, 40), "id": i})
        else:
            messages = [{"role": "user", "content": sentence(rng, 25)}]
            rows.append({"messages": messages, "meta": {"tags": [sentence(rng, 12)]}})
    path = tmp_path_factory.mktemp("ngram") / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + "\n", encoding="utf-8")
    return path, rows


def strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


def test_every_sequence_of_the_dataset_is_found_and_its_digest_is_the_files(dataset) -> None:
    path, rows = dataset
    header, ngram_filter = nf.build(path)
    assert header.dataset_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert header.lines == len(rows) + 1 and header.dataset_bytes == path.stat().st_size
    texts = [s for row in rows for s in strings(row)]
    assert header.texts == len(texts)
    assert header.ngrams == sum(max(0, len(t.split()) - nf.NGRAM_WORDS + 1) for t in texts)
    for text in (t for t in texts if t != "user"):
        overlap = nf.overlaps(ngram_filter, nf.hashed([("t", text)]))[0]
        assert overlap.ngrams == len(text.split()) - 7 and overlap.held == overlap.ngrams


def test_the_measured_rate_is_the_sized_rate_and_what_random_lookups_see(dataset) -> None:
    path, _ = dataset
    _, ngram_filter = nf.build(path, false_positive_rate=0.01)
    measured = ngram_filter.false_positive_rate()
    assert 0.005 < measured < 0.015
    rng = np.random.default_rng(3)
    probes = rng.integers(0, 2**63, size=200_000, dtype=np.uint64)
    seen = ngram_filter.contains(probes).mean()
    assert abs(seen - measured) < 0.003
    _, small = nf.build(path, false_positive_rate=0.001, max_bytes=2048)
    assert small.bits.size == 2048 and small.false_positive_rate() > 0.05  # the cap costs


def test_case_punctuation_spacing_and_unicode_forms_do_not_hide_a_copy() -> None:
    ngram_filter = nf.NgramFilter.sized_for(100)
    ngram_filter.add(
        nf.ngram_hashes("the refund policy allows returns within thirty days of purchase")
    )
    fullwidth = "".join(chr(ord(c) + 0xFEE0) for c in "purchase")  # NFKC: "purchase"
    copied = f"THE Refund-Policy   allows returns, within thirty\tdays of {fullwidth}!"
    assert nf.overlaps(ngram_filter, nf.hashed([("c", copied)]))[0].held == 3
    reworded = "the refund policy allows returns within forty days of purchase"
    assert nf.overlaps(ngram_filter, nf.hashed([("r", reworded)]))[0].held == 0


def test_seventy_percent_of_an_items_sequences_make_it_contaminated() -> None:
    item = " ".join(f"q{i}" for i in range(17))  # 10 windows of 8 words
    for seen_words, held, contaminated in ((14, 7, True), (13, 6, False)):
        ngram_filter = nf.NgramFilter.sized_for(100)
        ngram_filter.add(nf.ngram_hashes(" ".join(item.split()[:seen_words])))
        overlap = nf.overlaps(ngram_filter, nf.hashed([("q", item)]))[0]
        assert (overlap.ngrams, overlap.held, overlap.contaminated) == (10, held, contaminated)
    # Under 3 windows (10 words) an item is not judged: one or two chance hits would decide it.
    nine = "one two three four five six seven eight nine"
    ngram_filter = nf.NgramFilter.sized_for(10)
    ngram_filter.add(nf.ngram_hashes(nine))
    held = nf.overlaps(
        ngram_filter, nf.hashed([("n", nine), ("s", "seven words are too few here")])
    )
    assert [(o.ngrams, o.held, o.judged, o.contaminated) for o in held] == [
        (2, 2, False, False),
        (0, 0, False, False),
    ]


def test_the_hashes_and_bit_positions_are_fixed() -> None:
    """Filters registered earlier must keep matching: a change here breaks every one."""
    hashes = nf.ngram_hashes("The quick brown fox jumps over the lazy dog again")
    assert hashes.tolist() == [14836293801892961963, 11316825779497773286, 4096236019820580847]
    ngram_filter = nf.NgramFilter(8, 3, np.zeros(64, np.uint8))
    ngram_filter.add(hashes[:1])
    assert np.nonzero(np.unpackbits(ngram_filter.bits, bitorder="little"))[0].tolist() == [
        171,
        326,
        481,
    ]


def test_what_no_filter_should_be_made_of_is_refused(tmp_path) -> None:
    import gzip
    import os

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = {
        fifo: "not a regular file",
        tmp_path: "not a regular file",
        tmp_path / "short.jsonl": "no text of 8 words or more",
        tmp_path / "data.jsonl.gz": "compressed",
    }
    (tmp_path / "short.jsonl").write_text('{"prompt": "too short"}\n\n', encoding="utf-8")
    (tmp_path / "data.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "' + b"w " * 50 + b'"}\n'))
    for path, message in cases.items():
        with pytest.raises(nf.BadFilter, match=message):
            nf.build(path)


def test_texts_are_every_string_value_of_a_json_line_or_the_line_itself() -> None:
    line = json.dumps({"prompt": "a", "n": 3, "x": {"chosen": "b", "rejected": ["c", None]}})
    assert list(nf.texts_of(line.encode())) == ["a", "b", "c"]
    assert list(nf.texts_of(b"plain text, not json\n")) == ["plain text, not json\n"]
    assert list(nf.texts_of(b"\xff\xfe broken bytes")) == ["\ufffd\ufffd broken bytes"]
    # A lone surrogate (JSON can spell one) is no word, and no error.
    assert nf.ngram_hashes("\ud800 " + "w " * 8).size == 1


def test_a_file_round_trips_and_a_broken_one_is_refused_by_name(dataset) -> None:
    path, _ = dataset
    header, ngram_filter = nf.build(path, max_bytes=4096)
    data = ngram_filter.encode(header)
    again_header, again = nf.decode(data)
    assert again_header == header and bytes(again.bits) == bytes(ngram_filter.bits)
    cases = {
        b"PK\x03\x04" + data[4:]: "not an n-gram filter",
        nf.MAGIC + b"{" * 5000: "header line is missing or too long",
        nf.MAGIC + b'{"dataset_sha256": "x"}\n': "header is invalid",
        data[:-8]: "bits but",
        data + b"\0": "bits but",
        data.replace(b'"hash_count":', b'"hash_count": 99, "x":', 1): "header is invalid",
    }
    for broken, message in cases.items():
        with pytest.raises(nf.BadFilter, match=message):
            nf.decode(broken)


def test_a_file_that_changes_between_the_two_reads_is_refused(tmp_path, monkeypatch) -> None:
    path = tmp_path / "growing.jsonl"
    path.write_text("".join(json.dumps({"t": "w " * 20}) + "\n" for _ in range(3)))
    calls = 0
    texts_of = nf.texts_of

    def appending(line: bytes):
        nonlocal calls
        calls += 1
        if calls == 4:  # the second read's first line: a writer appends meanwhile
            with path.open("a") as more:
                more.write(json.dumps({"t": "x " * 20}) + "\n")
        return texts_of(line)

    monkeypatch.setattr(nf, "texts_of", appending)
    with pytest.raises(nf.BadFilter, match="changed while it was read"):
        nf.build(path)
