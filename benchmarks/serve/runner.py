"""Run the scenarios against each system, one server at a time, and collect the raw results.

Servers are grouped: scenarios that need the same server (system, engine flags, registered
adapters) run back to back on one process. For each group the systems run one after the other,
never together, the first system (the baseline) first: its closed-loop throughput sets the
open-loop arrival rate for both. Per load scenario: warm-up (excluded), closed loop, open loop.
Per cold scenario: for each probe adapter, one request (cold) then the same again (warm).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serve import load, stats
from benchmarks.serve.assets import Assets
from benchmarks.serve.scenarios import (
    LoadSettings,
    Scenario,
    cold_adapters,
    cold_prompt,
    poisson_arrivals,
    used_adapters,
    workload,
)
from benchmarks.serve.servers import (
    RunningServer,
    ServerSpec,
    lora_slot_bytes,
    start_server,
    stop_server,
)

logger = logging.getLogger(__name__)


class RunAborted(RuntimeError):
    """A run stopped part way; `partial` holds what it measured until then."""

    def __init__(self, partial: dict[str, Any]) -> None:
        super().__init__("the benchmark run stopped part way")
        self.partial = partial


@dataclass
class Progress:
    """Callbacks the CLI turns into a progress bar; the default does nothing."""

    step: Callable[[str], None] = lambda label: None
    advance: Callable[[load.Sample], None] = lambda sample: None


@dataclass
class RunPlan:
    scenarios: tuple[Scenario, ...]
    settings: LoadSettings
    systems: tuple[str, ...]
    share_servers: bool = False  # one server per system for every scenario (quick mode)
    # Fixed open-loop req/s by scenario name ("" for all) instead of open_load x baseline.
    open_rates: dict[str, float] = field(default_factory=dict)
    server_groups: list[tuple[int, list[Scenario]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Group consecutive scenarios by registered adapter count, keeping the given order.
        for scenario in self.scenarios:
            count = self.registered(scenario)
            if (
                self.server_groups
                and self.server_groups[-1][0] == count
                and self._same_flags(self.server_groups[-1][1][-1], scenario)
            ):
                self.server_groups[-1][1].append(scenario)
            else:
                self.server_groups.append((count, [scenario]))

    def registered(self, scenario: Scenario) -> int:
        if self.share_servers:
            return max(s.adapters for s in self.scenarios)
        return scenario.adapters

    def _same_flags(self, a: Scenario, b: Scenario) -> bool:
        return all(a.flags(system) == b.flags(system) for system in self.systems)

    def total_requests(self) -> int:
        s = self.settings
        per_system = sum(
            s.warmup + 2 * s.requests if sc.kind == "load" else 2 * s.cold_probes
            for sc in self.scenarios
        )
        return per_system * len(self.systems)


def run(
    plan: RunPlan, assets: Assets, log_dir: Path, progress: Progress | None = None
) -> dict[str, Any]:
    """Run every scenario on every system; returns the `servers` and `scenarios` results."""
    progress = progress or Progress()
    used = used_adapters(list(plan.scenarios), plan.settings)
    # Picked before any server starts: a pool too small for the probes (a large vLLM host
    # cache protects most adapters) fails the run now, not after minutes of other scenarios.
    cold_names = {
        sc.name: cold_adapters(
            sc, plan.settings, used, int(sc.flags("vllm").get("max_cpu_loras", 0))
        )
        for sc in plan.scenarios
        if sc.kind == "cold"
    }
    servers: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {
        sc.name: {
            "name": sc.name,
            "title": sc.title,
            "kind": sc.kind,
            "adapters": sc.adapters,
            "active": sc.active,
            "zipf": sc.zipf,
            "ranks": _rank_mix(assets, sc.active),
            "systems": {},
        }
        for sc in plan.scenarios
    }
    try:
        for count, group in plan.server_groups:
            for system in plan.systems:
                spec = ServerSpec.make(system, group[0].flags(system), count)
                progress.step(f"{spec.label()} starting")
                server = start_server(spec, assets, log_dir)
                servers.append(_server_record(server, assets))
                try:
                    for scenario in group:
                        results[scenario.name]["systems"][system] = _run_scenario(
                            plan, scenario, server, results[scenario.name], cold_names, progress
                        )
                finally:
                    progress.step(f"{spec.label()} stopping")
                    stop_server(server)
    except BaseException as exc:  # Ctrl-C too: what was measured is kept
        raise RunAborted({"servers": servers, "scenarios": list(results.values())}) from exc
    for result in results.values():
        result["ratios"] = stats.ratios(result, plan.systems)
        result["output_agreement"] = stats.output_agreement(result, plan.systems)
    return {"servers": servers, "scenarios": list(results.values())}


def _rank_mix(assets: Assets, active: int) -> dict[str, int]:
    """How many of the scenario's active adapters have each rank."""
    mix = Counter(assets.adapter_ranks[name] for name in assets.adapter_names[:active])
    return {f"r{rank}": mix[rank] for rank in sorted(mix)}


