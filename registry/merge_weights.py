"""Static merges: adapters folded into a copy of the base model's weights (a consolidated
checkpoint that serves without LoRA), PEFT's `merge_and_unload` for one adapter and TIES-Merging
for several (seed: merge policy `static_ties`; bonus: TIES merge and merge_and_unload export).

Each adapter's delta on a module is its full matrix `scale·B·A` (scale alpha/r, alpha/√r with
rsLoRA, as PEFT and vLLM apply it). `linear` adds `Σ weight·delta` to the base weight: with one
adapter of weight 1 that is `merge_and_unload`. `ties` is PEFT's `merge_utils.ties` on those
deltas, module by module: each delta keeps its `density` share of entries by magnitude, each
entry's sign is elected by the sum of the kept values, and the entry becomes the mean of the
weighted values that agree with it (tests compare with PEFT's own function).

The output folder is the base's files with the merged tensors rewritten in place: same names,
dtypes and shapes, so the safetensors headers (and a sharded index) are unchanged and memory
stays at one module's matrices. `loraplex-merge.json` there records what went in. It is written
beside the destination and renamed into place at the end: a failure leaves nothing half done.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from registry.compat import (
    BaseModelFingerprint,
    EngineLimits,
    fingerprint_base_model,
    inspect_adapter,
    run_gate,
)
from registry.compat.artifact import ADAPTER_WEIGHTS
from registry.compat.fingerprint import live_module_path
from registry.compat.safetensors_header import TensorEntry, read_header
from registry.lora_weights import LoraFile, decode, encode

METHODS = ("linear", "ties")
MERGE_RECORD = "loraplex-merge.json"
SHARD_INDEX = "model.safetensors.index.json"
# Other copies of the weights a model folder may hold (pytorch .bin, Mistral's consolidated
# file, GGUF): left out of the merged folder, which would otherwise serve them un-merged.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_MERGEABLE = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class MergeInput:
    folder: Path
    weight: float = 1.0


@dataclass(frozen=True)
class _BaseTensor:
    file: str
    data_start: int
    entry: TensorEntry


def magnitude_prune(delta: np.ndarray, density: float) -> np.ndarray:
    """`delta` with all but its `density` share of entries (the largest by magnitude) zeroed."""
    if density >= 1:
        return delta
    keep = int(density * delta.size)
    flat = np.abs(delta).ravel()
    mask = np.zeros(flat.size, dtype=bool)
    if keep > 0:
        mask[np.argpartition(flat, flat.size - keep)[flat.size - keep :]] = True
    return delta * mask.reshape(delta.shape)


def ties(deltas: Sequence[np.ndarray], weights: Sequence[float], density: float) -> np.ndarray:
    """TIES-Merging of one module's deltas (trim, elect sign, disjoint mean), as PEFT's
    `merge_utils.ties` with majority_sign_method "total"."""
    trimmed = np.stack([magnitude_prune(d, density) for d in deltas])
    elected = np.where(trimmed.sum(axis=0) >= 0, 1.0, -1.0)
    agrees = np.sign(trimmed) == elected
    weighted = trimmed * np.asarray(weights, dtype=np.float64).reshape(-1, 1, 1)
    return (weighted * agrees).sum(axis=0) / np.maximum(agrees.sum(axis=0), 1)


def linear(deltas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    return sum((w * d for d, w in zip(deltas, weights, strict=True)), np.zeros_like(deltas[0]))


def gate_problems(base: BaseModelFingerprint, folders: Sequence[Path]) -> list[str]:
    """The registry's compatibility gate for each adapter folder against this base, as at
    registration (files, PEFT config, modules and shapes, dtypes, finite and plausible
    values), less what only the registry holds (a card's claimed base and tokenizer hashes)
    and the engine's rank limit. Empty when every adapter may be merged into it."""
    problems = []
    for folder in folders:
        artifact = inspect_adapter(folder)
        limits = EngineLimits(max_lora_rank=max(artifact.rank or 0, 1))
        problems += [f"{folder.name}: {p.message}" for p in run_gate(artifact, base, limits)]
    return problems


def served_weight_files(base: Path) -> list[str]:
    """The safetensors files transformers and vLLM load: an index's shards, else
    model.safetensors, else every *.safetensors."""
    index = base / SHARD_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        return sorted(set(weight_map.values()))
    if (base / "model.safetensors").is_file():
        return ["model.safetensors"]
    return sorted(p.name for p in base.glob("*.safetensors") if p.is_file())


def base_tensors(base: Path) -> dict[str, _BaseTensor]:
    """Every tensor of the base's served safetensors files by name."""
    found: dict[str, _BaseTensor] = {}
    for path in (base / name for name in served_weight_files(base)):
        header = read_header(path)
        for entry in header.tensors:
            if entry.name in found:
                raise ValueError(
                    f"{entry.name} is in both {found[entry.name].file} and {path.name}"
                )
            found[entry.name] = _BaseTensor(path.name, header.data_start, entry)
    if not found:
        raise ValueError(f"{base} holds no .safetensors weights")
    return found


def merge_into_base(
    base: Path,
    inputs: Sequence[MergeInput],
    dest: Path,
    *,
    method: Literal["linear", "ties"] = "linear",
    density: float = 1.0,
) -> dict[str, object]:
    """Write the merged checkpoint to `dest` (which must not exist); returns its record."""
    if not inputs:
        raise ValueError("nothing to merge: give at least one adapter")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if not 0 < density <= 1 or (method == "linear" and density != 1):
        raise ValueError(f"density {density}: within (0, 1], and only for ties")
    if not all(math.isfinite(item.weight) for item in inputs):
        raise ValueError("adapter weights must be finite numbers")
    if dest.exists():
        raise ValueError(f"{dest} exists: the merge writes a new folder")
    fingerprint = fingerprint_base_model(base)
    refused = gate_problems(fingerprint, [item.folder for item in inputs])
    if refused:
        raise ValueError("incompatible with the base: " + "; ".join(refused))
    adapters = [LoraFile(item.folder) for item in inputs]
    tensors = base_tensors(base)
    by_module = {live_module_path(name.removesuffix(".weight")): t for name, t in tensors.items()}
    modules: dict[str, list[int]] = {}
    for index, (item, lora) in enumerate(zip(inputs, adapters, strict=True)):
        for path, shape in lora.shapes.items():
            target = by_module.get(path)
            if target is None:
                raise ValueError(f"{item.folder.name}: the base has no weight for {path}")
            if target.entry.shape != (shape.width_out, shape.width_in):
                raise ValueError(
                    f"{item.folder.name}: {path} is {shape.width_out}x{shape.width_in}, "
                    f"the base's weight {'x'.join(map(str, target.entry.shape))}"
                )
            if target.entry.dtype not in _MERGEABLE:
                raise ValueError(f"{path}: base weights in {target.entry.dtype} are not merged")
            modules.setdefault(path, []).append(index)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    work.chmod(0o755)  # a plain folder's mode, not mkdtemp's 0700
    served = set(served_weight_files(base))
    files = sorted(p for p in base.iterdir() if p.is_file())
    left_out = [p.name for p in files if p.suffix in WEIGHT_SUFFIXES and p.name not in served]
    try:
        for source in files:
            if source.name not in left_out:
                shutil.copyfile(source, work / source.name)
        for path, users in sorted(modules.items()):
            loras = [(adapters[i], inputs[i].weight) for i in users]
            _merge_module(work, by_module[path], path, loras, method, density)
        record: dict[str, object] = {
            "method": method,
            "density": density,
            "base": str(base),
            "base_weights_sha256": fingerprint.weights_sha256,
            "adapters": [
                {
                    "path": str(item.folder),
                    "weight": item.weight,
                    "rank": lora.rank,
                    "scale": lora.scale,
                    "weights_sha256": _sha256(item.folder / ADAPTER_WEIGHTS),
                }
                for item, lora in zip(inputs, adapters, strict=True)
            ],
            "modules_merged": len(modules),
            "left_out": left_out,
        }
        (work / MERGE_RECORD).write_text(json.dumps(record, indent=2))
        work.rename(dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return record


def _merge_module(
    work: Path,
    target: _BaseTensor,
    path: str,
    loras: Sequence[tuple[LoraFile, float]],
    method: str,
    density: float,
) -> None:
    """The base weight of `path` in the work folder, with the adapters' deltas merged in."""
    deltas: list[np.ndarray] = []
    weights: list[float] = []
    for lora, weight in loras:
        a, b = lora.module(path)
        deltas.append(lora.scale * (b @ a))
        weights.append(weight)
    delta = ties(deltas, weights, density) if method == "ties" else linear(deltas, weights)
    entry = target.entry
    with (work / target.file).open("r+b") as handle:
        handle.seek(target.data_start + entry.begin)
        original = decode(handle.read(entry.nbytes), entry.dtype, entry.shape)
        with np.errstate(over="ignore"):  # an overflow is refused just below
            merged = encode(original + delta, entry.dtype)
        if not np.isfinite(decode(merged, entry.dtype, entry.shape)).all():
            raise ValueError(f"{path}: the merged weight overflows {entry.dtype}")
        handle.seek(target.data_start + entry.begin)
        handle.write(merged)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
