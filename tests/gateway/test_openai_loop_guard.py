"""The loop guard through the gateway's seams (scripted engine): the deployment's guard reaches
the engine for requests that send none, a request's own repetition_detection replaces it, its
bounds are checked before the engine, and a sequence the guard ended is counted per version.
The real engine stopping a loop: tests/e2e/test_loop_guard.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from gateway.engine.client import ChoiceDelta, GenerationUpdate, LoopGuard
from gateway.schemas.loop_guard import (
    MAX_LOOP_COUNT,
    MAX_LOOP_PATTERN,
    MAX_LOOP_WORK,
    RepetitionDetection,
    loop_work,
)
from gateway.settings import Settings
from tests.gateway.fake_engine import BASE, ScriptedEngine, built_demo_root, client_for

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return built_demo_root(tmp_path_factory, "loop-guard")


class LoopingEngine(ScriptedEngine):
    """Ends every choice as vLLM's loop guard does: finish_reason "repetition"."""

    def __init__(self):
        super().__init__(["ab"])

    async def generate(self, request_id, prompt_token_ids, options, adapter) -> AsyncIterator:
        self.calls.append((request_id, adapter, options))
        choices = [
            ChoiceDelta(index=c, text="abab", token_ids=[1, 2, 1, 2], finish_reason="repetition")
            for c in range(options.n)
        ]
        yield GenerationUpdate(prompt_tokens=len(prompt_token_ids), choices=choices, finished=True)


def chat(client, **extra):
    return client.post(
        "/v1/chat/completions", json={"model": BASE, "messages": CHAT, "max_tokens": 4, **extra}
    )


def test_the_deployments_guard_applies_unless_a_request_sends_its_own(demo_root):
    engine = ScriptedEngine(["a"] * 8)
    with client_for(demo_root, engine, loop_guard_max_pattern=16, loop_guard_min_count=6) as c:
        assert chat(c).status_code == 200
        assert engine.calls[-1][2].loop_guard == LoopGuard(16, 0, 6)
        own = {"max_pattern_size": 4, "min_pattern_size": 2, "min_count": 3}
        assert chat(c, repetition_detection=own).status_code == 200
        assert engine.calls[-1][2].loop_guard == LoopGuard(4, 2, 3)
        assert chat(c, completion=None).status_code == 200  # unknown fields change nothing
        assert engine.calls[-1][2].loop_guard == LoopGuard(16, 0, 6)
        for off in ({"max_pattern_size": 0}, {"max_pattern_size": 0, "min_count": 0}):
            assert chat(c, repetition_detection=off).status_code == 200  # vLLM's "off"
            assert engine.calls[-1][2].loop_guard is None
    with client_for(demo_root, engine) as c:  # off by default
        assert chat(c).status_code == 200
        assert engine.calls[-1][2].loop_guard is None


@pytest.mark.parametrize(
    ("guard", "param"),
    [
        ({"max_pattern_size": -1, "min_count": 4}, "repetition_detection.max_pattern_size"),
        # Work per sequence and step past 16/16's (measured 0.4-1.1 ms at 64/64 at worst).
        ({"max_pattern_size": 64, "min_count": 64}, "repetition_detection"),
        ({"max_pattern_size": 17, "min_count": 16}, "repetition_detection"),
        (
            {"max_pattern_size": MAX_LOOP_PATTERN + 1, "min_count": 4},
            "repetition_detection.max_pattern_size",
        ),
        ({"max_pattern_size": 4, "min_count": 1}, "repetition_detection"),
        (
            {"max_pattern_size": 4, "min_count": MAX_LOOP_COUNT + 1},
            "repetition_detection.min_count",
        ),
        ({"max_pattern_size": 4}, "repetition_detection"),
        (
            {"max_pattern_size": 4, "min_pattern_size": 5, "min_count": 4},
            "repetition_detection",
        ),
        ({"max_pattern_size": 4, "min_count": 4, "window": 9}, "repetition_detection.window"),
    ],
)
def test_a_guard_out_of_bounds_is_a_400_before_the_engine(demo_root, guard, param):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        response = chat(client, repetition_detection=guard)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert engine.calls == []


@pytest.mark.parametrize(
    "bad",
    [
        {"loop_guard_max_pattern": -1},
        {"loop_guard_max_pattern": MAX_LOOP_PATTERN + 1},
        {"loop_guard_min_count": 1},
        {"loop_guard_min_count": MAX_LOOP_COUNT + 1},
        {"loop_guard_max_pattern": 64, "loop_guard_min_count": 64},
    ],
)
def test_the_deployments_guard_is_bounded_as_a_requests(bad):
    with pytest.raises(ValueError):
        Settings(**bad)


def test_sequences_the_guard_ended_are_counted_per_version_and_returned(demo_root):
    with client_for(demo_root, LoopingEngine()) as client:
        labels = {"tenant": client.tenant, "adapter": "", "version": ""}
        response = chat(client, n=2, temperature=1)
    assert [c["finish_reason"] for c in response.json()["choices"]] == ["repetition"] * 2
    assert REGISTRY.get_sample_value("loraplex_loop_stops_total", labels) == 2


def test_the_largest_guards_allowed_are_within_the_work_bound():
    for size, count in ((16, 16), (32, 4), (8, 32), (63, 2), (1, 64)):
        RepetitionDetection(max_pattern_size=size, min_count=count)
        Settings(loop_guard_max_pattern=size, loop_guard_min_count=count)
    assert loop_work(16, 16) <= MAX_LOOP_WORK < loop_work(17, 16)
