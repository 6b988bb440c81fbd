"""Which word sequences a training dataset holds, kept as a Bloom filter of its 8-word n-grams,
so that an eval suite can be checked against the data an adapter was trained on long after
that data has left the building (seed §9: firewall eval data; bonus: a contamination registry).

The filter holds no text: hashes of every run of NGRAM_WORDS consecutive words of every text
in the dataset. An eval item is contaminated when at least CONTAMINATED_OVERLAP of its own
n-grams are in the filter (PaLM's rule: 70 % of the 8-grams); an item of fewer than MIN_NGRAMS
(10 words) is not judged: one or two chance hits would decide it. A Bloom filter never misses an
n-gram it holds; it may report one it does not hold, at its false-positive rate, which is
measured from the filter's own bits (the fraction set, to the power of its hash count), not
taken from whoever built it.

Words: Unicode NFKC, case-folded, runs of letters and digits (`\\w+`): punctuation, spacing and
case do not hide a copied question. A hash per word (blake2b, 8 bytes), a polynomial over the
n words of each window (wrapping 64-bit arithmetic) and splitmix64's finaliser to spread its
bits; the filter's positions come from its two halves (Kirsch-Mitzenmacher double hashing).
Bit i of the filter is bit (i mod 8) of byte i div 8.

The file `loraplex datasets build-filter` writes and the admin API stores: one line
`LORAPLEX-NGRAM-FILTER 1`, one line of JSON (FilterHeader), then the filter's bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

NGRAM_WORDS = 8
CONTAMINATED_OVERLAP = 0.7
# Judged items have at least this many n-grams: all 3 held by chance is (rate)**3, 1e-6 at 1 %.
MIN_NGRAMS = 3
DEFAULT_FALSE_POSITIVE_RATE = 0.001
MAX_FALSE_POSITIVE_RATE = 0.01  # coarser than this, one-window items are flagged by chance
MAX_HASHES = 16
MAGIC = b"LORAPLEX-NGRAM-FILTER 1\n"
COMPRESSED = (b"\x1f\x8b", b"PK\x03\x04", b"\x28\xb5\x2f\xfd", b"BZh", b"\xfd7zX")
MAX_HEADER_BYTES = 4096
# Positions come from 32-bit halves of the hash: more bits would not be reached evenly.
MAX_BITS = 2**32

_WORD = re.compile(r"\w+")
_POLY = np.uint64(0x100000001B3)  # FNV's 64-bit prime: odd, so no window collapses to zero
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@functools.lru_cache(maxsize=1 << 16)  # words recur; a gateway checking suites keeps it small
def _word_hash(word: str) -> int:
    return int.from_bytes(
        hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def ngram_hashes(text: str, n: int = NGRAM_WORDS) -> np.ndarray:
    """The hashes of the text's n-word windows, in order (none when it has fewer words)."""
    tokens = words(text)
    count = len(tokens) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    word_hashes = np.fromiter((_word_hash(w) for w in tokens), dtype=np.uint64, count=len(tokens))
    window = np.zeros(count, dtype=np.uint64)
    for offset in range(n):  # uint64 arrays wrap on overflow: arithmetic modulo 2**64
        window = window * _POLY + word_hashes[offset : offset + count]
    window ^= window >> np.uint64(30)
    window *= _MIX1
    window ^= window >> np.uint64(27)
    window *= _MIX2
    window ^= window >> np.uint64(31)
    return window


def _positions(hashes: np.ndarray, hash_count: int, bit_count: int) -> np.ndarray:
    low = hashes & np.uint64(0xFFFFFFFF)
    high = (hashes >> np.uint64(32)) | np.uint64(1)
    steps = np.arange(hash_count, dtype=np.uint64)
    return (low[:, None] + steps[None, :] * high[:, None]) % np.uint64(bit_count)


