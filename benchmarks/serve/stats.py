"""Summaries of a phase (throughput, latency percentiles, errors) and loraplex ÷ vLLM ratios."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.serve.load import PhaseRun

PERCENTILES = (50, 95, 99)
LATENCIES = ("ttft", "tpot", "e2e")
# The numbers compared between systems, per phase; latencies in seconds.
RATIO_KEYS = (
    "req_per_s",
    "out_tok_per_s",
    *(f"{m}_p{p}_s" for m in LATENCIES for p in PERCENTILES),
)
MAX_ERROR_EXAMPLES = 3
# A stream whose first text came within this share of its end arrived in one burst: its TTFT
# times the burst (client or server scheduling), not the first token.
BURST_SHARE = 0.1


def summarize(run: PhaseRun) -> dict[str, Any]:
    """Throughput over the phase's wall time, percentiles over successful requests."""
    ok = [s for s in run.samples if s.error is None]
    errors = [s for s in run.samples if s.error is not None]
    duration = run.duration_s
    summary: dict[str, Any] = {
        "requests": len(run.samples),
        "ok": len(ok),
        "errors": len(errors),
        "error_examples": [f"{s.model}: {s.error}" for s in errors[:MAX_ERROR_EXAMPLES]],
        "duration_s": round(duration, 4),
        "req_per_s": len(ok) / duration if duration > 0 else 0.0,
        "out_tok_per_s": sum(s.tokens for s in ok) / duration if duration > 0 else 0.0,
        "prompt_tokens_mean": float(np.mean([s.prompt_tokens for s in ok])) if ok else 0.0,
        "output_tokens_mean": float(np.mean([s.tokens for s in ok])) if ok else 0.0,
        # the load generator's own late wake-ups (load.ClientStallMonitor), seconds
        "client_stall_max_s": round(max(run.client_stalls_s, default=0.0), 4),
        "client_stalled_s": round(sum(run.client_stalls_s), 4),
        "burst_samples": sum(
            1
            for s in ok
            if s.ttft_s is not None and s.e2e_s and s.e2e_s - s.ttft_s < BURST_SHARE * s.e2e_s
        ),
    }
    values = {
        "ttft": [s.ttft_s for s in ok if s.ttft_s is not None],
        "tpot": [t for t in (s.tpot_s for s in ok) if t is not None],
        "e2e": [s.e2e_s for s in ok if s.e2e_s is not None],
    }
    for metric in LATENCIES:
        data = np.asarray(values[metric], dtype=np.float64)
        for p in PERCENTILES:
            summary[f"{metric}_p{p}_s"] = float(np.percentile(data, p)) if data.size else None
        summary[f"{metric}_mean_s"] = float(data.mean()) if data.size else None
        summary[f"{metric}_max_s"] = float(data.max()) if data.size else None
    # Raw per-request values in send order, for CDF plots and later re-analysis.
    ordered = sorted(ok, key=lambda s: s.sent_s)
    summary["samples"] = {
        "model": [s.model for s in ordered],
        "sent_s": [round(s.sent_s, 6) for s in ordered],
        "ttft_s": [round(s.ttft_s or 0.0, 6) for s in ordered],
        "e2e_s": [round(s.e2e_s or 0.0, 6) for s in ordered],
        "tokens": [s.tokens for s in ordered],
        "index": [s.index for s in ordered],
        "output_sha": [s.output_sha for s in ordered],
    }
    return summary


def output_agreement(result: dict[str, Any], systems: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Per load phase: how many requests both systems answered, and how many of those with
    the same text (same request by its position in the seeded workload, temperature 0)."""
    if "loraplex" not in systems or "vllm" not in systems:
        return {}
    mine, theirs = result["systems"].get("loraplex"), result["systems"].get("vllm")
    if not mine or not theirs or result.get("kind") != "load":
        return {}
    out: dict[str, dict[str, int]] = {}
    for phase, ours in mine["phases"].items():
        base = theirs["phases"].get(phase)
        if base is None:
            continue
        a, b = _outputs_by_index(ours), _outputs_by_index(base)
        both = [i for i in a if i in b]
        out[phase] = {"compared": len(both), "identical": sum(a[i] == b[i] for i in both)}
    return out


def _outputs_by_index(phase: dict[str, Any]) -> dict[int, str]:
    samples = phase.get("samples", {})
    pairs = zip(samples.get("index", []), samples.get("output_sha", []), strict=False)
    return {i: sha for i, sha in pairs if sha is not None}


def ratios(result: dict[str, Any], systems: tuple[str, ...]) -> dict[str, dict[str, float | None]]:
    """loraplex ÷ vLLM for every compared number of every phase both systems ran."""
    if "loraplex" not in systems or "vllm" not in systems:
        return {}
    mine, theirs = result["systems"].get("loraplex"), result["systems"].get("vllm")
    if not mine or not theirs:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for phase, ours in mine["phases"].items():
        base = theirs["phases"].get(phase)
        if base is None:
            continue
        out[phase] = {key: _ratio(ours.get(key), base.get(key)) for key in RATIO_KEYS}
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b
