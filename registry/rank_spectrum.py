"""How much of its rank an adapter uses, and a smaller version that keeps what it uses (seed
§4 "above 32 is a sign LoRA is the wrong tool", (c) SVD rank diagnostic at 95 % energy).

A module's delta s·B·A (out x in) has rank at most r, and its singular values come from an
r x r core without forming the delta: with B = Q_b·R_b and Aᵀ = Q_a·R_a (thin QR),
s·B·A = Q_b·(s·R_b·R_aᵀ)·Q_aᵀ, so the core's SVD U·Σ·Vᵀ gives the delta's
(Q_b·U)·Σ·(Q_a·V)ᵀ. Cost O((in + out)·r²) per module, nothing of size out x in.

"Energy" is the share of the squared Frobenius norm (Σ σ²) the top k singular values hold.
Truncating every module to its best rank-k approximation (Eckart-Young: no rank-k matrix is
closer) gives B' = Q_b·U_k·√Σ_k and A' = √Σ_k·V_kᵀ·Q_aᵀ at scale 1 (the singular values split
between the factors, so neither grows past what an fp16 engine holds when the delta does not),
stored in the source's dtype: k/r of its weight bytes (the host cache's budget; in paged mode
its pool pages go from ⌈r/page⌉ to ⌈k/page⌉; vLLM's own slots are sized by max_lora_rank
whatever the rank). Its output differs from the original's by the energy left out: it is a new
version, to be evaluated and rolled out like any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from registry.errors import UploadTooLarge
from registry.lora_weights import LoraFile, Pair, lora_bytes, write_lora

# A rank above this suggests LoRA is the wrong tool for the job (seed §4, 004:798).
LARGE_RANK = 32


@dataclass(frozen=True)
class ModuleSpectrum:
    path: str
    singular_values: tuple[float, ...]  # of the module's delta s·B·A, descending

    def rank_for(self, energy: float) -> int:
        """The smallest k whose top-k singular values hold at least `energy` of the delta's
        energy (1 for a delta of all zeros)."""
        squares = np.square(np.asarray(self.singular_values))
        total = float(squares.sum())
        if total == 0.0:
            return 1
        held = np.cumsum(squares) / total
        # rounding can leave the full sum a hair under 1.0: never ask for more than there is
        return min(int(np.searchsorted(held, energy - 1e-12)) + 1, len(held))

    def energy_at(self, rank: int) -> float:
        """The share of the delta's energy the top `rank` singular values hold."""
        squares = np.square(np.asarray(self.singular_values))
        total = float(squares.sum())
        return 1.0 if total == 0.0 else float(squares[:rank].sum() / total)


def _factors(a: np.ndarray, b: np.ndarray, scale: float) -> tuple[np.ndarray, ...]:
    """(Q_b·U, Σ, Vᵀ·Q_aᵀ) of scale·B·A, from the thin QRs and the core's SVD."""
    q_b, r_b = np.linalg.qr(b)
    q_a, r_a = np.linalg.qr(a.T)
    u, sigma, vt = np.linalg.svd(scale * (r_b @ r_a.T), full_matrices=False)
    return q_b @ u, sigma, vt @ q_a.T


def spectra(folder: Path) -> list[ModuleSpectrum]:
    """Every module's singular values, by module path."""
    source = LoraFile(folder)
    out = []
    for path in sorted(source.shapes):
        a, b = source.module(path)
        _, sigma, _ = _factors(a, b, source.scale)
        out.append(ModuleSpectrum(path, tuple(float(v) for v in sigma)))
    return out


def rank_needed(modules: Sequence[ModuleSpectrum], energy: float) -> int:
    """The rank at which every module keeps at least `energy` of its delta's energy."""
    return max(module.rank_for(energy) for module in modules)


def rank_warnings(rank: int, needed: int, energy: float) -> list[str]:
    """What an operator should hear about a version of `rank` that keeps `energy` of every
    module's delta at rank `needed`."""
    warnings = []
    if rank > LARGE_RANK:
        warnings.append(
            f"rank {rank} is above {LARGE_RANK}: at that size LoRA is often the wrong tool "
            "(consider a full fine-tune or distillation)"
        )
    if needed < rank:
        warnings.append(
            f"every module keeps {energy:.0%} of its delta at rank {needed} of {rank}: a "
            f"version truncated to rank {needed} weighs {needed / rank:.0%} as much (host "
            "cache bytes; pool pages in paged mode)"
        )
    return warnings


def write_truncated(folder: Path, dest: Path, rank: int, *, max_bytes: int | None = None) -> None:
    """The adapter at `folder` with every module cut to its best rank-`rank` approximation,
    written as a new PEFT folder at `dest` (its parent must exist) at scale 1, in the source's
    dtype. Raises UploadTooLarge, before writing, past `max_bytes`."""
    source = LoraFile(folder)
    if not 1 <= rank <= source.rank:
        raise ValueError(f"rank must be within 1..{source.rank}, got {rank}")
    if max_bytes is not None and lora_bytes(rank, source.shapes, source.dtype) > max_bytes:
        raise UploadTooLarge(max_bytes)

    def truncated(path: str) -> Pair:
        a, b = source.module(path)
        left, sigma, right = _factors(a, b, source.scale)
        keep = min(rank, len(sigma))
        new_b = np.zeros((b.shape[0], rank))
        new_a = np.zeros((rank, a.shape[1]))
        root = np.sqrt(sigma[:keep])
        new_b[:, :keep] = left[:, :keep] * root
        new_a[:keep] = root[:, None] * right[:keep]
        return new_a, new_b

    write_lora(
        dest,
        template=source.config,
        rank=rank,
        shapes=source.shapes,
        module=truncated,
        dtype=source.dtype,
    )
