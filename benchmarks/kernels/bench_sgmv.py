"""SGMV shrink+expand against its baselines, in achieved bytes/s next to the GPU's copy bandwidth.

    python -m benchmarks.kernels.bench_sgmv --out DIR            # on a CUDA GPU
    python -m benchmarks.kernels.bench_sgmv --out DIR --smoke    # tiny shapes; CPU interpreter

Variants, each timed as shrink followed by expand on the same batch (metadata built once,
outside the timing, as in serving where it is shared by every layer):
  sgmv        our kernels over a paged pool (pages of 16 rank rows)
  padded      the same kernels over vLLM's contiguous layout with every segment forced to the
              mix's maximum rank: what rank-aware gathering saves
  torch_ref   the pure-torch references (host loop over segments)
  vllm        vLLM's lora_shrink/lora_expand over its padded per-slot buffers (if importable)

Bandwidth: `bytes_min` is what any implementation must move (x and y of rows with an adapter,
each active adapter's A and B at its own rank, the fp32 intermediate at its rank); every
variant's GB/s is bytes_min / median time, so the columns compare work done per second. The
reference point is a device-to-device copy of 2 GiB (read + write counted) in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DECODE_TOKENS = 64  # the targets' "decode shapes" are batches of at most this many tokens
PAGE_SIZE = 16
TARGET_HBM_FRACTION = 0.70
TARGET_MIXED_SPEEDUP = 1.5


@dataclasses.dataclass(frozen=True)
class Case:
    layer: str
    hidden: int
    widths: tuple[int, ...]
    tokens: int
    mix: str
    ranks: tuple[int, ...]  # adapter i has ranks[i]; token t uses adapter t % len(ranks)

    @property
    def name(self) -> str:
        return f"{self.layer}-T{self.tokens}-{self.mix}"


def make_cases(smoke: bool) -> list[Case]:
    if smoke:
        layers = {"qkv": (64, (64, 16, 16))}
        tokens = [4, 40]
        mixes = {"uniform16": (16,) * 4, "mixed8-64": (8, 16, 32, 64)}
    else:
        layers = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,))}
        tokens = [1, 16, 64, 512, 4096]
        mixes = {
            "uniform16": (16,) * 8,
            "uniform64": (64,) * 8,
            "mixed8-64": (8, 16, 32, 64, 8, 16, 32, 64),
        }
    return [
        Case(layer, h, w, t, mix, r)
        for layer, (h, w) in layers.items()
        for t in tokens
        for mix, r in mixes.items()
    ]


def bench(fn: Callable[[], Any], *, cuda: bool, reps: int) -> float:
    """Median milliseconds: triton.testing.do_bench on a GPU (L2 flushed between runs)."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, *, cuda: bool, reps: int) -> float:
    """GB/s of dst.copy_(src) over nbytes, counting the read and the write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), cuda=cuda, reps=reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bytes_min(case: Case, elem: int) -> int:
    """Bytes any implementation must move for this batch (see module docstring)."""
    n = len(case.ranks)
    active = sorted({t % n for t in range(case.tokens)})
    per_token_rank = sum(case.ranks[t % n] for t in range(case.tokens))
    rank_rows = sum(case.ranks[a] for a in active)
    slices, h_out = len(case.widths), sum(case.widths)
    x = case.tokens * case.hidden * elem
    a = rank_rows * case.hidden * slices * elem
    h = per_token_rank * slices * 4 * 2  # fp32, written by shrink and read by expand
    b = rank_rows * h_out * elem
    y = case.tokens * h_out * elem * 2
    return x + a + h + b + y


def vllm_variant(
    case: Case,
    adapters: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
    scales: list[float],
    ids: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    pad_rank: int,
) -> tuple[Callable[[], Any] | None, str]:
    """vLLM's ops over its own layout, or None and the reason it cannot run here."""
    try:
        from vllm.lora.ops.triton_ops import LoRAKernelMeta, lora_expand, lora_shrink
    except Exception as exc:  # vLLM absent, or built without its Triton ops
        return None, f"vllm not importable: {type(exc).__name__}: {exc}"
    n, dev, dtype = len(case.ranks), x.device, x.dtype
    if dtype == torch.float32:
        return None, "vllm's lora_shrink takes fp16/bf16 only"
    lora_a = [torch.zeros(n, pad_rank, case.hidden, dtype=dtype, device=dev) for _ in case.widths]
    lora_b = [torch.zeros(n, w, pad_rank, dtype=dtype, device=dev) for w in case.widths]
    for i, (a_list, b_list) in enumerate(adapters):
        r = a_list[0].shape[0]
        for s in range(len(case.widths)):
            lora_a[s][i, :r] = a_list[s].to(dev, dtype)
            lora_b[s][i, :, :r] = (b_list[s] * scales[i]).to(dev, dtype)  # vLLM folds scale in B
    meta = LoRAKernelMeta.make(max_loras=n, max_num_tokens=case.tokens, device=dev)
    meta.prepare_tensors(ids.to(torch.int64))
    args = meta.meta_args(case.tokens, specialize_active_lora=False)
    h = torch.zeros(len(case.widths), case.tokens, pad_rank, dtype=torch.float32, device=dev)

    def run() -> None:
        lora_shrink(x, lora_a, h, *args, 1.0)
        lora_expand(h, lora_b, y, *args, offset_start=0, add_inputs=True)

    try:
        run()  # vLLM's CPU build stubs out Triton: its ops import but cannot launch
    except Exception as exc:
        return None, f"vllm ops failed to run: {type(exc).__name__}: {exc}"
    return run, ""


