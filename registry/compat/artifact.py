"""Inspection (the I/O half of the gate): read a PEFT adapter folder into a plain AdapterArtifact.

Nothing here decides; it only records what is there (config, tensor header, non-finite tensors,
file digests, a shipped tokenizer) and any failure to read it, so the pure `check_*` functions
can report every reason at once. No weights are deserialised: the safetensors header is parsed by
our own bounded reader and tensor bytes are only streamed for a bit-level NaN/Inf test.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from registry.compat.fingerprint import TOKENIZER_FILES, TokenizerInfo, tokenizer_info
from registry.compat.safetensors_header import HeaderError, TensorEntry, read_header
from registry.errors import BaseModelError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The files that make up a servable artifact; everything else in an upload is left behind.
ARTIFACT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
SCAN_CHUNK = 4 * 1024 * 1024  # a multiple of every itemsize


@dataclass(frozen=True)
class _FloatBits:
    """A float format seen as unsigned integers. With the sign bit cleared, IEEE bit patterns
    sort like the magnitudes they encode, and a value is NaN or ±Inf exactly when all its
    exponent bits are set; so one integer max per chunk finds both the largest magnitude and
    any non-finite value, bf16 needs no float support, and no value is ever converted."""

    kind: type[np.unsignedinteger[Any]]
    magnitude_mask: int
    exponent_mask: int
    as_float: Callable[[int], float]


def _bits_as(kind: type[np.unsignedinteger[Any]], float_kind: Any, shift: int = 0) -> Any:
    return lambda bits: float(np.array(bits << shift, dtype=kind).view(float_kind)[()])


_FLOAT_BITS: dict[str, _FloatBits] = {
    "F16": _FloatBits(np.uint16, 0x7FFF, 0x7C00, _bits_as(np.uint16, np.float16)),
    "BF16": _FloatBits(np.uint16, 0x7FFF, 0x7F80, _bits_as(np.uint32, np.float32, shift=16)),
    "F32": _FloatBits(np.uint32, 0x7FFFFFFF, 0x7F800000, _bits_as(np.uint32, np.float32)),
    "F64": _FloatBits(
        np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000, _bits_as(np.uint64, np.float64)
    ),
}


@dataclass(frozen=True)
class FileDigest:
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class AdapterArtifact:
    """What inspection found in an adapter folder; the pure checks take only this."""

    files: tuple[str, ...] = ()
    unsafe_files: tuple[str, ...] = ()
    directories: tuple[str, ...] = ()
    config: Mapping[str, Any] | None = None
    config_error: str | None = None
    tensors: tuple[TensorInfo, ...] = ()
    header_error: str | None = None
    nonfinite_tensors: tuple[str, ...] = ()
    # The largest magnitude in each finite float tensor that was scanned: the gate judges it
    # against the engine's dtype, which a cast to fp16 can overflow.
    tensor_max_abs: Mapping[str, float] = field(default_factory=dict)
    file_digests: Mapping[str, FileDigest] = field(default_factory=dict)
    tokenizer: TokenizerInfo | None = None
    tokenizer_error: str | None = None
    # Claims about the base it was trained on, filled by the service from the card or from the
    # adapter's earlier versions; None means nothing was claimed.
    declared_base_sha256: str | None = None
    declared_tokenizer_sha256: str | None = None

    @property
    def peft_type(self) -> str | None:
        value = (self.config or {}).get("peft_type")
        return value if isinstance(value, str) else None

    @property
    def rank(self) -> int | None:
        value = (self.config or {}).get("r")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def alpha(self) -> float | None:
        value = (self.config or {}).get("lora_alpha")
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        try:
            alpha = float(value)  # a 400-digit JSON integer overflows here
        except OverflowError:
            return None
        return alpha if math.isfinite(alpha) else None

    @property
    def use_rslora(self) -> bool:
        return bool((self.config or {}).get("use_rslora"))

    @property
    def scale(self) -> float | None:
        """PEFT's scaling: alpha/r, or alpha/√r with rsLoRA."""
        if self.rank is None or self.alpha is None or self.rank <= 0:
            return None
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def dtype(self) -> str | None:
        dtypes = {t.dtype for t in self.tensors}
        return dtypes.pop() if len(dtypes) == 1 else None

    @property
    def weights_bytes(self) -> int:
        return sum(d.size for d in self.file_digests.values())


def inspect_adapter(path: Path, *, scan_values: bool = True) -> AdapterArtifact:
    """Read `path` (a PEFT folder) without trusting it; blocking, run it in a thread. Only
    regular files are read (never through a link); a file that cannot be read becomes a
    recorded error for the checks to name, never an exception."""
    path = Path(path)
    files: list[str] = []
    unsafe: list[str] = []
    directories: list[str] = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        mode = entry.lstat().st_mode
        files.append(entry.name)
        if stat.S_ISDIR(mode):
            directories.append(entry.name)
        elif not stat.S_ISREG(mode):
            unsafe.append(entry.name)  # symlinks, sockets, devices: never followed
    regular = {name for name in files if name not in unsafe and name not in directories}
    found: dict[str, Any] = {
        "files": tuple(files),
        "unsafe_files": tuple(unsafe),
        "directories": tuple(directories),
    }
    digests: dict[str, FileDigest] = {}
    if ADAPTER_CONFIG in regular:
        found.update(_read_config(path / ADAPTER_CONFIG, digests))
    if ADAPTER_WEIGHTS in regular:
        found.update(_read_weights(path / ADAPTER_WEIGHTS, digests, scan_values=scan_values))
    found.update(_read_tokenizer(path, directories, regular))
    return AdapterArtifact(file_digests=digests, **found)


