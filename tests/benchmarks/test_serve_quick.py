"""The serving benchmark's --quick mode runs end to end against both real servers.

Checks that the harness works and its numbers are sane, never how fast anything is: both
systems ran every scenario, no request failed, throughput is positive, percentiles are ordered,
every output had the fixed length, and the JSON, markdown and PNG reports were written.
About 2 minutes on 2 CPU cores (two real servers, loaded in turns).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.serve.__main__ import main
from benchmarks.serve.scenarios import FULL_SCENARIOS, QUICK_SETTINGS
from benchmarks.serve.stats import LATENCIES, PERCENTILES

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

SYSTEMS = {"vllm", "loraplex"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("serve-bench")
    assert main(["--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def _assert_sane_phase(phase: dict[str, Any], where: str) -> None:
    assert phase["errors"] == 0, f"{where}: {phase['error_examples']}"
    assert phase["ok"] == phase["requests"] > 0, where
    assert phase["req_per_s"] > 0 and phase["out_tok_per_s"] > 0, where
    assert phase["output_tokens_mean"] == QUICK_SETTINGS.max_tokens, where
    for metric in LATENCIES:
        values = [phase[f"{metric}_p{p}_s"] for p in PERCENTILES]
        assert all(v is not None and v >= 0 for v in values), (where, metric, values)
        assert values == sorted(values), (where, metric, values)
    samples = phase["samples"]
    assert all(0 < t <= e for t, e in zip(samples["ttft_s"], samples["e2e_s"], strict=True))


def test_quick_run_covers_every_scenario_on_both_systems(quick_run):
    _, results = quick_run
    assert {s["name"] for s in results["scenarios"]} == {s.name for s in FULL_SCENARIOS}
    assert {s["system"] for s in results["servers"]} == SYSTEMS
    for scenario in results["scenarios"]:
        assert set(scenario["systems"]) == SYSTEMS, scenario["name"]
        expected = {"closed", "open"} if scenario["kind"] == "load" else {"cold", "warm"}
        for system, data in scenario["systems"].items():
            assert set(data["phases"]) == expected
            for name, phase in data["phases"].items():
                _assert_sane_phase(phase, f"{scenario['name']}/{system}/{name}")
        assert set(scenario["ratios"]) == expected
        assert all(r["req_per_s"] > 0 for r in scenario["ratios"].values())


def test_both_systems_get_the_same_load(quick_run):
    _, results = quick_run
    for scenario in results["scenarios"]:
        vllm, loraplex = scenario["systems"]["vllm"], scenario["systems"]["loraplex"]
        if scenario["kind"] == "cold":
            assert vllm["adapters"] == loraplex["adapters"]
            assert len(vllm["adapters"]) == QUICK_SETTINGS.cold_probes
            continue
        for phase in ("closed", "open"):
            ours, theirs = loraplex["phases"][phase], vllm["phases"][phase]
            assert sorted(ours["samples"]["model"]) == sorted(theirs["samples"]["model"])
        assert loraplex["phases"]["open"]["rate"] == vllm["phases"]["open"]["rate"] > 0
    zipf = next(s for s in results["scenarios"] if s["name"] == "zipf64")
    models = zipf["systems"]["vllm"]["phases"]["closed"]["samples"]["model"]
    assert len(set(models)) > 4  # more adapters in play than LoRA slots


def test_quick_run_writes_reports_with_machine_info(quick_run):
    out, results = quick_run
    meta = results["meta"]
    assert meta["quick"] is True and "--quick" in meta["command"]
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["ram_gib"] > 0
    assert meta["machine"]["cpu_model"] and meta["date"]
    assert all(s["startup_s"] > 0 for s in results["servers"])
    table = (out / "results.md").read_text()
    assert "QUICK RUN" in table and "**ratio**" in table
    assert meta["in_turns"] is True and "the systems in turns A B B A" in table
    for scenario in FULL_SCENARIOS:
        assert f"| {scenario.name}" in table
    for name in ("latency_cdf.png", "throughput_vs_adapters.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000
