"""The header reader, table-tested on crafted bytes (pure) and checked against the real library."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from registry.compat.safetensors_header import (
    HeaderError,
    check_length_field,
    parse_header,
    read_header,
)


def header_bytes(document: dict[str, Any] | str) -> bytes:
    return (document if isinstance(document, str) else json.dumps(document)).encode()


def parse(document: dict[str, Any] | str, data_len: int) -> Any:
    raw = header_bytes(document)
    return parse_header(raw, header_len=len(raw), file_size=8 + len(raw) + data_len)


T = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
U = {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}


def test_valid_header_sorted_by_offset():
    header = parse({"u": U, "t": T, "__metadata__": {"format": "pt"}}, data_len=32)
    assert [t.name for t in header.tensors] == ["t", "u"]
    assert header.metadata == {"format": "pt"}
    assert header.tensors[0].shape == (2, 3)


BROKEN: list[tuple[str, Any, int, str]] = [
    ("not an object", "[1, 2]", 0, "JSON object"),
    ("not json", "{nope", 0, "not valid JSON"),
    ("duplicate key", '{"t": 1, "t": 2}', 0, "duplicate key"),
    ("NaN literal", '{"t": NaN}', 0, "NaN"),
    ("unknown dtype", {"t": {**T, "dtype": "F128"}}, 24, "unknown dtype"),
    ("negative dim", {"t": {**T, "shape": [-2, 3]}}, 24, "shape"),
    ("bool dim", {"t": {**T, "shape": [True, 3]}}, 24, "shape"),
    ("extra key", {"t": {**T, "pickle": "x"}}, 24, "exactly"),
    ("size mismatch", {"t": {**T, "shape": [2, 4]}}, 24, "needs 32 bytes"),
    ("reversed offsets", {"t": {**T, "data_offsets": [24, 0]}}, 24, "begin ≤ end"),
    ("gap", {"t": {**T, "data_offsets": [8, 32]}}, 32, "gap"),
    ("overlap", {"t": T, "u": {**U, "data_offsets": [20, 28]}}, 28, "overlaps"),
    ("truncated", {"t": T, "u": U}, 30, "truncated"),
    ("trailing bytes", {"t": T}, 40, "unexplained"),
    ("bad metadata", {"__metadata__": {"a": 1}}, 0, "__metadata__"),
    # json.dumps writes the escape \\ud800 for a lone surrogate: Python reads it back, Rust not
    ("lone high surrogate in metadata", {"__metadata__": {"n": "\ud800"}}, 0, "surrogate"),
    ("lone low surrogate in a name", {"t\udc00": T}, 24, "surrogate"),
    ("reversed surrogate pair", {"__metadata__": {"n": "\ude00\ud83d"}}, 0, "surrogate"),
    ("surrogate in a metadata key", {"__metadata__": {"\udfff": "v"}}, 0, "surrogate"),
    (
        "element count overflows u64 before a zero dim",
        {"t": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}},
        0,
        "overflow",
    ),
    (
        "dim past u64",
        {"t": {"dtype": "F32", "shape": [0, 2**64], "data_offsets": [0, 0]}},
        0,
        "overflow",
    ),
]


@pytest.mark.parametrize(
    ("case", "document", "data_len", "needle"), BROKEN, ids=[b[0] for b in BROKEN]
)
def test_broken_headers(case: str, document: Any, data_len: int, needle: str):
    with pytest.raises(HeaderError) as error:
        parse(document, data_len)
    assert needle in str(error.value), case


@pytest.mark.parametrize(
    ("length", "file_size", "needle"),
    [
        (100 * 1024 * 1024, 10**9, "limit"),
        (1000, 500, "past the end"),
        (1, 100, "too small"),
    ],
)
def test_length_field(length: int, file_size: int, needle: str):
    with pytest.raises(HeaderError, match=needle):
        check_length_field(struct.pack("<Q", length), file_size, max_header_bytes=16 * 2**20)


def test_short_file(tmp_path: Path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(HeaderError, match="too short"):
        read_header(path)


def test_agrees_with_the_safetensors_library(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "real.safetensors"
    tensors = {
        "a": torch.zeros(3, 5),
        "b": torch.ones(7, dtype=torch.bfloat16),
        "c": torch.zeros(0),
    }
    save_file(tensors, path, metadata={"k": "v"})
    header = read_header(path)
    assert {t.name: (t.dtype, t.shape) for t in header.tensors} == {
        "a": ("F32", (3, 5)),
        "b": ("BF16", (7,)),
        "c": ("F32", (0,)),
    }
    assert header.metadata == {"k": "v"}


# Headers our reader accepts must open in the safetensors library (the Rust parser vLLM's
# loader uses), and the ones it refuses for being unreadable there must fail there too.
AGREED: list[tuple[str, dict[str, Any]]] = [
    ("plain", {"t": T, "u": U}),
    ("metadata", {"t": T, "__metadata__": {"format": "pt", "note": "caf\u00e9"}}),
    ("astral character as an escaped pair", {"t": T, "__metadata__": {"e": "\U0001f600"}}),
    ("non-ASCII tensor name", {"\u5c64.0": T}),
    (
        "zero-size tensor with a huge dim",
        {"z": {"dtype": "F32", "shape": [0, 2**62], "data_offsets": [0, 0]}},
    ),
]
REFUSED_BY_BOTH: list[tuple[str, dict[str, Any]]] = [
    ("lone surrogate", {"t": T, "__metadata__": {"n": "\ud800"}}),
    ("lone surrogate name", {"\udc00": T}),
    (
        "element count overflow",
        {"z": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}},
    ),
]


def _write(path: Path, document: dict[str, Any]) -> Path:
    raw = json.dumps(document).encode()  # ensure_ascii: non-ASCII as escapes, as the cases need
    tensors = [v for k, v in document.items() if k != "__metadata__"]
    data_len = max((t["data_offsets"][1] for t in tensors), default=0)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    return path


@pytest.mark.parametrize(("case", "document"), AGREED, ids=[c[0] for c in AGREED])
def test_accepted_headers_open_in_the_safetensors_library(tmp_path: Path, case, document):
    from safetensors import safe_open

    path = _write(tmp_path / "x.safetensors", document)
    header = read_header(path)
    with safe_open(str(path), framework="np") as opened:
        assert set(opened.keys()) == {t.name for t in header.tensors}, case
        assert (opened.metadata() or {}) == header.metadata


@pytest.mark.parametrize(("case", "document"), REFUSED_BY_BOTH, ids=[c[0] for c in REFUSED_BY_BOTH])
def test_headers_the_library_cannot_read_are_refused(tmp_path: Path, case, document):
    from safetensors import SafetensorError, safe_open

    path = _write(tmp_path / "x.safetensors", document)
    with pytest.raises(HeaderError):
        read_header(path)
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="np")


def test_errors_about_huge_names_stay_short():
    name = "n" * 1_000_000
    with pytest.raises(HeaderError) as error:
        parse({name: {**T, "dtype": "F128"}}, data_len=24)
    assert "unknown dtype" in str(error.value) and len(str(error.value)) < 500
