"""Reading and writing a PEFT LoRA folder's weights module by module, for the registry's weight
tools (stacks). Inputs are artifacts the gate accepted; what one it would refuse does here is
not defined beyond a ValueError.

Memory stays at one module's matrices, however big the adapters: a source is read one module's
A and B at a time, and the result is streamed into its safetensors file, whose header is known
before any tensor is computed. bf16 and fp16 widen to float64 exactly and the tools compute in
float64; results are written in float32 (exact tools: then the engine's cast to its dtype at
load is the only rounding after their arithmetic) or in the source's own dtype (tools that
approximate anyway, rounded to nearest even).

Module paths are read in one spelling: a multimodal base's language model may be named
`language_model.model.layers…` (its checkpoint) or `model.language_model.layers…` (PEFT's live
module), the gate accepts both and vLLM maps both onto one module, where a second copy would
overwrite the first; here both read as PEFT's.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from registry.compat.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from registry.compat.fingerprint import live_module_path
from registry.compat.lora_keys import lora_tensor_name, parse_lora_key
from registry.compat.safetensors_header import TensorEntry, read_header

# Config fields describing a source's own layout, never true of an adapter written from it.
LAYOUT_FIELDS = (
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
)
_FLOATS = {"F16": "<f2", "F32": "<f4"}
ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4}

# A module's (A: r x in, B: out x r), float64.
Pair = tuple[np.ndarray, np.ndarray]


def peft_scale(config: Mapping[str, Any]) -> float:
    """PEFT's LoRA scale of an adapter_config.json: alpha/r, or alpha/√r with use_rslora."""
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


@dataclass(frozen=True)
class ModuleShape:
    width_in: int
    width_out: int


class LoraFile:
    """One PEFT folder: its config, rank and scale, and its modules read on demand."""

    def __init__(self, folder: Path) -> None:
        self.config: dict[str, Any] = json.loads((folder / ADAPTER_CONFIG).read_text())
        self.rank = int(self.config["r"])
        self.scale = peft_scale(self.config)
        self._weights = folder / ADAPTER_WEIGHTS
        header = read_header(self._weights)
        self._data_start = header.data_start
        dtypes = {entry.dtype for entry in header.tensors}
        # the one dtype every tensor has (what tools that approximate write back), else F32
        self.dtype = dtypes.pop() if len(dtypes) == 1 else "F32"
        entries: dict[str, dict[str, TensorEntry]] = {}
        for entry in header.tensors:
            key = parse_lora_key(entry.name)
            if key is None or entry.dtype not in ("BF16", *_FLOATS):
                raise ValueError(f"{entry.name!r} ({entry.dtype}) is not a LoRA tensor")
            pair = entries.setdefault(live_module_path(key.module_path), {})
            if key.ab in pair:
                raise ValueError(f"{key.module_path}: two tensors for one module's lora_{key.ab}")
            pair[key.ab] = entry
        self.shapes: dict[str, ModuleShape] = {}
        for path, pair in entries.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{path}: lora_A and lora_B must come in pairs")
            a, b = pair["A"].shape, pair["B"].shape
            if len(a) != 2 or len(b) != 2 or a[0] != self.rank or b[1] != self.rank:
                raise ValueError(f"{path}: shapes {a} / {b} do not have rank {self.rank}")
            self.shapes[path] = ModuleShape(width_in=a[1], width_out=b[0])
        self._entries = entries

    def module(self, path: str) -> Pair:
        """(A, B) of the module at `path` (as listed in `shapes`), float64."""
        pair = self._entries[path]
        with self._weights.open("rb") as handle:
            return self._read(handle, pair["A"]), self._read(handle, pair["B"])

    def _read(self, handle: Any, entry: TensorEntry) -> np.ndarray:
        handle.seek(self._data_start + entry.begin)
        return decode(handle.read(entry.nbytes), entry.dtype, entry.shape)


def decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """A safetensors tensor's bytes (BF16, F16 or F32) as float64 (exact for all three)."""
    if dtype == "BF16":
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=_FLOATS[dtype])
    return values.astype(np.float64).reshape(shape)


def lora_bytes(rank: int, shapes: Mapping[str, ModuleShape], dtype: str = "F32") -> int:
    """The weight bytes of a rank-`rank` adapter of these modules in `dtype`."""
    return sum(rank * (s.width_in + s.width_out) * ITEM_BYTES[dtype] for s in shapes.values())


def write_lora(
    dest: Path,
    *,
    template: Mapping[str, Any],
    rank: int,
    shapes: Mapping[str, ModuleShape],
    module: Callable[[str], Pair],
    dtype: str = "F32",
) -> None:
    """A new PEFT folder at `dest` (its parent must exist) with one (A, B) per path of `shapes`,
    computed by `module(path)` one at a time, at scale 1 (r = lora_alpha = rank, no rsLoRA),
    stored in `dtype` (F32, F16 or BF16): the config is `template` without its layout
    fields, target_modules the modules written."""
    item = ITEM_BYTES[dtype]
    paths = sorted(shapes)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for path in paths:
        shape = shapes[path]
        for ab, dims in (("A", [rank, shape.width_in]), ("B", [shape.width_out, rank])):
            end = offset + dims[0] * dims[1] * item
            header[lora_tensor_name(path, ab)] = {
                "dtype": dtype,
                "shape": dims,
                "data_offsets": [offset, end],
            }
            offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes
    config = {k: v for k, v in template.items() if k not in LAYOUT_FIELDS}
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=sorted({path.rsplit(".", 1)[-1] for path in paths}),
    )
    dest.mkdir()  # not parents: a cancelled caller's removed work folder stays removed
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    with (dest / ADAPTER_WEIGHTS).open("xb") as out:
        out.write(struct.pack("<Q", len(encoded)) + encoded)
        for path in paths:
            a, b = module(path)
            shape = shapes[path]
            if a.shape != (rank, shape.width_in) or b.shape != (shape.width_out, rank):
                raise ValueError(f"{path}: computed {a.shape} / {b.shape}, not rank {rank}")
            for matrix in (a, b):
                out.write(encode(matrix, dtype))


def encode(matrix: np.ndarray, dtype: str) -> bytes:
    """`matrix` as a safetensors tensor's bytes in `dtype` (F32, F16 or BF16, rounded to nearest
    even)."""
    if dtype != "BF16":
        return np.ascontiguousarray(matrix, dtype=_FLOATS[dtype]).tobytes()
    # bf16 is float32's upper half: round to nearest, ties to even, on the bits
    bits = np.ascontiguousarray(matrix, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()
