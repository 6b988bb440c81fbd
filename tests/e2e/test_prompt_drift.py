"""Prompt drift on the real engine: the perplexity the gateway exports for an adapter version
is its prompts' perplexity under that adapter (HF transformers with the adapter merged gives
the same), the reference is its card's dev set or else its first sampled prompts, and the
drift ratio is the last 24 hours' perplexity over it once 100 prompts were sampled."""

from __future__ import annotations

import asyncio
import json
import math
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DEMO_TENANT, cli
from tests.e2e.merged_reference import merged_model

pytestmark = pytest.mark.engine
REFERENCE_SAMPLES = 10  # the session gateway's LORAPLEX_DRIFT_REFERENCE_SAMPLES
FAMILIAR = [1, 45, 102, 306, 263, 124, 289, 45, 102]  # the demo vocabulary has 693 tokens
STRANGE = [1, 7, 7, 7, 600, 3, 91, 42, 42, 318, 5, 77, 640, 12]


def nll(demo, adapter: str, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token | earlier tokens) over every token after the first, and how many."""
    import torch

    model = merged_model(demo.base, demo.adapters[adapter])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    total = -sum(float(logprobs[t, ids[t + 1]]) for t in range(len(ids) - 1))
    return total, len(ids) - 1


def gauges(gateway, adapter: str) -> dict[tuple[str, str], float]:
    found = {}
    for family in text_string_to_metric_families(gateway.metrics_text()):
        for sample in family.samples:
            if sample.labels.get("adapter") == adapter and sample.name.startswith(
                ("loraplex_prompt_perplexity", "loraplex_prompt_drift")
            ):
                found[(sample.name, sample.labels.get("window", ""))] = sample.value
    return found


async def send(gateway, model: str, prompts: list[list[int]]) -> None:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    async with httpx.AsyncClient(base_url=gateway.v1, headers=headers, timeout=120) as client:
        for ids in prompts:  # in order: the first ones are the reference
            body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0}
            response = await client.post("/completions", json=body)
            assert response.status_code == 200, response.text


def register(gateway, demo, tmp_path, card: dict | None = None) -> str:
    name = f"drift-{uuid.uuid4().hex[:6]}"
    args = ["adapters", "register", str(demo.adapters["demo-qkvo-r8"]), "--name", name]
    if card is not None:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(card))
        args += ["--card", str(path)]
    registered = cli(gateway, *args, "--tenant", DEMO_TENANT)
    assert registered.returncode == 0, registered.stderr
    return name


def test_the_exported_perplexity_is_the_prompts_perplexity_under_the_adapter(
    gateway, demo, tmp_path
):
    name = register(gateway, demo, tmp_path)
    familiar, strange = nll(demo, "demo-qkvo-r8", FAMILIAR), nll(demo, "demo-qkvo-r8", STRANGE)
    asyncio.run(send(gateway, name, [FAMILIAR] * REFERENCE_SAMPLES))
    found = gauges(gateway, name)
    expected = math.exp(familiar[0] / familiar[1])
    assert found[("loraplex_prompt_perplexity", "reference")] == pytest.approx(expected, rel=1e-3)
    assert found[("loraplex_prompt_perplexity", "24h")] == pytest.approx(expected, rel=1e-3)
    assert found[("loraplex_prompt_drift_limit_ratio", "")] == 1.5
    assert ("loraplex_prompt_drift_ratio", "") not in found  # fewer than 100 prompts yet

    asyncio.run(send(gateway, name, [STRANGE] * (100 - REFERENCE_SAMPLES)))
    found = gauges(gateway, name)
    total = REFERENCE_SAMPLES * familiar[0] + (100 - REFERENCE_SAMPLES) * strange[0]
    tokens = REFERENCE_SAMPLES * familiar[1] + (100 - REFERENCE_SAMPLES) * strange[1]
    window = math.exp(total / tokens)
    assert found[("loraplex_prompt_perplexity", "24h")] == pytest.approx(window, rel=1e-3)
    assert found[("loraplex_prompt_perplexity", "reference")] == pytest.approx(expected, rel=1e-3)
    ratio = found[("loraplex_prompt_drift_ratio", "")]
    assert ratio == pytest.approx(window / expected, rel=1e-3)


def test_a_cards_dev_set_perplexity_is_the_reference_and_its_limit_the_limit(
    gateway, demo, tmp_path
):
    card = {"owner": "ml", "objective": "sft", "drift": {"dev_perplexity": 42.5, "max_ratio": 2}}
    name = register(gateway, demo, tmp_path, card)
    asyncio.run(send(gateway, name, [FAMILIAR] * 3))
    found = gauges(gateway, name)
    assert found[("loraplex_prompt_perplexity", "reference")] == 42.5
    assert found[("loraplex_prompt_drift_limit_ratio", "")] == 2


def test_eval_perplexity_measures_a_dev_set_as_drift_measures_traffic(gateway, demo, tmp_path):
    """`loraplex eval perplexity` gives the number a card's drift.dev_perplexity holds: HF's
    perplexity of the dev set with the adapter merged; its scoring requests are no traffic
    (the version has no drift series after it, though this gateway samples every request)."""
    import os
    import subprocess
    import sys

    name = register(gateway, demo, tmp_path)
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (FAMILIAR, STRANGE)))
    env = {**os.environ, "LORAPLEX_URL": gateway.base_url, "LORAPLEX_API_KEY": gateway.api_key}
    measured = subprocess.run(
        [sys.executable, "-m", "gateway", "eval", "perplexity", str(dev), "--model", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert measured.returncode == 0, measured.stdout + measured.stderr
    result = json.loads(measured.stdout)
    familiar, strange = nll(demo, "demo-qkvo-r8", FAMILIAR), nll(demo, "demo-qkvo-r8", STRANGE)
    expected = math.exp((familiar[0] + strange[0]) / (familiar[1] + strange[1]))
    assert result["tokens"] == familiar[1] + strange[1] and result["prompts"] == 2
    assert result["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert result["card"] == {"drift": {"dev_perplexity": result["perplexity"]}}
    assert gauges(gateway, name) == {}
