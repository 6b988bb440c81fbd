"""The serving benchmark's systems take turns in every phase: the requests in two halves, sent
as A B B A (the baseline first and last), each system given the same requests, numbered by
their place in the whole phase, and the open loop paced by the baseline's closed loop. Against
two small SSE servers that log what reaches them (the real servers: test_serve_quick.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from benchmarks.serve import runner, scenarios, servers
from benchmarks.serve.scenarios import Scenario, cold_prompt, workload

SETTINGS = dataclasses.replace(
    scenarios.QUICK_SETTINGS, requests=10, warmup=2, concurrency=2, max_tokens=3, cold_probes=4
)
SYSTEMS = ("vllm", "loraplex")


class Servers:
    """One event loop in a thread serving a fake /v1/completions per system; `log` holds
    (system, model, prompt) in the order requests arrived."""

    def __init__(self, tmp_path: Path) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.running: dict[str, servers.RunningServer] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []
        for system in SYSTEMS:
            port = asyncio.run_coroutine_threadsafe(self._serve(system), self._loop).result(10)
            spec = servers.ServerSpec.make(system, {}, 0)
            self.running[system] = servers.RunningServer(
                spec,
                f"http://127.0.0.1:{port}",
                None,
                tmp_path,
                [],
                0.0,
                tmp_path,  # type: ignore[arg-type]
            )

    async def _serve(self, system: str) -> int:
        async def completions(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.log.append((system, body["model"], body["prompt"]))
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for i in range(body["max_tokens"]):
                chunk = {"choices": [{"index": 0, "text": f"{body['prompt'][:4]}{i}"}]}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"completion_tokens": body["max_tokens"], "prompt_tokens": 5}
            await response.write(
                f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            )
            await response.write(b"data: [DONE]\n\n")
            return response

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app_runner = web.AppRunner(app)
        await app_runner.setup()
        self._runners.append(app_runner)
        port = servers.free_port()
        await web.TCPSite(app_runner, "127.0.0.1", port).start()
        return port

    def close(self) -> None:
        for app_runner in self._runners:
            asyncio.run_coroutine_threadsafe(app_runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def fakes(tmp_path: Path) -> Iterator[Servers]:
    fakes = Servers(tmp_path)
    yield fakes
    fakes.close()


def turns_taken(log: list[tuple[str, str, str]], halves: list[list[str]]) -> list[tuple[str, int]]:
    """(system, half) of each block of consecutive requests from one of `halves`."""
    half_of = {prompt: i for i, half in enumerate(halves) for prompt in half}
    entries = [(system, half_of[prompt]) for system, _, prompt in log if prompt in half_of]
    return [key for key, _ in itertools.groupby(entries)]


def test_each_phase_runs_in_turns_a_b_b_a_with_the_same_requests(fakes: Servers) -> None:
    base = next(s for s in scenarios.FULL_SCENARIOS if s.name == "base")
    plan = runner.RunPlan((base,), SETTINGS, SYSTEMS)
    out = runner._run_scenario(plan, base, fakes.running, {}, runner.Progress())

    abba = [("vllm", 0), ("loraplex", 0), ("loraplex", 1), ("vllm", 1)]
    for phase in ("closed", "open"):
        prompts = [r.prompt for r in workload(base, SETTINGS, phase, SETTINGS.requests)]
        assert len(set(prompts)) == len(prompts)  # each request recognisable by its prompt
        middle = len(prompts) // 2
        assert turns_taken(fakes.log, [prompts[:middle], prompts[middle:]]) == abba, phase
        for system in SYSTEMS:
            samples = out[system]["phases"][phase]["samples"]
            assert sorted(samples["index"]) == list(range(SETTINGS.requests)), (system, phase)
            assert out[system]["phases"][phase]["errors"] == 0
    # Both systems answered every request alike, matched by their place in the phase.
    agreement = runner.stats.output_agreement({"kind": "load", "systems": out}, SYSTEMS)
    assert agreement == {p: {"compared": 10, "identical": 10} for p in ("closed", "open")}
    closed_rate = out["vllm"]["phases"]["closed"]["req_per_s"]
    for system in SYSTEMS:  # the baseline's closed loop paces both open loops
        rate = out[system]["phases"]["open"]["rate"]
        assert rate == pytest.approx(SETTINGS.open_load * closed_rate, rel=1e-3)


def test_cold_probes_take_turns_over_the_same_adapters(fakes: Servers) -> None:
    cold = Scenario("cold", "cold adapters", "cold", adapters=8)
    names = [f"lora-{i:04d}" for i in range(SETTINGS.cold_probes)]
    plan = runner.RunPlan((cold,), SETTINGS, SYSTEMS)
    out = runner._run_scenario(plan, cold, fakes.running, {"cold": names}, runner.Progress())

    models = [(system, model) for system, model, prompt in fakes.log]
    assert all(prompt == cold_prompt(SETTINGS) for *_, prompt in fakes.log)
    expected = [
        *(("vllm", n) for n in names[:2] for _ in "cw"),  # each probe: cold, then warm
        *(("loraplex", n) for n in names[:2] for _ in "cw"),
        *(("loraplex", n) for n in names[2:] for _ in "cw"),
        *(("vllm", n) for n in names[2:] for _ in "cw"),
    ]
    assert models == expected
    for system in SYSTEMS:
        assert out[system]["adapters"] == names
        assert out[system]["phases"]["cold"]["ok"] == out[system]["phases"]["warm"]["ok"] == 4


def test_one_at_a_time_runs_each_system_alone_and_paces_both_by_the_baseline(
    fakes: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--one-at-a-time (engines whose memory does not fit twice): each system's server alone,
    the baseline first; the open loop still paced by the baseline's closed loop."""
    up: list[str] = []

    def start(spec: servers.ServerSpec, *args: object) -> servers.RunningServer:
        assert not up, f"{spec.system} started while {up} ran"
        up.append(spec.system)
        return fakes.running[spec.system]

    monkeypatch.setattr(runner, "start_server", start)
    monkeypatch.setattr(runner, "stop_server", lambda server: up.remove(server.spec.system))
    monkeypatch.setattr(runner, "_server_record", lambda server, assets: {"label": "x"})
    base = next(s for s in scenarios.FULL_SCENARIOS if s.name == "base")
    plan = runner.RunPlan((base,), SETTINGS, SYSTEMS, in_turns=False)
    fake = runner.Assets(root=tmp_path, base=tmp_path, adapter_names=(), adapter_ranks={})
    measured = runner.run(plan, fake, tmp_path)

    systems = [system for system, _ in itertools.groupby(s for s, *_ in fakes.log)]
    assert systems == ["vllm", "loraplex"]
    (result,) = measured["scenarios"]
    closed_rate = result["systems"]["vllm"]["phases"]["closed"]["req_per_s"]
    for system in SYSTEMS:
        rate = result["systems"][system]["phases"]["open"]["rate"]
        assert rate == pytest.approx(SETTINGS.open_load * closed_rate, rel=1e-3)
    assert result["output_agreement"]["closed"] == {"compared": 10, "identical": 10}
