"""Fast checks of the serving benchmark's pieces: assets, workloads, flags, plans, statistics."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from benchmarks.serve import runner, scenarios, servers, stats
from benchmarks.serve.assets import Assets, prepare_assets, rank_of
from benchmarks.serve.load import ClientStallMonitor, PhaseRun, Sample


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    return prepare_assets(tmp_path_factory.mktemp("bench-data"), 6)


def test_derived_adapters_are_real_peft_folders_with_their_own_weights(assets: Assets) -> None:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    first, second = (
        load_file(assets.adapter_path(n) / "adapter_model.safetensors")
        for n in assets.adapter_names[:2]
    )
    for index, name in enumerate(assets.adapter_names):
        config = json.loads((assets.adapter_path(name) / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == rank_of(index, 0)
        template = load_file(
            assets.root / "templates" / f"r{config['r']}" / "adapter_model.safetensors"
        )
        weights = load_file(assets.adapter_path(name) / "adapter_model.safetensors")
        assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in template.items()}
        assert all(not (weights[k] == template[k]).all() for k in weights)
    if first.keys() == second.keys():
        assert any(not (first[k] == second[k]).all() for k in first)
    base = LlamaForCausalLM.from_pretrained(assets.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(assets.adapter_path(assets.adapter_names[0])))
    assert model.peft_config["default"].r == rank_of(0, 0)
    folder = assets.adapter_set(3)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == list(assets.adapter_names[:3])


def test_workloads_are_seeded_and_zipf_favours_the_first_adapters() -> None:
    zipf64 = next(s for s in scenarios.FULL_SCENARIOS if s.name == "zipf64")
    settings = scenarios.FULL_SETTINGS
    a = scenarios.workload(zipf64, settings, "closed", 2000)
    assert a == scenarios.workload(zipf64, settings, "closed", 2000)
    assert a != scenarios.workload(zipf64, settings, "open", 2000)
    counts = Counter(spec.model for spec in a)
    assert counts.most_common(1)[0][0] == "lora-0000"
    assert counts["lora-0000"] > 5 * counts.get("lora-0063", 1)
    p = scenarios.popularity(64, 0.8)
    assert abs(p.sum() - 1) < 1e-9 and (p[:-1] >= p[1:]).all()
    base = scenarios.FULL_SCENARIOS[0]
    assert {s.model for s in scenarios.workload(base, settings, "closed", 10)} == {"bench-base"}
    arrivals = scenarios.poisson_arrivals(zipf64, settings, rate=10.0)
    assert arrivals[0] == 0 and arrivals == sorted(arrivals) and 10 < arrivals[-1] < 30


def test_cold_adapters_are_never_used_and_skip_vllms_preloaded_tail() -> None:
    cold = next(s for s in scenarios.FULL_SCENARIOS if s.kind == "cold")
    settings = scenarios.FULL_SETTINGS
    used = scenarios.used_adapters(list(scenarios.FULL_SCENARIOS), settings)
    names = scenarios.cold_adapters(cold, settings, used, protected_tail=16)
    assert len(set(names)) == settings.cold_probes and not set(names) & used
    assert all(int(n.split("-")[1]) < cold.adapters - 16 for n in names)


def test_engine_flags_are_per_system_and_reach_each_server(tmp_path: Path) -> None:
    tweaked = scenarios.with_engine_overrides(
        scenarios.FULL_SCENARIOS, ["zipf64/loraplex:paged_pool_bytes=4194304", "vllm:max_loras=8"]
    )
    zipf64 = next(s for s in tweaked if s.name == "zipf64")
    base = next(s for s in tweaked if s.name == "base")
    assert zipf64.flags("loraplex")["paged_pool_bytes"] == "4194304"
    assert "paged_pool_bytes" not in base.flags("loraplex")
    assert base.flags("vllm")["max_loras"] == "8" and base.flags("loraplex")["max_loras"] == 4
    with pytest.raises(ValueError):
        scenarios.with_engine_overrides(scenarios.FULL_SCENARIOS, ["sglang:max_loras=8"])
    with pytest.raises(ValueError, match="no setting 'lora_pool_bytes'"):  # ignored, yet recorded
        scenarios.with_engine_overrides(
            scenarios.FULL_SCENARIOS, ["zipf64/loraplex:lora_pool_bytes=4194304"]
        )

    fake = Assets(root=tmp_path, base=tmp_path / "base", adapter_names=(), adapter_ranks={})
    spec = servers.ServerSpec.make("loraplex", zipf64.flags("loraplex"), 0)
    argv, env = servers.server_command(spec, fake, 8123, tmp_path / "state")
    assert argv[-2:] == ["gateway", "serve"]
    assert env["LORAPLEX_PAGED_POOL_BYTES"] == "4194304" and env["LORAPLEX_PORT"] == "8123"
    assert env["LORAPLEX_DATA_DIR"] == str(tmp_path / "state")
    spec = servers.ServerSpec.make("vllm", base.flags("vllm"), 0)
    argv, env = servers.server_command(spec, fake, 8123, tmp_path / "state")
    assert env == {"VLLM_PLUGINS": ""}
    assert argv[argv.index("--max-loras") + 1] == "8" and "--enable-lora" in argv


def test_plans_group_scenarios_that_share_a_server() -> None:
    settings = scenarios.FULL_SETTINGS
    plan = runner.RunPlan(scenarios.FULL_SCENARIOS, settings, ("vllm", "loraplex"))
    assert [(n, [s.name for s in g]) for n, g in plan.server_groups] == [
        (0, ["base"]),
        (3, ["lora3"]),
        (64, ["zipf64"]),
        (1000, ["cold", "zipf1000"]),
    ]
    shared = runner.RunPlan(scenarios.FULL_SCENARIOS, settings, ("vllm",), share_servers=True)
    assert [n for n, _ in shared.server_groups] == [1000]
    assert shared.total_requests() == 4 * (32 + 2 * 200) + 2 * settings.cold_probes

    base, lora3 = scenarios.FULL_SCENARIOS[:2]
    measured = {
        "vllm": {"phases": {"closed": {"req_per_s": 40.0}}},
        "loraplex": {"phases": {"closed": {"req_per_s": 80.0}}},
    }
    assert runner._open_rate(plan, base, measured) == pytest.approx(0.7 * 40)  # the baseline's
    pinned = runner.RunPlan((base, lora3), settings, ("vllm",), open_rates={"lora3": 9.0})
    assert runner._open_rate(pinned, lora3, measured) == 9.0
    assert runner._open_rate(pinned, base, measured) == pytest.approx(28)


def test_summary_percentiles_tpot_and_ratios() -> None:
    run = PhaseRun(duration_s=2.0)
    for i in range(100):
        run.samples.append(
            Sample("m", i * 0.01, ttft_s=0.01 * (i + 1), e2e_s=0.5 + 0.01 * i, tokens=32)
        )
    run.samples.append(Sample("m", 1.5, error="HTTP 500: boom"))
    summary = stats.summarize(run)
    assert summary["ok"] == 100 and summary["errors"] == 1
    assert summary["req_per_s"] == 50 and summary["out_tok_per_s"] == 1600
    assert summary["ttft_p50_s"] < summary["ttft_p95_s"] < summary["ttft_p99_s"]
    assert summary["tpot_p50_s"] == pytest.approx(0.49 / 31)
    result = {
        "systems": {
            "vllm": {"phases": {"closed": summary}},
            "loraplex": {"phases": {"closed": {**summary, "req_per_s": 100}}},
        }
    }
    assert stats.ratios(result, ("vllm", "loraplex"))["closed"]["req_per_s"] == 2
    assert stats.ratios(result, ("vllm",)) == {}


def test_adapter_weight_bytes_are_vllm_slots_or_the_paged_pool(tmp_path):
    from benchmarks.serve.servers import lora_slot_bytes

    config = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4}
    config |= {"num_key_value_heads": 2, "num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    slots = {"max_loras": 4, "max_lora_rank": 32, "dtype": "float32"}
    assert lora_slot_bytes(tmp_path, slots) == 4 * 1024 * 1024  # the demo base: 4 MiB
    paged = {**slots, "max_loras": 16, "paged_lora": "1", "paged_pool_bytes": "4194304"}
    assert lora_slot_bytes(tmp_path, paged) == 4194304  # the pool, not 16 max-rank slots
    assert lora_slot_bytes(tmp_path, {"paged_lora": "1"}) is None


def test_client_stalls_are_measured_not_charged_to_the_server() -> None:
    """A loop blocked for 0.3 s (what an OS that does not run the client looks like from
    inside) is recorded as one stall of about that length; idle waiting is not."""

    async def phase() -> list[float]:
        async with ClientStallMonitor() as monitor:
            await asyncio.sleep(0.1)
            time.sleep(0.3)  # the event loop cannot run: every send and read would be late
            await asyncio.sleep(0.1)
        return monitor.stalls

    stalls = asyncio.run(phase())
    assert len(stalls) == 1 and 0.25 < stalls[0] < 0.6, stalls
    run = PhaseRun(duration_s=1.0, client_stalls_s=stalls)
    summary = stats.summarize(run)
    assert summary["client_stall_max_s"] == round(stalls[0], 4)
    assert summary["client_stalled_s"] == round(stalls[0], 4)


def test_outputs_are_compared_request_by_request_across_systems() -> None:
    def phase(shas: list[str | None]) -> dict:
        run = PhaseRun(duration_s=1.0)
        for i, sha in reversed(list(enumerate(shas))):  # finish order is not request order
            error = None if sha else "HTTP 500: boom"
            run.samples.append(
                Sample("m", i * 0.1, index=i, ttft_s=0.1, e2e_s=0.5, tokens=32, output_sha=sha,
                       error=error)
            )  # fmt: skip
        return stats.summarize(run)

    result = {
        "kind": "load",
        "systems": {
            "vllm": {"phases": {"closed": phase(["a", "b", "c", "d"])}},
            "loraplex": {"phases": {"closed": phase(["a", "x", None, "d"])}},
        },
    }
    agreement = stats.output_agreement(result, ("vllm", "loraplex"))
    assert agreement == {"closed": {"compared": 3, "identical": 2}}
    assert stats.output_agreement({**result, "kind": "cold"}, ("vllm", "loraplex")) == {}
    assert stats.output_agreement(result, ("loraplex",)) == {}


def test_streams_that_arrive_in_one_burst_are_counted() -> None:
    run = PhaseRun(duration_s=1.0)
    run.samples.append(Sample("m", 0.0, ttft_s=0.19, e2e_s=0.2, tokens=32))  # burst
    run.samples.append(Sample("m", 0.1, ttft_s=0.02, e2e_s=0.2, tokens=32))
    assert stats.summarize(run)["burst_samples"] == 1


def test_list_valued_vllm_flags_become_one_argument_per_item(tmp_path: Path) -> None:
    fake = Assets(root=tmp_path, base=tmp_path / "base", adapter_names=(), adapter_ranks={})
    flags = {"lora_target_modules": "q_proj k_proj v_proj", "max_loras": 16}
    spec = servers.ServerSpec.make("vllm", flags, 0)
    argv, _ = servers.server_command(spec, fake, 8123, tmp_path / "state")
    at = argv.index("--lora-target-modules")
    assert argv[at + 1 : at + 4] == ["q_proj", "k_proj", "v_proj"]
    assert argv[argv.index("--max-loras") + 1] == "16"


def test_a_cold_probe_pool_too_small_fails_before_any_server_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []
    monkeypatch.setattr(runner, "start_server", lambda spec, *a: started.append(spec.label()))
    tweaked = scenarios.with_engine_overrides(
        scenarios.FULL_SCENARIOS, ["vllm:max_cpu_loras=1000"]
    )  # vLLM's start-up preload keeps every adapter warm: no cold adapter is left
    plan = runner.RunPlan(tweaked, scenarios.FULL_SETTINGS, ("vllm", "loraplex"))
    fake = Assets(root=tmp_path, base=tmp_path / "base", adapter_names=(), adapter_ranks={})
    with pytest.raises(ValueError, match="cold probes asked"):
        runner.run(plan, fake, tmp_path)
    assert started == []


def test_a_run_that_stops_part_way_keeps_what_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = next(s for s in scenarios.FULL_SCENARIOS if s.name == "base")
    lora3 = next(s for s in scenarios.FULL_SCENARIOS if s.name == "lora3")
    plan = runner.RunPlan((base, lora3), scenarios.QUICK_SETTINGS, ("vllm",))
    running = servers.RunningServer(
        servers.ServerSpec.make("vllm", {}, 0), "http://x", None, tmp_path, [], 1.0, tmp_path
    )  # type: ignore[arg-type]

    def start(spec: servers.ServerSpec, *args: object) -> servers.RunningServer:
        if spec.adapters:  # the second server group fails to start
            raise RuntimeError("server did not start")
        return running

    monkeypatch.setattr(runner, "start_server", start)
    monkeypatch.setattr(runner, "stop_server", lambda server: None)
    monkeypatch.setattr(runner, "_server_record", lambda server, assets: {"label": "x"})
    monkeypatch.setattr(
        runner,
        "_run_scenario",
        lambda plan, sc, *a: {"vllm": {"phases": {"closed": {"req_per_s": 1.0}}}},
    )
    fake = Assets(root=tmp_path, base=tmp_path / "base", adapter_names=(), adapter_ranks={})
    with pytest.raises(runner.RunAborted) as caught:
        runner.run(plan, fake, tmp_path)
    assert isinstance(caught.value.__cause__, RuntimeError)
    measured = {sc["name"]: sc["systems"] for sc in caught.value.partial["scenarios"]}
    assert measured == {"base": {"vllm": {"phases": {"closed": {"req_per_s": 1.0}}}}, "lora3": {}}


def test_a_request_records_the_digest_of_the_text_it_streamed() -> None:
    import hashlib

    from aiohttp import web

    from benchmarks.serve import load

    async def completions(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        texts = ["", *(["ab"] * 2), "c"]  # an empty first chunk is neither TTFT nor text
        for text in texts:
            chunk = {"choices": [{"index": 0, "text": text}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"choices": [], "usage": {"completion_tokens": 3, "prompt_tokens": 5}}
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return response

    async def scenario() -> list[Sample]:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner_ = web.AppRunner(app)
        await runner_.setup()
        port = servers.free_port()
        await web.TCPSite(runner_, "127.0.0.1", port).start()
        try:
            specs = [load.RequestSpec("m", "p")] * 2
            run = await load.closed_loop(f"http://127.0.0.1:{port}", specs, 1, 3)
        finally:
            await runner_.cleanup()
        return run.samples

    samples = asyncio.run(scenario())
    assert [s.error for s in samples] == [None, None] and [s.index for s in samples] == [0, 1]
    assert samples[0].output_sha == hashlib.sha256(b"ababc").hexdigest()[:16]


def test_an_interrupted_run_keeps_what_it_measured_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = next(s for s in scenarios.FULL_SCENARIOS if s.name == "base")
    plan = runner.RunPlan((base,), scenarios.QUICK_SETTINGS, ("vllm",))

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while a server starts

    monkeypatch.setattr(runner, "start_server", interrupted)
    fake = Assets(root=tmp_path, base=tmp_path / "base", adapter_names=(), adapter_ranks={})
    with pytest.raises(runner.RunAborted) as caught:
        runner.run(plan, fake, tmp_path)
    assert isinstance(caught.value.__cause__, KeyboardInterrupt)


def test_the_agreement_share_never_rounds_a_difference_away():
    from benchmarks.serve.report import agreement_share

    assert agreement_share(200, 200) == "100%"
    assert agreement_share(199, 200) == "99.5%"
    assert agreement_share(1999, 2000) == "99.9%"
    assert agreement_share(19999, 20000) == "99.9%"
    assert agreement_share(100, 200) == "50%"
    assert agreement_share(0, 3) == "0%"