def _server_record(server: RunningServer, assets: Assets) -> dict[str, Any]:
    spec = server.spec
    flags = dict(spec.flags)
    argv = [a for a in server.command if "=" not in a or a.startswith("-")]  # drop lora-modules
    return {
        "label": spec.label(),
        "system": spec.system,
        "adapters": spec.adapters,
        "engine_flags": flags,
        "lora_slot_bytes": lora_slot_bytes(assets.base, flags),
        "startup_s": round(server.startup_s, 2),
        "command": argv + ([f"<{spec.adapters} name=path pairs>"] if spec.adapters else []),
        "log": str(server.log_path),
    }


def _run_scenario(
    plan: RunPlan,
    scenario: Scenario,
    server: RunningServer,
    result: dict[str, Any],
    cold_names: dict[str, list[str]],
    progress: Progress,
) -> dict[str, Any]:
    s = plan.settings
    label = f"{server.spec.system} · {scenario.name}"
    out: dict[str, Any] = {"server": server.spec.label(), "phases": {}}
    if scenario.kind == "cold":
        # The same adapters for both systems: the tail to skip is vLLM's CPU cache size.
        names = cold_names[scenario.name]
        progress.step(f"{label} · cold probes")
        cold, warm = asyncio.run(_cold_probes(server.base_url, names, s, progress.advance))
        out["adapters"] = names
        out["phases"]["cold"] = stats.summarize(cold)
        out["phases"]["warm"] = stats.summarize(warm)
        return out
    progress.step(f"{label} · warm-up")
    asyncio.run(
        load.closed_loop(
            server.base_url,
            workload(scenario, s, "warmup", s.warmup),
            s.concurrency,
            s.max_tokens,
            progress.advance,
        )
    )
    progress.step(f"{label} · closed loop x{s.concurrency}")
    closed = asyncio.run(
        load.closed_loop(
            server.base_url,
            workload(scenario, s, "closed", s.requests),
            s.concurrency,
            s.max_tokens,
            progress.advance,
        )
    )
    out["phases"]["closed"] = {"concurrency": s.concurrency, **stats.summarize(closed)}
    rate = _open_rate(plan, scenario, result, out)
    progress.step(f"{label} · open loop {rate:.1f} req/s")
    opened = asyncio.run(
        load.open_loop(
            server.base_url,
            workload(scenario, s, "open", s.requests),
            poisson_arrivals(scenario, s, rate),
            s.max_tokens,
            progress.advance,
        )
    )
    out["phases"]["open"] = {"rate": round(rate, 3), **stats.summarize(opened)}
    return out


def _open_rate(
    plan: RunPlan, scenario: Scenario, result: dict[str, Any], current: dict[str, Any]
) -> float:
    """open_load x the first system's closed-loop req/s (this system's if it is the first)."""
    fixed = plan.open_rates.get(scenario.name, plan.open_rates.get(""))
    if fixed is not None:
        return fixed
    first = result["systems"].get(plan.systems[0], current)
    throughput = float(first["phases"]["closed"]["req_per_s"])
    if throughput <= 0:
        raise RuntimeError(f"scenario {scenario.name}: no closed-loop throughput to scale from")
    return plan.settings.open_load * throughput


async def _cold_probes(
    base_url: str,
    names: list[str],
    settings: LoadSettings,
    on_done: Callable[[load.Sample], None],
) -> tuple[load.PhaseRun, load.PhaseRun]:
    """Each adapter once from cold, then once more now that it is loaded, on an idle server."""
    cold, warm = load.PhaseRun(), load.PhaseRun()
    for name in names:
        spec = load.RequestSpec(name, cold_prompt(settings))
        for phase in (cold, warm):
            run = await load.sequential(base_url, [spec], settings.max_tokens, on_done)
            phase.samples += run.samples
            phase.duration_s += run.duration_s
    return cold, warm