def _read_tokenizer(path: Path, directories: list[str], regular: set[str]) -> dict[str, Any]:
    """The shipped tokenizer from its regular files only: a linked one is refused as unsafe
    and never read, a folder in a tokenizer file's place is reported here."""
    if folders := [name for name in TOKENIZER_FILES if name in directories]:
        return {"tokenizer_error": f"{', '.join(folders)}: a folder, not a file"}
    if not any(name in regular for name in TOKENIZER_FILES):
        return {}
    try:
        return {"tokenizer": tokenizer_info(path, files=regular)}
    except BaseModelError as exc:
        return {"tokenizer_error": exc.message}
    except (OSError, ValueError, RecursionError) as exc:
        return {"tokenizer_error": _reason(exc)}


def _reason(exc: BaseException) -> str:
    """Why a read failed, without the server path an OSError's text carries."""
    if isinstance(exc, OSError):
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    if isinstance(exc, RecursionError):
        return "is nested too deeply"
    return str(exc)


def _read_config(path: Path, digests: dict[str, FileDigest]) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return {"config_error": f"{ADAPTER_CONFIG} {_reason(exc)}"}
    if len(raw) > MAX_CONFIG_BYTES:
        return {"config_error": f"{ADAPTER_CONFIG} is over the {MAX_CONFIG_BYTES}-byte limit"}
    digests[ADAPTER_CONFIG] = FileDigest(len(raw), hashlib.sha256(raw).hexdigest())
    # vLLM reads it with open() + json.load: UTF-8 text, and a byte-order mark is an error
    # there, so it is here; json.loads(bytes) would guess UTF-16 or skip the BOM instead.
    if raw.startswith(codecs.BOM_UTF8):
        return {"config_error": f"{ADAPTER_CONFIG} starts with a byte-order mark; save it "
                "as UTF-8 without one"}  # fmt: skip
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"config_error": f"{ADAPTER_CONFIG} is not UTF-8 ({exc.reason} at byte {exc.start})"}
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return {"config_error": f"{ADAPTER_CONFIG} is not valid JSON: {_reason(exc)}"}
    if not isinstance(config, dict):
        return {"config_error": f"{ADAPTER_CONFIG} is not a JSON object"}
    return {"config": config}


def _read_weights(
    path: Path, digests: dict[str, FileDigest], *, scan_values: bool
) -> dict[str, Any]:
    try:
        header = read_header(path)
    except HeaderError as exc:
        return {"header_error": str(exc)}
    except OSError as exc:
        return {"header_error": f"the file {_reason(exc)}"}
    tensors = tuple(TensorInfo(t.name, t.dtype, t.shape) for t in header.tensors)
    digest = hashlib.sha256()
    nonfinite: list[str] = []
    max_abs: dict[str, float] = {}
    # One sequential pass: the header reader proved the tensors tile the data region, so reading
    # them in offset order reads every byte of the file exactly once, for the digest as well.
    try:
        with path.open("rb") as handle:
            digest.update(_read_exact(handle, header.data_start))
            for tensor in header.tensors:
                largest = _stream_tensor(handle, tensor, digest, scan=scan_values)
                if largest is None:
                    continue
                if math.isfinite(largest):
                    max_abs[tensor.name] = largest
                else:
                    nonfinite.append(tensor.name)
            if handle.read(1):
                raise HeaderError(["file grew while it was being read"])
    except HeaderError as exc:
        return {"header_error": str(exc), "tensors": tensors}
    except OSError as exc:
        return {"header_error": f"the file {_reason(exc)}", "tensors": tensors}
    digests[ADAPTER_WEIGHTS] = FileDigest(header.file_size, digest.hexdigest())
    return {"tensors": tensors, "nonfinite_tensors": tuple(nonfinite), "tensor_max_abs": max_abs}


def _read_exact(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    while len(data) < size:
        more = handle.read(size - len(data))
        if not more:
            raise HeaderError(["file shrank while it was being read"])
        data += more
    return data


def _stream_tensor(
    handle: BinaryIO, tensor: TensorEntry, digest: Any, *, scan: bool
) -> float | None:
    """Hash the tensor's bytes; return its largest magnitude (inf when any value is NaN or
    ±Inf), or None when it was not scanned or is not a float tensor."""
    bits_spec = _FLOAT_BITS.get(tensor.dtype) if scan else None
    largest = 0
    remaining = tensor.nbytes
    while remaining:
        # Chunks are whole multiples of the item size because SCAN_CHUNK is and reads are exact.
        chunk = _read_exact(handle, min(SCAN_CHUNK, remaining))
        remaining -= len(chunk)
        digest.update(chunk)
        if bits_spec is not None and largest < bits_spec.exponent_mask:
            bits = np.frombuffer(chunk, dtype=bits_spec.kind)
            largest = max(largest, int(np.max(bits & bits_spec.kind(bits_spec.magnitude_mask))))
    if bits_spec is None:
        return None
    if largest >= bits_spec.exponent_mask:
        return math.inf
    return bits_spec.as_float(largest)
