"""Time the paged layers' CPU path (kernels.paged_lora_cpu) at the demo model's shapes.

Compares the split the layers use (`OWN_GEMM_ROWS`: adapters with many rows get GEMMs of
their own, the rest one batched pass) with one pair of GEMMs per adapter for every row
(`own_gemm_rows=1`, the path before the batched pass existed), and the batched pass's two
forms: gathering the present adapters' pages, or reading the whole pool in place masked by
page owner (what the layers pick unless the pool is large next to the step).
All are checked against each other before timing. Shapes are the demo Llama's (hidden 256,
GQA qkv 256/128/128, MLP 512), adapters of ranks 4-32 in pages of 4 rank rows, as in the
residency benchmark.

    python -m benchmarks.kernels.bench_paged_cpu --out benchmarks/results/kernels_cpu
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

from kernels import paged_lora_cpu
from kernels.paged_lora_cpu import paged_lora_pool_cpu
from kernels.paged_pool import PagedLoraPool
from kernels.paged_step_rows import OWN_GEMM_ROWS, StepRows, split_rows

LAYERS = {  # name: (hidden_in, slice widths)
    "qkv": (256, (256, 128, 128)),
    "o": (256, (256,)),
    "gate_up": (256, (512, 512)),
    "down": (512, (256,)),
}
RANKS = (32, 16, 32, 16, 8, 16, 8, 32, 8, 8, 4, 16, 4, 32, 16, 8)
# (name, rows per adapter): decode steps, then a prefill beside decode rows.
BATCHES = {
    "decode8_over_4": [2] * 4,
    "decode16_over_10": [1] * 4 + [2] * 6,
    "decode32_over_16": [2] * 16,
    "prefill64+decode12": [64] + [1] * 12,
}
PAGE_SIZE = 4


def make_pool(hidden_in: int, widths: tuple[int, ...], seed: int) -> PagedLoraPool:
    gen = torch.Generator().manual_seed(seed)
    pages = sum(-(-r // PAGE_SIZE) for r in RANKS)
    pool = PagedLoraPool(
        num_pages=pages,
        page_size=PAGE_SIZE,
        num_slots=len(RANKS),
        max_rank=max(RANKS),
        hidden_in=hidden_in,
        slice_widths=widths,
        dtype=torch.float32,
        device="cpu",
    )
    for slot, r in enumerate(RANKS):
        a = [torch.randn(r, hidden_in, generator=gen) / hidden_in**0.5 for _ in widths]
        b = [torch.randn(w, r, generator=gen) / r**0.5 for w in widths]
        pool.load(slot, a, b, scale=2.0)
    return pool


def token_slots(rows_per_adapter: list[int]) -> torch.Tensor:
    """Rows interleaved the way decode steps are (one row per request, requests mixed)."""
    slots = [s for s, n in enumerate(rows_per_adapter) for _ in range(n)]
    gen = torch.Generator().manual_seed(len(slots))
    return torch.tensor(slots)[torch.randperm(len(slots), generator=gen)]


def layer_call(
    pool: PagedLoraPool,
    x: torch.Tensor,
    y: torch.Tensor,
    token_slot: torch.Tensor,
    step: StepRows,
    whole_pool: bool,
) -> torch.Tensor:
    return paged_lora_pool_cpu(y, x, pool, token_slot, rows=step, whole_pool=whole_pool)


def time_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=400)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    share = paged_lora_cpu.WHOLE_POOL_MIN_SHARE
    rows = []
    for batch, per_adapter in BATCHES.items():
        token_slot = token_slots(per_adapter)
        for layer, (hidden_in, widths) in LAYERS.items():
            pool = make_pool(hidden_in, widths, seed=len(rows))
            x = torch.randn(token_slot.numel(), hidden_in)
            y = torch.randn(token_slot.numel(), sum(widths))
            results, times = {}, {}
            variants = (
                ("split", OWN_GEMM_ROWS, False),
                ("whole_pool", OWN_GEMM_ROWS, True),
                ("per_adapter", 1, False),
            )
            paged_lora_cpu.WHOLE_POOL_MIN_SHARE = 0.0  # time the whole-pool form in any batch
            for name, own, whole in variants:
                step = split_rows(token_slot, pool.num_slots, own_gemm_rows=own)
                results[name] = layer_call(pool, x, y.clone(), token_slot, step, whole)
                scratch = y.clone()
                times[name] = time_ms(
                    functools.partial(layer_call, pool, x, scratch, token_slot, step, whole),
                    args.repeats,
                )
            paged_lora_cpu.WHOLE_POOL_MIN_SHARE = share
            torch.testing.assert_close(results["split"], results["per_adapter"])
            torch.testing.assert_close(results["whole_pool"], results["per_adapter"])
            held = sum(-(-RANKS[s] // PAGE_SIZE) for s in range(len(per_adapter)))
            rows.append(
                {
                    "batch": batch,
                    "layer": layer,
                    "tokens": token_slot.numel(),
                    "adapters": len(per_adapter),
                    "pool_share_held": round(held / pool.num_pages, 2),
                    "split_ms": round(times["split"], 4),
                    "whole_pool_ms": round(times["whole_pool"], 4),
                    "per_adapter_ms": round(times["per_adapter"], 4),
                    "speedup": round(times["per_adapter"] / times["split"], 2),
                    "whole_pool_speedup": round(times["split"] / times["whole_pool"], 2),
                }
            )
            print(rows[-1], flush=True)
    env = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.kernels.bench_paged_cpu " + " ".join(argv or sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "own_gemm_rows": OWN_GEMM_ROWS,
        "whole_pool_min_share": share,
        "load_average": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paged_cpu.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = [
        "# Paged LoRA CPU path: batched pass (gathered pages or whole pool) vs one GEMM pair "
        "per adapter",
        "",
        *(f"- {k}: {v}" for k, v in env.items()),
        "- times: median ms of one layer call (shrink + expand, all slices), fp32",
        "",
        "- split = gathered pages; whole pool = the same split, batched pass over the whole pool;",
        "  share held = the pool's pages the batch's adapters hold",
        "",
        "| batch | layer | tokens | adapters | share held | per-adapter ms | split ms | "
        "whole pool ms | split vs per-adapter | whole pool vs split |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['batch']} | {r['layer']} | {r['tokens']} | {r['adapters']} | "
            f"{r['pool_share_held']:.2f} | {r['per_adapter_ms']:.3f} | {r['split_ms']:.3f} | "
            f"{r['whole_pool_ms']:.3f} | {r['speedup']:.2f}x | {r['whole_pool_speedup']:.2f}x |"
            for r in rows
        ),
        "",
    ]
    (args.out / "paged_cpu.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
