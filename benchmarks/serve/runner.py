"""Run the scenarios against each system and collect the raw results.

Servers are grouped: scenarios that need the same server (system, engine flags, registered
adapters) run back to back on one process per system. Every system's server of a group is
started (one after the other) before any load, and the systems then take turns, never loaded
together: each phase's requests are split in two halves, sent as A B B A (the first system,
the baseline, first and last). The machine's speed drifts (other tenants of a shared host,
thermal limits): measured one after the other, the same commit of loraplex came out 0.79x or
1.07x vLLM's req/s depending on which ran first; taking turns cancels a steady drift, and both
systems see the same requests (`in_turns=False`, `--one-at-a-time`: one server up at a time,
for engines whose memory does not fit twice). Per load scenario: warm-up (excluded), closed
loop, open loop
(at open_load x the baseline's closed-loop req/s). Per cold scenario: for each probe adapter,
one request (cold) then the same again (warm).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.serve import load, stats
from benchmarks.serve.assets import Assets
from benchmarks.serve.load import PhaseRun, RequestSpec
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
T = TypeVar("T")


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
    # Every system's server up, loaded in turns (A B B A); False: one server at a time, the
    # systems one after the other (engines whose memory does not fit twice).
    in_turns: bool = True
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
            together = [list(plan.systems)] if plan.in_turns else [[s] for s in plan.systems]
            for systems in together:
                running: dict[str, RunningServer] = {}
                try:
                    for system in systems:
                        spec = ServerSpec.make(system, group[0].flags(system), count)
                        progress.step(f"{spec.label()} starting")
                        running[system] = start_server(spec, assets, log_dir)
                        servers.append(_server_record(running[system], assets))
                    for scenario in group:
                        measured = results[scenario.name]["systems"]
                        measured.update(
                            _run_scenario(plan, scenario, running, cold_names, progress, measured)
                        )
                finally:
                    for server in running.values():
                        progress.step(f"{server.spec.label()} stopping")
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
    running: dict[str, RunningServer],
    cold_names: dict[str, list[str]],
    progress: Progress,
    earlier: dict[str, dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """The running systems' phases of one scenario, each phase taken in turns (A B B A
    halves). `earlier`: what systems run before measured (one server at a time), of which the
    baseline's closed loop paces the open loop."""
    s = plan.settings
    out: dict[str, dict[str, Any]] = {
        system: {"server": server.spec.label(), "phases": {}} for system, server in running.items()
    }

    def turns(
        phase: str, halves: tuple[Any, Any], run_half: Callable[..., T]
    ) -> dict[str, list[T]]:
        """Each system's runs of the two halves, taken in A B B A order."""
        runs: dict[str, list[T]] = {system: [] for system in running}
        for half, system in _abba(list(running)):
            progress.step(f"{system} · {scenario.name} · {phase} ({half + 1}/2)")
            runs[system].append(run_half(running[system].base_url, halves[half], half))
        return runs

    if scenario.kind == "cold":
        # The same adapters for every system: the tail to skip is vLLM's CPU cache size.
        names = cold_names[scenario.name]

        def probe(base_url: str, half: list[str], _: int) -> tuple[PhaseRun, PhaseRun]:
            return asyncio.run(_cold_probes(base_url, half, s, progress.advance))

        for system, parts in turns("cold probes", _halves(names), probe).items():
            out[system]["adapters"] = names
            out[system]["phases"]["cold"] = stats.summarize(_joined([p[0] for p in parts]))
            out[system]["phases"]["warm"] = stats.summarize(_joined([p[1] for p in parts]))
        return out

    for system, server in running.items():
        progress.step(f"{system} · {scenario.name} · warm-up")
        warmup = workload(scenario, s, "warmup", s.warmup)
        asyncio.run(
            load.closed_loop(server.base_url, warmup, s.concurrency, s.max_tokens, progress.advance)
        )
    requests = workload(scenario, s, "closed", s.requests)
    middle = len(requests) // 2

    def closed_half(base_url: str, half: list[RequestSpec], index: int) -> PhaseRun:
        run = asyncio.run(
            load.closed_loop(base_url, half, s.concurrency, s.max_tokens, progress.advance)
        )
        return _numbered(run, index * middle)

    for system, parts in turns("closed loop", _halves(requests), closed_half).items():
        closed = {"concurrency": s.concurrency, **stats.summarize(_joined(parts))}
        out[system]["phases"]["closed"] = closed

    rate = _open_rate(plan, scenario, {**(earlier or {}), **out})
    requests = workload(scenario, s, "open", s.requests)
    arrivals = poisson_arrivals(scenario, s, rate)
    # The second half's clock starts at its first arrival: a Poisson process has no memory.
    restarted = [t - arrivals[middle] for t in arrivals[middle:]]
    timed = (
        list(zip(requests[:middle], arrivals[:middle], strict=True)),
        list(zip(requests[middle:], restarted, strict=True)),
    )

    def open_half(base_url: str, half: list[tuple[RequestSpec, float]], index: int) -> PhaseRun:
        specs, times = [spec for spec, _ in half], [at for _, at in half]
        run = asyncio.run(load.open_loop(base_url, specs, times, s.max_tokens, progress.advance))
        return _numbered(run, index * middle)

    for system, parts in turns(f"open loop {rate:.1f} req/s", timed, open_half).items():
        out[system]["phases"]["open"] = {"rate": round(rate, 3), **stats.summarize(_joined(parts))}
    return out


def _abba(systems: list[str]) -> list[tuple[int, str]]:
    """(half, system) in the order they run: every system's first half in the given order,
    then every second half in the reverse order (A B B A)."""
    return [(0, system) for system in systems] + [(1, system) for system in reversed(systems)]


def _halves(items: list[Any]) -> tuple[list[Any], list[Any]]:
    middle = len(items) // 2
    return items[:middle], items[middle:]


def _numbered(run: PhaseRun, first_index: int) -> PhaseRun:
    """A half's samples numbered by their place in the whole phase's workload (the output
    comparison between systems matches requests by it)."""
    for sample in run.samples:
        sample.index += first_index
    return run


def _joined(parts: list[PhaseRun]) -> PhaseRun:
    """One phase of a system from its halves: their samples, time and stalls added up (the
    second half's send times continue after the first's)."""
    joined = PhaseRun()
    for part in parts:
        for sample in part.samples:
            sample.sent_s += joined.duration_s
        joined.samples += part.samples
        joined.duration_s += part.duration_s
        joined.client_stalls_s += part.client_stalls_s
    return joined


def _open_rate(plan: RunPlan, scenario: Scenario, out: dict[str, dict[str, Any]]) -> float:
    """open_load x the first system's (the baseline's) closed-loop req/s."""
    fixed = plan.open_rates.get(scenario.name, plan.open_rates.get(""))
    if fixed is not None:
        return fixed
    throughput = float(out[plan.systems[0]]["phases"]["closed"]["req_per_s"])
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
