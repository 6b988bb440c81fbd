"""The loop guard through the real engine (the session gateway, no deployment guard): a request
whose output loops (a logit bias forces one token over and over) is ended after `min_count`
repeats with finish_reason "repetition" and counted for its adapter version; without the guard
the same request runs to max_tokens."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.engine
ADAPTER = "demo-mlp-r4"
LOOP = {"logit_bias": {"40": 100}}  # token 40 wins every step: a loop of one token


def loop_stops(gateway) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(gateway.metrics_text())
        for sample in family.samples
        if sample.name == "loraplex_loop_stops_total" and sample.labels["adapter"] == ADAPTER
    )


async def test_a_looping_output_is_ended_by_the_guard_and_counted(gateway, aclient):
    before = loop_stops(gateway)
    guarded = await aclient.completions.create(
        model=ADAPTER,
        prompt="Loop now:",
        max_tokens=50,
        temperature=0,
        extra_body={**LOOP, "repetition_detection": {"max_pattern_size": 4, "min_count": 5}},
    )
    assert guarded.choices[0].finish_reason == "repetition"
    assert guarded.usage.completion_tokens == 5  # one token, five times in a row
    assert loop_stops(gateway) == before + 1
    unguarded = await aclient.completions.create(
        model=ADAPTER, prompt="Loop now:", max_tokens=50, temperature=0, extra_body=LOOP
    )
    assert unguarded.choices[0].finish_reason == "length"
    assert unguarded.usage.completion_tokens == 50
    assert unguarded.choices[0].text.startswith(guarded.choices[0].text)
