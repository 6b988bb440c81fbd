"""A strict, bounded reader for the safetensors header, written here so nothing untrusted ever
reaches a pickle loader or an unbounded allocation.

Layout: 8-byte little-endian unsigned N, then N bytes of UTF-8 JSON (possibly space-padded), then
the tensor data. The JSON maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]}
with offsets relative to the data start, plus an optional "__metadata__" str→str map. We check
more than the format demands: the length is bounded before anything is read, duplicate keys and
NaN literals are refused, every tensor's byte count matches dtype and shape, and the tensors tile
the data region exactly (no gaps, overlaps, or bytes past the last tensor), so a truncated or
padded file is refused before anyone maps it.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 16 * 1024 * 1024
# The Rust reader keeps dims and offsets in usize and multiplies shapes with checked_mul.
USIZE_MAX = 2**64 - 1
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_ERRORS = 8
# Bytes per element. Sub-byte types (F4, F6) are left out on purpose: adapters never use them and
# their size rule would only add ways to get the arithmetic wrong.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


class HeaderError(ValueError):
    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    header_len: int
    file_size: int
    tensors: tuple[TensorEntry, ...]  # sorted by offset
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


def read_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Read and validate the header of `path`; raises HeaderError with every reason found."""
    with path.open("rb") as handle:
        file_size = _file_size(handle.fileno())
        prefix = handle.read(8)
        header_len = check_length_field(prefix, file_size, max_header_bytes=max_header_bytes)
        raw = handle.read(header_len)
    return parse_header(raw, header_len=header_len, file_size=file_size)


def _file_size(fd: int) -> int:
    return os.fstat(fd).st_size


def check_length_field(prefix: bytes, file_size: int, *, max_header_bytes: int) -> int:
    """Validate the 8-byte length field before a single header byte is read."""
    if len(prefix) < 8 or file_size < 8:
        raise HeaderError([f"file is {file_size} bytes, too short for a safetensors header"])
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > max_header_bytes:
        raise HeaderError(
            [f"header length field says {header_len} bytes; the limit is {max_header_bytes}"]
        )
    if header_len < 2:
        raise HeaderError([f"header length {header_len} is too small for a JSON object"])
    if 8 + header_len > file_size:
        raise HeaderError(
            [
                f"header length {header_len} runs past the end of the {file_size}-byte file "
                "(truncated?)"
            ]
        )
    return int(header_len)


def parse_header(raw: bytes, *, header_len: int, file_size: int) -> SafetensorsHeader:
    """Validate the JSON header bytes against the file size; pure, raises HeaderError."""
    document = _decode_json(raw)
    errors: list[str] = []
    metadata: dict[str, str] = {}
    tensors: list[TensorEntry] = []
    for name, spec in document.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in spec.items()
            ):
                errors.append("__metadata__ must map strings to strings")
            else:
                metadata = spec
            continue
        entry = _tensor_entry(name, spec, errors)
        if entry is not None:
            tensors.append(entry)
    tensors.sort(key=lambda t: (t.begin, t.end))
    errors.extend(_layout_errors(tensors, data_len=file_size - 8 - header_len))
    if errors:
        more = len(errors) - MAX_ERRORS
        raise HeaderError(errors[:MAX_ERRORS] + ([f"… {more} more"] if more > 0 else []))
    return SafetensorsHeader(header_len, file_size, tuple(tensors), metadata)


def _decode_json(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError([f"header is not UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    if not text.startswith("{"):
        raise HeaderError(["header is not a JSON object"])
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise HeaderError([f"header is not valid JSON: {exc}"]) from None
    if not isinstance(document, dict):
        raise HeaderError(["header is not a JSON object"])
    if _has_lone_surrogate(document):
        # Python decodes an unpaired \ud800-style escape to a lone surrogate; the Rust
        # parser vLLM's safe_open uses refuses the whole header for it.
        raise HeaderError(["header has an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"])
    return document


def _has_lone_surrogate(document: Any) -> bool:
    """Whether any key or string anywhere in `document` holds U+D800-U+DFFF (a valid escaped
    pair decodes to one astral character, so only unpaired halves remain as such)."""
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _label(value: Any) -> str:
    """repr(value), cut: a name may be megabytes long and errors should stay readable."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, spec: Any, errors: list[str]) -> TensorEntry | None:
    if not name or not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        errors.append(
            f"tensor {_label(name)}: entry must have exactly dtype, shape and data_offsets"
        )
        return None
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if dtype not in DTYPE_SIZES:
        errors.append(f"tensor {_label(name)}: unknown dtype {_label(dtype)}")
        return None
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(_is_int(d) and d >= 0 for d in shape)
    ):
        errors.append(f"tensor {_label(name)}: shape must be a list of at most 8 non-negative ints")
        return None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        errors.append(
            f"tensor {_label(name)}: data_offsets must be [begin, end] with 0 ≤ begin ≤ end"
        )
        return None
    if _overflows(shape) or offsets[1] > USIZE_MAX:
        errors.append(f"tensor {_label(name)}: shape or offsets overflow 64 bits")
        return None
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != expected:
        errors.append(
            f"tensor {_label(name)}: {dtype}{shape} needs {expected} bytes but its offsets span "
            f"{offsets[1] - offsets[0]}"
        )
        return None
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _overflows(shape: list[int]) -> bool:
    """Whether the Rust reader's running element count (1 * d0 * d1 …, each step checked)
    passes usize: [2**40, 2**40, 0] has 0 elements here and an overflow there."""
    count = 1
    for dim in shape:
        count *= dim
        if dim > USIZE_MAX or count > USIZE_MAX:
            return True
    return False


def _layout_errors(tensors: list[TensorEntry], *, data_len: int) -> list[str]:
    errors: list[str] = []
    position = 0
    for tensor in tensors:
        if tensor.begin < position:
            errors.append(f"tensor {_label(tensor.name)} overlaps the previous tensor")
        elif tensor.begin > position:
            errors.append(f"gap of {tensor.begin - position} bytes before {_label(tensor.name)}")
        position = max(position, tensor.end)
    if position > data_len:
        errors.append(
            f"tensors need {position} bytes of data but the file holds {data_len} (truncated)"
        )
    elif position < data_len:
        errors.append(f"{data_len - position} unexplained bytes after the last tensor")
    return errors