class FilterHeader(BaseModel):
    """What a filter says of itself. Only the shape (n-gram size, hash count, bits) is used to
    read it; the counts are the builder's report, kept for the operator."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ngram_words: int = Field(ge=4, le=32)
    hash_count: int = Field(ge=1, le=MAX_HASHES)
    bit_count: int = Field(ge=64, le=MAX_BITS, multiple_of=8)
    ngrams: int = Field(ge=0, description="n-grams inserted (with repeats)")
    texts: int = Field(ge=0)
    lines: int = Field(ge=0)
    dataset_bytes: int = Field(ge=0)


class BadFilter(ValueError):
    pass


@dataclass
class NgramFilter:
    ngram_words: int
    hash_count: int
    bits: np.ndarray  # uint8, bit_count / 8 bytes

    @property
    def bit_count(self) -> int:
        return int(self.bits.size) * 8

    @classmethod
    def sized_for(
        cls,
        ngrams: int,
        false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
        max_bytes: int | None = None,
        ngram_words: int = NGRAM_WORDS,
    ) -> NgramFilter:
        """An empty filter for `ngrams` insertions at the rate, or the most bits `max_bytes`
        allows (its rate is then higher: `false_positive_rate()` says how much)."""
        bits = math.ceil(-max(ngrams, 1) * math.log(false_positive_rate) / math.log(2) ** 2)
        size = max(8, math.ceil(bits / 8))
        size = max(8, min(size, max_bytes or MAX_BITS // 8, MAX_BITS // 8))
        hash_count = round(size * 8 / max(ngrams, 1) * math.log(2))
        return cls(ngram_words, min(MAX_HASHES, max(1, hash_count)), np.zeros(size, np.uint8))

    @classmethod
    def from_bytes(cls, ngram_words: int, hash_count: int, data: bytes) -> NgramFilter:
        return cls(ngram_words, hash_count, np.frombuffer(data, dtype=np.uint8))

    def add(self, hashes: np.ndarray) -> None:
        if hashes.size:
            at = _positions(hashes, self.hash_count, self.bit_count).ravel()
            np.bitwise_or.at(
                self.bits, at >> np.uint64(3), np.left_shift(1, at & 7).astype(np.uint8)
            )

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """Per hash: possibly held (True) or certainly not (False)."""
        if not hashes.size:
            return np.zeros(0, dtype=bool)
        at = _positions(hashes, self.hash_count, self.bit_count)
        held = (self.bits[at >> np.uint64(3)] >> (at & np.uint64(7)).astype(np.uint8)) & 1
        return held.all(axis=1)

    def false_positive_rate(self) -> float:
        """Measured: the chance that k random positions are all set."""
        chunk = 1 << 23  # counted in slices: a whole-filter temporary would double its memory
        ones = sum(
            int(np.bitwise_count(self.bits[i : i + chunk]).sum(dtype=np.uint64))
            for i in range(0, self.bits.size, chunk)
        )
        return (ones / self.bit_count) ** self.hash_count

    def encode(self, header: FilterHeader) -> bytes:
        return MAGIC + header.model_dump_json().encode() + b"\n" + self.bits.tobytes()


def decode(data: bytes) -> tuple[FilterHeader, NgramFilter]:
    """Read a filter file; raises BadFilter saying what is wrong."""
    if not data.startswith(MAGIC):
        raise BadFilter("not an n-gram filter (it starts with `LORAPLEX-NGRAM-FILTER 1`)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    if end < 0:
        raise BadFilter("the filter's header line is missing or too long")
    try:
        header = FilterHeader.model_validate_json(data[len(MAGIC) : end])
    except ValueError as exc:
        raise BadFilter(f"the filter's header is invalid: {exc}") from None
    body = data[end + 1 :]
    if len(body) * 8 != header.bit_count:
        raise BadFilter(f"the header says {header.bit_count} bits but {len(body) * 8} follow it")
    return header, NgramFilter.from_bytes(header.ngram_words, header.hash_count, body)


def texts_of(line: bytes) -> Iterator[str]:
    """The texts of one dataset line: every string in a JSON line (prompt, completion, chosen,
    rejected, each message's content; not the keys), else the line itself."""
    try:
        value = json.loads(line)
    except ValueError:
        yield line.decode("utf-8", "replace")
        return
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


@dataclass(frozen=True)
class Overlap:
    """How much of one eval item's text the filter holds."""

    item: str
    ngrams: int
    held: int

    @property
    def ratio(self) -> float:
        return self.held / self.ngrams if self.ngrams else 0.0

    @property
    def judged(self) -> bool:
        return self.ngrams >= MIN_NGRAMS

    @property
    def contaminated(self) -> bool:
        return self.judged and self.ratio >= CONTAMINATED_OVERLAP


def hashed(items: Iterable[tuple[str, str]], n: int = NGRAM_WORDS) -> list[tuple[str, np.ndarray]]:
    """Each (item id, text) with its n-gram hashes: once per suite, whatever the datasets."""
    return [(item, ngram_hashes(text, n)) for item, text in items]


def overlaps(ngram_filter: NgramFilter, items: Iterable[tuple[str, np.ndarray]]) -> list[Overlap]:
    """Each hashed item looked up in the filter (an item shorter than MIN_NGRAMS is counted,
    not judged)."""
    return [
        Overlap(item, int(hashes.size), int(ngram_filter.contains(hashes).sum()))
        for item, hashes in items
    ]


def build(
    path: Path,
    false_positive_rate: float = DEFAULT_FALSE_POSITIVE_RATE,
    max_bytes: int | None = None,
    ngram_words: int = NGRAM_WORDS,
) -> tuple[FilterHeader, NgramFilter]:
    """The filter of a dataset file (JSON lines, or plain lines of text), read twice: once to
    count its n-grams (the filter's size) and take its sha256, once to hash them. Raises
    BadFilter for what no filter should be made of: not a regular file (a pipe reads once),
    compressed, changed between the two reads, or without one n-gram."""
    if not path.is_file():
        raise BadFilter(f"{path}: not a regular file (a pipe or a folder cannot be read twice)")
    with path.open("rb") as data:
        if data.read(4).startswith(COMPRESSED):
            raise BadFilter(f"{path}: compressed: decompress it first (its text is what counts)")
    digest = hashlib.sha256()
    size = lines = texts = ngrams = 0
    with path.open("rb") as data:
        for line in data:
            digest.update(line)
            size += len(line)
            lines += 1
            if line.strip():
                for text in texts_of(line):
                    texts += 1
                    ngrams += max(0, len(words(text)) - ngram_words + 1)
    if not ngrams:
        raise BadFilter(f"{path}: no text of {ngram_words} words or more: nothing to check against")
    ngram_filter = NgramFilter.sized_for(ngrams, false_positive_rate, max_bytes, ngram_words)
    again = hashlib.sha256()
    batch: list[np.ndarray] = []
    pending = 0
    with path.open("rb") as data:
        for line in data:
            again.update(line)
            for text in texts_of(line) if line.strip() else ():
                hashes = ngram_hashes(text, ngram_words)
                batch.append(hashes)
                pending += hashes.size
            if pending >= 1 << 20:
                ngram_filter.add(np.concatenate(batch))
                batch, pending = [], 0
    if batch:
        ngram_filter.add(np.concatenate(batch))
    if again.digest() != digest.digest():
        raise BadFilter(f"{path}: changed while it was read: build again once it is written")
    header = FilterHeader(
        dataset_sha256=digest.hexdigest(),
        ngram_words=ngram_words,
        hash_count=ngram_filter.hash_count,
        bit_count=ngram_filter.bit_count,
        ngrams=ngrams,
        texts=texts,
        lines=lines,
        dataset_bytes=size,
    )
    return header, ngram_filter
