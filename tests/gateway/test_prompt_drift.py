"""Prompt drift bookkeeping: which requests are sampled, the 24-hour window, the reference
(the card's dev set, else launch traffic), the ratio and its limit as exported, and the series
of versions no longer sampled going away. The engine's side (vLLM's prompt logprobs under the
adapter) is tests/e2e/test_prompt_drift.py."""

from __future__ import annotations

import asyncio
import math
import random
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

from gateway.catalog import ServedModel
from gateway.engine.client import AdapterHandle, GenerationUpdate, SamplingOptions
from gateway.engine.vllm_convert import _surprisal
from gateway.prompt_drift import MIN_WINDOW_SAMPLES, PromptDrift

HOUR = 3600.0


def served(name: str, version: int = 1) -> ServedModel:
    return ServedModel(
        name=name,
        adapter=AdapterHandle(engine_id=version, path="/x"),
        created=0,
        adapter_name=name,
        version=version,
    )


def gauge(metric: str, adapter: str, window: str | None = None) -> float | None:
    labels = {"adapter": adapter, "version": "1"}
    if window is not None:
        labels["window"] = window
    return REGISTRY.get_sample_value(metric, labels)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000 * HOUR

    def __call__(self) -> float:
        return self.now


def drift(clock: Clock | None = None, **kwargs) -> PromptDrift:
    settings = {"sample_rate": 1.0, "max_prompt_tokens": 8, "reference_samples": 3, **kwargs}
    return PromptDrift(clock=clock or Clock(), rng=random.Random(7), **settings)


def test_only_adapter_prompts_within_the_cap_are_sampled_at_the_rate():
    options = SamplingOptions(max_tokens=4)
    every = drift()
    assert every.plan(served("a"), [[1, 2, 3]], options, 1).prompt_logprobs is True
    base = ServedModel(name="base", adapter=None, created=0)
    assert every.plan(base, [[1, 2, 3]], options, 1) is options
    assert every.plan(served("a"), [[1] * 9], options, 1) is options  # past max_prompt_tokens
    assert drift(sample_rate=0).plan(served("a"), [[1]], options, 1) is options
    # n > 1 and greedy fan-out: vLLM would score the prompt once per sequence, uncached
    many = SamplingOptions(max_tokens=4, n=2)
    assert every.plan(served("a"), [[1]], many, 1) is many
    assert every.plan(served("a"), [[1], [1]], options, 2) is options
    # an echo with logprobs is an eval harness scoring answers, not the adapter's traffic
    scoring = SamplingOptions(max_tokens=1, echo_logprobs=0)
    assert every.plan(served("a"), [[1, 2]], scoring, 1) is scoring
    some = drift(sample_rate=0.25)
    picked = sum(some.plan(served("a"), [[1]], options, 1).prompt_logprobs for _ in range(10_000))
    assert 2300 < picked < 2700


def test_the_window_holds_the_last_24_hours_and_the_reference_the_first_samples():
    clock = Clock()
    monitor = drift(clock)
    name = "drift-window"
    for surprisal in (2.0, 2.0, 2.0):  # 1 nat per token over 2 tokens, three times
        monitor.record(served(name), surprisal, 2)
    assert monitor.perplexity(name, 1) == (pytest.approx(math.e), pytest.approx(math.e), 3)
    monitor.record(served(name), 12.0, 2)  # after the reference: the window only
    current, reference, prompts = monitor.perplexity(name, 1)
    assert current == pytest.approx(math.exp(18 / 8)) and reference == pytest.approx(math.e)
    assert prompts == 4
    assert gauge("loraplex_prompt_perplexity", name, "24h") == pytest.approx(math.exp(18 / 8))
    assert gauge("loraplex_prompt_perplexity", name, "reference") == pytest.approx(math.e)
    clock.now += 24 * HOUR  # the first hour leaves the window
    monitor.record(served(name), 4.0, 2)
    assert monitor.perplexity(name, 1) == (
        pytest.approx(math.exp(2)),
        pytest.approx(math.e),
        1,
    )


def test_the_ratio_is_exported_once_the_window_holds_enough_prompts():
    monitor = drift()
    name = "drift-ratio"
    for _ in range(3):
        monitor.record(served(name), 2.0, 2)  # reference e
    for _ in range(MIN_WINDOW_SAMPLES - 4):
        monitor.record(served(name), 6.0, 2)
    assert gauge("loraplex_prompt_drift_ratio", name) is None
    assert gauge("loraplex_prompt_drift_limit_ratio", name) == 1.5
    monitor.record(served(name), 6.0, 2)
    current, reference, prompts = monitor.perplexity(name, 1)
    assert prompts == MIN_WINDOW_SAMPLES
    assert gauge("loraplex_prompt_drift_ratio", name) == pytest.approx(current / reference)
    assert current / reference > 1.5  # mostly 3 nats per token against 1