def run_case(
    case: Case,
    *,
    device: torch.device,
    dtype: torch.dtype,
    cuda: bool,
    reps: int,
) -> dict[str, Any]:
    from kernels.paged_pool import PagedLoraPool, lora_scale
    from kernels.sgmv_expand import sgmv_expand, sgmv_expand_ref
    from kernels.sgmv_metadata import SgmvMetadataBuilder
    from kernels.sgmv_shrink import sgmv_shrink, sgmv_shrink_ref

    gen = torch.Generator().manual_seed(0)
    n, pad_rank = len(case.ranks), max(case.ranks)
    adapters = [
        (
            [torch.randn(r, case.hidden, generator=gen) / case.hidden**0.5 for _ in case.widths],
            [torch.randn(w, r, generator=gen) / r**0.5 for w in case.widths],
        )
        for r in case.ranks
    ]
    scales = [lora_scale(16.0, r) for r in case.ranks]
    pages = sum(-(-r // PAGE_SIZE) for r in case.ranks)
    paged = PagedLoraPool(
        num_pages=pages,
        page_size=PAGE_SIZE,
        num_slots=n,
        max_rank=pad_rank,
        hidden_in=case.hidden,
        slice_widths=case.widths,
        dtype=dtype,
        device=device,
    )
    padded = PagedLoraPool.contiguous(
        num_slots=n,
        max_rank=pad_rank,
        hidden_in=case.hidden,
        slice_widths=case.widths,
        dtype=dtype,
        device=device,
    )
    for slot, (a, b) in enumerate(adapters):
        paged.load(slot, a, b, scales[slot])
        padded.load(slot, a, b, scales[slot])

    ids = (torch.arange(case.tokens) % n).to(device=device, dtype=torch.int32)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(device, dtype)
    y = torch.zeros(case.tokens, sum(case.widths), dtype=dtype, device=device)
    builder = SgmvMetadataBuilder(max_tokens=case.tokens, num_slots=n, device=device)
    meta = builder.build(ids, paged.slot_rank, paged.slot_scale)
    meta_padded = meta.with_rank(pad_rank)

    def ours(pool: PagedLoraPool, m: Any, shrink: Callable, expand: Callable) -> Callable[[], Any]:
        h = torch.zeros(
            len(case.widths), case.tokens, pool.page_table.shape[1] * pool.page_size, device=device
        )
        return lambda: expand(
            shrink(x, pool.a_pages, pool.page_table, m, out=h),
            pool.b_pages,
            pool.page_table,
            m,
            y,
            case.widths,
        )

    variants: dict[str, Callable[[], Any] | None] = {
        "sgmv": ours(paged, meta, sgmv_shrink, sgmv_expand),
        "padded": ours(padded, meta_padded, sgmv_shrink, sgmv_expand),
        "torch_ref": ours(paged, meta, sgmv_shrink_ref, sgmv_expand_ref),
    }
    variants["vllm"], vllm_note = vllm_variant(case, adapters, scales, ids, x, y, pad_rank)

    # Same delta from every variant before any timing (y starts at zero for each).
    deltas = {}
    for name, fn in variants.items():
        if fn is not None:
            y.zero_()
            fn()
            deltas[name] = y.float().clone()
    tol = {"atol": 5e-2, "rtol": 5e-2} if dtype != torch.float32 else {"atol": 1e-3, "rtol": 1e-3}
    for name, delta in deltas.items():
        torch.testing.assert_close(delta, deltas["torch_ref"], **tol, msg=f"{case.name}: {name}")

    elem = torch.empty((), dtype=dtype).element_size()
    moved = bytes_min(case, elem)
    row: dict[str, Any] = {
        "case": case.name,
        **dataclasses.asdict(case),
        "bytes_min": moved,
        "meta_build_ms": bench(
            lambda: builder.build(ids, paged.slot_rank, paged.slot_scale), cuda=cuda, reps=reps
        ),
    }
    for name, fn in variants.items():
        ms = bench(fn, cuda=cuda, reps=reps) if fn is not None else None
        row[f"{name}_ms"] = ms
        row[f"{name}_gbps"] = moved / (ms * 1e-3) / 1e9 if ms else None
    if vllm_note:
        row["vllm_note"] = vllm_note
    row["speedup_vs_padded"] = row["padded_ms"] / row["sgmv_ms"]
    return row


def judge(rows: list[dict[str, Any]], hbm_gbps: float) -> dict[str, Any]:
    """The issue's targets, evaluated on this run's rows."""
    decode = [r for r in rows if r["tokens"] <= DECODE_TOKENS]
    mixed = [r for r in rows if r["mix"].startswith("mixed")]
    uniform = [r for r in rows if r["mix"].startswith("uniform")]
    for r in rows:
        r["sgmv_pct_hbm"] = 100 * r["sgmv_gbps"] / hbm_gbps
    return {
        "decode_min_pct_hbm": min((r["sgmv_pct_hbm"] for r in decode), default=None),
        "decode_meets_70pct": all(r["sgmv_gbps"] >= TARGET_HBM_FRACTION * hbm_gbps for r in decode),
        "mixed_min_speedup_vs_padded": min((r["speedup_vs_padded"] for r in mixed), default=None),
        "mixed_meets_1_5x": all(r["speedup_vs_padded"] >= TARGET_MIXED_SPEEDUP for r in mixed),
        "uniform_min_speedup_vs_padded": min(
            (r["speedup_vs_padded"] for r in uniform), default=None
        ),
        "uniform_never_slower": all(r["speedup_vs_padded"] >= 1.0 for r in uniform),
    }


def fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# SGMV benchmark — {env['device_name']}",
        "",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- torch {env['torch']}, triton {env['triton']}, dtype {env['dtype']}"
        + (" — **SMOKE RUN: interpreter timings, not performance data**" if env["smoke"] else ""),
        f"- copy bandwidth ({report['copy_bytes'] >> 20} MiB copy on the device, read+write "
        f"counted): **{fmt(report['copy_gbps'])} GB/s**",
        "",
        "| case | bytes_min (MB) | sgmv µs | GB/s | % copy | padded µs | x vs padded "
        "| vLLM µs | torch ref µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['case']} | {r['bytes_min'] / 1e6:.2f} | {fmt(r['sgmv_ms'] * 1e3)} "
            f"| {fmt(r['sgmv_gbps'])} | {fmt(r['sgmv_pct_hbm'])} | {fmt(r['padded_ms'] * 1e3)} "
            f"| {fmt(r['speedup_vs_padded'], 2)} "
            f"| {fmt(r['vllm_ms'] * 1e3 if r['vllm_ms'] else None)} "
            f"| {fmt(r['torch_ref_ms'] * 1e3)} |"
        )
    t = report["targets"]
    if t is None:
        return "\n".join([*lines, "", "Targets are judged on GPU runs only."]) + "\n"
    lines += [
        "",
        "## Targets",
        "",
        f"- decode (≤ {DECODE_TOKENS} tokens) ≥ 70 % of copy bandwidth: "
        f"{t['decode_meets_70pct']} (lowest {fmt(t['decode_min_pct_hbm'])} %)",
        f"- mixed ranks ≥ 1.5x padded: {t['mixed_meets_1_5x']} "
        f"(lowest {fmt(t['mixed_min_speedup_vs_padded'], 2)}x)",
        f"- uniform rank never slower than padded: {t['uniform_never_slower']} "
        f"(lowest {fmt(t['uniform_min_speedup_vs_padded'], 2)}x)",
    ]
    if any("vllm_note" in r for r in report["rows"]):
        lines += ["", f"vLLM baseline skipped: {report['rows'][0].get('vllm_note', '')}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for JSON + markdown")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1"
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="default bfloat16 on a GPU, float16 in smoke mode",
    )
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.smoke:
            parser.error("no CUDA device: only --smoke runs on CPU")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before our kernels are decorated
    import triton

    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("float16" if args.smoke else "bfloat16"))
    reps = 3 if args.smoke else 20
    copy_bytes = (64 << 20) if args.smoke else (2 << 30)
    copy_gbps = copy_bandwidth(device, copy_bytes, cuda=cuda, reps=reps)
    rows = []
    for case in make_cases(args.smoke):
        rows.append(run_case(case, device=device, dtype=dtype, cuda=cuda, reps=reps))
        print(
            f"{case.name}: sgmv {rows[-1]['sgmv_ms'] * 1e3:.1f} µs, "
            f"{rows[-1]['speedup_vs_padded']:.2f}x padded",
            file=sys.stderr,
        )
    report = {
        "environment": {
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu (interpreter)",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(
                [
                    "python -m benchmarks.kernels.bench_sgmv",
                    *(sys.argv[1:] if argv is None else argv),
                ]
            ),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "smoke": args.smoke,
        },
        "copy_bytes": copy_bytes,
        "copy_gbps": copy_gbps,
        "rows": rows,
    }
    targets = judge(rows, copy_gbps)  # also adds each row's % of copy bandwidth
    report["targets"] = None if args.smoke else targets
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "sgmv_smoke" if args.smoke else "sgmv"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(args.out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
