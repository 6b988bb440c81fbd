"""Versions made from other versions' weights, against the live gateway and HF: a stack
answers what HF gives with its components merged into the base, a truncation what HF gives
with the truncated weights merged; the CLI's stack, spectrum, truncate and derived commands."""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

from registry.rank_spectrum import write_truncated
from tests.conftest import DEMO_TENANT, cli
from tests.e2e.merged_reference import greedy_tokens, greedy_tokens_of, merged_stack_model

pytestmark = pytest.mark.engine


def test_a_stack_serves_the_weighted_sum_of_its_components(gateway, demo, tmp_path):
    """Two demo adapters (q/k/v/o r8 and all seven r16, different alphas) stacked from the CLI
    with weights 1 and 0.5: the stack (rank 24, one slot) answers what HF gives with both
    merged into the base that way, and neither component alone does."""
    cards = {
        "stack-task": {
            "objective": "sft",
            "stacking": {"mode": "allow_listed", "with_objectives": ["safety_guardrail"]},
        },
        "stack-guard": {
            "objective": "safety_guardrail",
            "stacking": {"mode": "allow_listed", "with_adapters": ["stack-task"]},
        },
    }
    sources = {"stack-task": "demo-qkvo-r8", "stack-guard": "demo-all-r16"}
    for name, card in cards.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"owner": "ml@demo", **card}))
        registered = cli(
            gateway,
            "adapters",
            "register",
            str(demo.adapters[sources[name]]),
            "--name",
            name,
            "--tenant",
            DEMO_TENANT,
            "--card",
            str(path),
        )
        assert registered.returncode == 0, registered.stderr
    refused = cli(
        gateway,
        "adapters",
        "stack",
        "stack-guard",
        "demo-mlp-r4",
        "--name",
        "demo-stack",
        "--tenant",
        DEMO_TENANT,
    )
    assert refused.returncode == 1 and "has no Adaptation Card" in refused.stderr
    bad_weight = cli(
        gateway,
        "adapters",
        "stack",
        "stack-task",
        "stack-guard:x",
        "--name",
        "demo-stack",
        "--tenant",
        DEMO_TENANT,
    )
    assert bad_weight.returncode == 2
    stacked = cli(
        gateway,
        "adapters",
        "stack",
        "stack-task",
        "stack-guard@1:0.5",
        "--name",
        "demo-stack",
        "--tenant",
        DEMO_TENANT,
    )
    assert stacked.returncode == 0, stacked.stderr
    assert json.loads(stacked.stdout)["rank"] == 24

    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    components = ((demo.adapters["demo-qkvo-r8"], 1.0), (demo.adapters["demo-all-r16"], 0.5))
    reference = merged_stack_model(demo.base, components)
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0)
    for prompt in ("The gateway serves", "Hello world, what is the rank of"):
        want_ids = greedy_tokens_of(reference, tokenizer.encode(prompt), 16)
        want = tokenizer.decode(want_ids, skip_special_tokens=True).rstrip("\ufffd")
        texts = {
            model: client.completions.create(
                model=model, prompt=prompt, max_tokens=16, temperature=0
            )
            .choices[0]
            .text
            for model in ("demo-stack", "stack-task", "stack-guard")
        }
        assert texts["demo-stack"] == want, (prompt, texts, want)
        assert texts["stack-task"] != want and texts["stack-guard"] != want, texts


def test_a_truncated_version_serves_what_hf_gives_with_it_merged(gateway, demo, tmp_path):
    """`loraplex adapters spectrum` and `truncate` from the CLI; the rank-6 version of a rank-16
    adapter answers as HF does with the same truncation merged into the base."""
    source = demo.adapters["demo-all-r16"]
    registered = cli(
        gateway,
        "adapters",
        "register",
        str(source),
        "--name",
        "trunc-bot",
        "--tenant",
        DEMO_TENANT,
    )
    assert registered.returncode == 0, registered.stderr
    spectrum = cli(gateway, "adapters", "spectrum", "trunc-bot@1", "--energy", "0.9")
    assert spectrum.returncode == 0, spectrum.stderr
    report = json.loads(spectrum.stdout)
    assert report["rank"] == 16 and 1 <= report["rank_needed"] <= 16
    assert "singular_values" not in report["modules"][0]
    truncated = cli(gateway, "adapters", "truncate", "trunc-bot@1", "--rank", "6")
    assert truncated.returncode == 0, truncated.stderr
    assert json.loads(truncated.stdout)["rank"] == 6
    neither = cli(gateway, "adapters", "truncate", "trunc-bot@1")
    assert neither.returncode == 2
    derived = cli(gateway, "adapters", "derived", "trunc-bot@1")
    assert derived.returncode == 0, derived.stderr
    assert [(d["adapter"], d["version"], d["how"]) for d in json.loads(derived.stdout)["data"]] == [
        ("trunc-bot", 2, "truncation")
    ]

    write_truncated(source, tmp_path / "r6", 6)  # the same arithmetic, for the reference
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0)
    differs = False
    for prompt in ("The gateway serves", "Hello world, what is the rank of"):
        ids = greedy_tokens(demo.base, tmp_path / "r6", tokenizer.encode(prompt), 16)
        differs |= ids != greedy_tokens(demo.base, source, tokenizer.encode(prompt), 16)
        want = tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
        got = (
            client.completions.create(
                model="trunc-bot@2", prompt=prompt, max_tokens=16, temperature=0
            )
            .choices[0]
            .text
        )
        assert got == want, (prompt, got, want)
    assert differs  # the truncation changed the output: the test tells the versions apart