def test_a_cards_dev_set_is_the_reference_and_an_unreadable_card_leaves_launch_traffic():
    async def scenario() -> None:
        cards = {
            "drift-card": {"drift": {"dev_perplexity": 9.0, "max_ratio": 3.0}},
            "drift-bare": {"owner": "x"},
        }

        async def card_of(adapter: str, version: int):
            if adapter == "drift-broken":
                raise ConnectionError("registry down")
            return cards[adapter]

        monitor = drift(card_of=card_of)
        for name in ("drift-card", "drift-bare", "drift-broken"):
            monitor.record(served(name), 2.0, 2)
        await asyncio.sleep(0)  # the card reads run
        await asyncio.sleep(0)
        assert monitor.perplexity("drift-card", 1)[1] == 9.0
        assert gauge("loraplex_prompt_perplexity", "drift-card", "reference") == 9.0
        assert gauge("loraplex_prompt_drift_limit_ratio", "drift-card") == 3.0
        for name in ("drift-bare", "drift-broken"):
            for _ in range(2):
                monitor.record(served(name), 2.0, 2)
            assert monitor.perplexity(name, 1)[1] == pytest.approx(math.e)  # launch traffic
        for _ in range(5):  # the card's reference stays, whatever comes
            monitor.record(served("drift-card"), 8.0, 2)
        assert monitor.perplexity("drift-card", 1)[1] == 9.0

    asyncio.run(scenario())


def test_a_version_no_longer_sampled_for_a_day_loses_its_series():
    clock = Clock()
    monitor = drift(clock)
    monitor.record(served("drift-gone"), 2.0, 2)
    assert gauge("loraplex_prompt_perplexity", "drift-gone", "24h") is not None
    clock.now += 24 * HOUR
    monitor.record(served("drift-stays"), 2.0, 2)
    assert gauge("loraplex_prompt_perplexity", "drift-gone", "24h") is None
    assert gauge("loraplex_prompt_drift_limit_ratio", "drift-gone") is None
    assert monitor.perplexity("drift-gone", 1) == (None, None, 0)
    assert monitor.perplexity("drift-stays", 1)[2] == 1


def test_an_update_without_prompt_logprobs_and_nonsense_are_ignored():
    monitor = drift()
    monitor.observe(
        served("drift-odd"), GenerationUpdate(prompt_tokens=3, prompt_surprisal=(2.0, 2))
    )
    monitor.observe(served("drift-odd"), GenerationUpdate(prompt_tokens=3))
    monitor.record(served("drift-odd"), math.inf, 2)
    monitor.record(served("drift-odd"), 2.0, 0)
    assert monitor.perplexity("drift-odd", 1)[2] == 1


def test_at_scrape_time_the_window_slides_and_a_stale_ratio_goes():
    """A replica that stopped sampling a version, or saw its window thin out, must not keep
    exporting the ratio of its last samples: the alert would fire on old data."""
    clock = Clock()
    monitor = drift(clock)
    name = "drift-stale"
    for _ in range(3):
        monitor.record(served(name), 2.0, 2)
    for _ in range(MIN_WINDOW_SAMPLES):
        monitor.record(served(name), 8.0, 2)
    assert gauge("loraplex_prompt_drift_ratio", name) > 1.5
    clock.now += 23 * HOUR
    monitor.refresh()
    assert gauge("loraplex_prompt_drift_ratio", name) > 1.5  # still in the window
    clock.now += 2 * HOUR  # every sample now older than 24 hours
    monitor.refresh()
    assert gauge("loraplex_prompt_drift_ratio", name) is None
    assert gauge("loraplex_prompt_perplexity", name, "24h") is None
    # a day without samples: the version is forgotten at the next scrape
    assert monitor.perplexity(name, 1) == (None, None, 0)
    # a thinner window after a busy one: the ratio goes with the prompts under 100
    for _ in range(3):
        monitor.record(served(name), 2.0, 2)
    for _ in range(MIN_WINDOW_SAMPLES):
        monitor.record(served(name), 8.0, 2)
    clock.now += 24 * HOUR
    for _ in range(10):
        monitor.record(served(name), 2.0, 2)
    assert gauge("loraplex_prompt_drift_ratio", name) is None
    assert gauge("loraplex_prompt_perplexity", name, "24h") == pytest.approx(math.e)


def test_vllms_prompt_logprobs_become_the_prompts_surprisal():
    def entry(logprob: float) -> SimpleNamespace:
        return SimpleNamespace(logprob=logprob)

    output = SimpleNamespace(
        prompt_token_ids=[1, 5, 7, 9],
        prompt_logprobs=[
            None,
            {5: entry(-1.0)},
            {7: entry(-2.5), 3: entry(-0.1)},
            {9: entry(-math.inf)},
        ],
    )
    assert _surprisal(output) == (3.5, 2)  # the first position has none; -inf is skipped
    assert _surprisal(SimpleNamespace(prompt_token_ids=[1], prompt_logprobs=None)) is None
    assert (
        _surprisal(SimpleNamespace(prompt_token_ids=[1, 2], prompt_logprobs=[None, None])) is None
    )


def test_the_warm_up_asks_for_prompt_logprobs_once_and_never_stops_a_start():
    class Engine:
        def __init__(self, fail: bool):
            self.fail, self.calls = fail, []

        async def generate(self, request_id, prompt, options, adapter):
            self.calls.append((request_id, prompt, options, adapter))
            if self.fail:
                raise RuntimeError("engine refused")
            yield GenerationUpdate(prompt_tokens=len(prompt), finished=True)

    working, failing, off = Engine(False), Engine(True), Engine(False)
    asyncio.run(drift().warm_up(working))
    asyncio.run(drift().warm_up(failing))  # logged, not raised
    asyncio.run(drift(sample_rate=0).warm_up(off))
    ((_, prompt, options, adapter),) = working.calls
    assert len(prompt) == 2
    assert options.prompt_logprobs and options.max_tokens == 1 and adapter is None
    assert len(failing.calls) == 1 and off.calls == []
