"""Adapted outputs through the HTTP API equal the merged-weight math, alone and in mixed batches."""

from __future__ import annotations

import asyncio

import openai
import pytest
from transformers import AutoTokenizer

from gateway.demo import ADAPTERS_DIR_NAME, DEMO_ADAPTERS
from kernels.page_groups import DemandEntry, demand_by_group, split_pages
from tests.conftest import (
    BASE_NAME,
    DEMO_TENANT,
    MAX_LORAS,
    issue_key,
    start_gateway,
    stop_gateway,
)
from tests.e2e.merged_reference import constrained_greedy_tokens, greedy_tokens
from tests.paged_budget import GROUP_MEMBERS, PAGE_SIZE, group_row_bytes, pages, pool_bytes

pytestmark = pytest.mark.engine

MODELS = [BASE_NAME, *(spec.name for spec in DEMO_ADAPTERS)]
PROMPTS = ["The gateway serves", "Hello world, what is the rank of"]
MAX_TOKENS = 24
# A constraint that leaves each model room to differ (measured: five different outputs).
CONSTRAINT = r"[a-z ]{1,30}\."
CONSTRAINED_MAX_TOKENS = 48  # room for 31 characters in any tokenization: each ends by itself


# The paged gateway's pool: every demo adapter at once would need Σ pages = 15 if each were
# charged in every layer; vLLM's slot buffers for the same engine take MAX_LORAS x
# max_lora_rank 32 rows = 32 pages.
PAGED_POOL_PAGES = 15


def paged_group_pages() -> dict[str, int]:
    """Pages per layer group the paged gateway's pool should have: it imports the demo
    adapters at start, so its bytes are split by their ranks and modules (kernels.page_groups)
    with room for one max_lora_rank (32) adapter in every group."""
    page_bytes = {g: PAGE_SIZE * b for g, b in group_row_bytes().items()}
    entries = [DemandEntry(s.rank, tuple(s.target_modules)) for s in DEMO_ADAPTERS]
    demand = demand_by_group(entries, GROUP_MEMBERS, PAGE_SIZE, page_bytes)
    return split_pages(pool_bytes(PAGED_POOL_PAGES), page_bytes, pages(32), demand)


@pytest.fixture(scope="module", params=["slots", "paged"])
def served(request, gateway, demo, tmp_path_factory):
    """The same tests against vLLM's own slot buffers (the session gateway) and against a
    gateway whose engine runs loraplex's paged pool (LORAPLEX_PAGED_LORA, kernels/README.md)
    with less adapter memory than vLLM's slots. The paged one imports the demo adapters at
    start, so its pool is split between layer groups by them (LORAPLEX_PAGED_SPLIT=demand)."""
    if request.param == "slots":
        yield gateway
        return
    running = start_gateway(
        demo,
        tmp_path_factory.mktemp("paged-gateway"),
        LORAPLEX_PAGED_LORA="1",
        LORAPLEX_PAGED_POOL_BYTES=str(pool_bytes(PAGED_POOL_PAGES)),
        LORAPLEX_PAGED_PAGE_SIZE=str(PAGE_SIZE),
        LORAPLEX_ADAPTER_DIR=str(demo.root / ADAPTERS_DIR_NAME),
        LORAPLEX_IMPORT_TENANT=DEMO_TENANT,
        # The other grammar backend: the constrained fidelity test holds it to the same masks.
        LORAPLEX_STRUCTURED_OUTPUTS_BACKEND="guidance",
        # Prompt logprobs on every adapter request (gateway/prompt_drift.py), as the session
        # gateway: the paged layers serve prompt positions' logits too.
        LORAPLEX_DRIFT_SAMPLE_RATE="1",
    )
    try:
        running.api_key = issue_key(running, DEMO_TENANT)
        yield running
    finally:
        stop_gateway(running)


def visible_text(tokenizer, tokens: list[int]) -> str:
    """Decoded text as a streaming detokenizer shows it: a trailing half UTF-8 character (which
    vLLM holds back until it completes) is dropped rather than printed as U+FFFD."""
    return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


@pytest.fixture(scope="module")
def tokenizer(demo):
    return AutoTokenizer.from_pretrained(demo.base)


def reference_texts(demo, tokenizer, decode) -> dict[tuple[str, str], str]:
    """(model, prompt) → the text `decode(base, adapter, prompt ids)` gives."""
    out = {}
    for model in MODELS:
        adapter = None if model == BASE_NAME else demo.adapters[model]
        for prompt in PROMPTS:
            tokens = decode(demo.base, adapter, tokenizer.encode(prompt))
            out[model, prompt] = visible_text(tokenizer, tokens)
    return out


@pytest.fixture(scope="module")
def references(demo, tokenizer):
    """From HF with the adapter merged."""
    return reference_texts(
        demo, tokenizer, lambda base, adapter, ids: greedy_tokens(base, adapter, ids, MAX_TOKENS)
    )


@pytest.fixture(scope="module")
def constrained_references(demo, tokenizer):
    """The same under CONSTRAINT."""
    return reference_texts(
        demo,
        tokenizer,
        lambda base, adapter, ids: constrained_greedy_tokens(
            base, adapter, ids, CONSTRAINT, CONSTRAINED_MAX_TOKENS
        ),
    )


def test_demo_adapters_cover_required_shapes():
    by_modules = {tuple(spec.target_modules): spec for spec in DEMO_ADAPTERS}
    qkvo = by_modules[("q_proj", "k_proj", "v_proj", "o_proj")]
    assert qkvo.rank >= 8 and qkvo.alpha != qkvo.rank
    all_seven = [s for s in DEMO_ADAPTERS if len(s.target_modules) == 7]
    assert all_seven and all_seven[0].rank >= 16 and all_seven[0].alpha != all_seven[0].rank
    assert any(spec.use_rslora for spec in DEMO_ADAPTERS)
    assert len(DEMO_ADAPTERS) >= MAX_LORAS


