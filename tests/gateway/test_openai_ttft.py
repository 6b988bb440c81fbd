"""Time to first token of non-streamed requests. vLLM runs them FINAL_ONLY: their one update
comes when generation is over, so the gateway cannot time the first token itself. It takes
the engine's time when given (vLLM's request stats, see test_openai_vllm_embedded), and
otherwise leaves the request out of TTFT rather than record its whole latency as TTFT."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from gateway.engine.client import ChoiceDelta, GenerationUpdate
from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for

TOKEN_S = 0.05
FIRST_TOKEN_S = 0.05


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("ttft")
    build_base(root / "base")
    return root


class FinalOnlyEngine(ScriptedEngine):
    """Like vLLM: non-streamed requests get one update, at the end, with every token, and
    (`reports`) when the first token was made."""

    def __init__(self, words: list[str], reports: bool):
        super().__init__(words)
        self.reports = reports

    async def generate(self, request_id, prompt_token_ids, options, adapter):
        if options.stream:
            async for update in super().generate(request_id, prompt_token_ids, options, adapter):
                yield update
            return
        self.calls.append((request_id, adapter, options))
        count = min(options.max_tokens, len(self.words))
        await asyncio.sleep(FIRST_TOKEN_S)
        first = time.perf_counter()
        await asyncio.sleep(TOKEN_S * (count - 1))
        update = GenerationUpdate(
            len(prompt_token_ids),
            [ChoiceDelta(0, "".join(self.words[:count]), list(range(count)), None, "length")],
            finished=True,
        )
        if self.reports:
            update.first_token_at = first
        yield update


def monitor_p95_ttft_ms(client) -> float | None:
    """The rollout monitor's p95 TTFT over the base model's window (what rollbacks judge)."""
    figures = client.app.state.generation._controller._monitor.figures("base")
    return None if figures is None else figures.p95_ttft_ms


def histogram(name: str, tenant: str) -> tuple[float, float]:
    labels = {"tenant": tenant, "adapter": "", "version": ""}
    total = REGISTRY.get_sample_value(f"{name}_sum", labels) or 0.0
    count = REGISTRY.get_sample_value(f"{name}_count", labels) or 0.0
    return total, count


def test_a_non_streamed_requests_ttft_is_its_first_token_not_its_whole_latency(demo_root):
    engine = FinalOnlyEngine([f"w{i} " for i in range(20)], reports=True)
    with client_for(demo_root, engine) as client:
        started = time.monotonic()
        response = client.post(
            "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 20}
        )
        latency = time.monotonic() - started
        assert response.status_code == 200
        ttft, count = histogram("loraplex_time_to_first_token_seconds", client.tenant)
        per_token, per_token_count = histogram(
            "loraplex_time_per_output_token_seconds", client.tenant
        )
        monitored = monitor_p95_ttft_ms(client)
    assert latency > 20 * TOKEN_S * 0.9
    assert count == 1 and FIRST_TOKEN_S * 0.9 < ttft < 0.5 * latency
    assert per_token_count == 1 and TOKEN_S * 0.5 < per_token < TOKEN_S * 2
    assert monitored is not None and monitored == pytest.approx(ttft * 1000)


def test_without_the_engines_time_a_non_streamed_request_is_left_out_of_ttft(demo_root):
    engine = FinalOnlyEngine([f"w{i} " for i in range(10)], reports=False)
    with client_for(demo_root, engine) as client:
        response = client.post(
            "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 10}
        )
        assert response.status_code == 200
        _, ttft_count = histogram("loraplex_time_to_first_token_seconds", client.tenant)
        _, per_token_count = histogram("loraplex_time_per_output_token_seconds", client.tenant)
        monitored = monitor_p95_ttft_ms(client)
        streamed = client.post(
            "/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True}
        )
        assert streamed.status_code == 200
        _, ttft_after_stream = histogram("loraplex_time_to_first_token_seconds", client.tenant)
        queued = REGISTRY.get_sample_value(
            "loraplex_requests_queued", {"tenant": client.tenant, "adapter": ""}
        )
    assert ttft_count == 0 and per_token_count == 0 and monitored is None
    assert ttft_after_stream == 1  # a streamed request's tokens arrive as they are made
    assert queued == 0