def test_adapters_change_the_output(references):
    for prompt in PROMPTS:
        texts = {model: references[model, prompt] for model in MODELS}
        assert len(set(texts.values())) == len(MODELS), texts


@pytest.mark.parametrize("model", MODELS)
def test_completion_equals_merged_reference(served, references, model):
    client = openai.OpenAI(base_url=served.v1, api_key=served.api_key)
    for prompt in PROMPTS:
        response = client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert response.choices[0].text == references[model, prompt], (model, prompt)


@pytest.mark.parametrize("model", ["demo-all-r16", "demo-qv-rs32", BASE_NAME])
def test_chat_equals_merged_reference(served, demo, tokenizer, model):
    messages = [{"role": "user", "content": "Which adapter is this?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer.encode(text, add_special_tokens=False)
    adapter = None if model == BASE_NAME else demo.adapters[model]
    expected = visible_text(tokenizer, greedy_tokens(demo.base, adapter, prompt_ids, MAX_TOKENS))
    client = openai.OpenAI(base_url=served.v1, api_key=served.api_key)
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == len(prompt_ids)


async def test_full_slot_mixed_burst_serves_each_request_its_own_adapter(served, references):
    """Every max_loras slot busy while base requests run in the same batches: no bleed."""
    client = openai.AsyncOpenAI(base_url=served.v1, api_key=served.api_key)
    jobs = [(model, prompt) for _ in range(2) for prompt in PROMPTS for model in MODELS]

    async def one(model: str, prompt: str) -> str:
        response = await client.completions.create(
            model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        return response.choices[0].text

    results = await asyncio.gather(*(one(model, prompt) for model, prompt in jobs))
    wrong = [
        (model, prompt, got)
        for (model, prompt), got in zip(jobs, results, strict=True)
        if got != references[model, prompt]
    ]
    assert not wrong, wrong
    await client.close()


async def test_constrained_requests_in_mixed_bursts_get_their_own_adapter_and_mask(
    served, references, constrained_references
):
    """Structured outputs mask each row of a batch by its own request's grammar: constrained
    and free requests of every model (all slots busy) in the same batches, and each output is
    its own adapter's reference under its own constraint, or none."""
    distinct = {constrained_references[m, PROMPTS[0]] for m in MODELS}
    assert len(distinct) == len(MODELS), constrained_references
    client = openai.AsyncOpenAI(base_url=served.v1, api_key=served.api_key)
    jobs = [(m, p, c) for p in PROMPTS for m in MODELS for c in (True, False)]

    async def one(model: str, prompt: str, constrained: bool) -> tuple[str, str | None]:
        extra = {"structured_outputs": {"regex": CONSTRAINT}} if constrained else {}
        response = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=CONSTRAINED_MAX_TOKENS if constrained else MAX_TOKENS,
            temperature=0,
            extra_body=extra,
        )
        return response.choices[0].text, response.choices[0].finish_reason

    results = await asyncio.gather(*(one(*job) for job in jobs))
    wrong = []
    for (model, prompt, constrained), (text, finish) in zip(jobs, results, strict=True):
        expected = (constrained_references if constrained else references)[model, prompt]
        if text != expected or (constrained and finish != "stop"):
            wrong.append((model, prompt, constrained, text, finish))
    assert not wrong, wrong
    await client.close()


async def test_streamed_burst_matches_references(served, references):
    client = openai.AsyncOpenAI(base_url=served.v1, api_key=served.api_key)

    async def one(model: str) -> str:
        stream = await client.completions.create(
            model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    results = await asyncio.gather(*(one(model) for model in MODELS))
    assert results == [references[model, PROMPTS[0]] for model in MODELS]
    await client.close()


def test_device_pool_metrics(served, request):
    """After the tests above, the paged engine's pool shows in /metrics (pages used + free =
    the pool, split between layer groups by the imported adapters, adapters paged in,
    device-tier residency); vLLM's slots report no pool."""
    from prometheus_client.parser import text_string_to_metric_families

    text = served.metrics_text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    groups: dict[str, dict[str, float]] = {}  # group -> state -> pages
    for (name, labels), count in samples.items():
        if name == "loraplex_adapter_pool_pages":
            label = dict(labels)
            groups.setdefault(label["group"], {})[label["state"]] = count
    pool = {s: sum(g.get(s, 0.0) for g in groups.values()) for s in ("used", "free")}
    if request.node.callspec.params["served"] == "slots":
        assert groups == {}
        return
    split = paged_group_pages()
    assert split != dict.fromkeys(split, PAGED_POOL_PAGES)  # the demand moved bytes
    assert {g: p["used"] + p["free"] for g, p in groups.items()} == split
    held = samples["loraplex_adapter_resident_bytes", (("tier", "device"),)]
    assert 0 < held <= pool_bytes(PAGED_POOL_PAGES)
    assert samples["loraplex_adapter_page_ins_total", ()] >= len(DEMO_ADAPTERS)
    assert samples["loraplex_adapter_page_in_bytes_total", ()] > 0
    resident = samples["loraplex_adapters_resident", (("tier", "device"),)]
    assert 1 <= resident <= len(DEMO_ADAPTERS) and pool["used"] >= pages(4)
    # Each scrape also asked the engine core for its residency waits, and got an answer (this
    # pool fits every demo adapter, so nobody waited: test_paged_engine.py measures waits).
    assert "could not read the residency waits" not in served.log_path.read_text()
