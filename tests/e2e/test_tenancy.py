"""Tenant scope through the real gateway: three tenants, private / shared-with / globally shared
adapters, every /v1 endpoint; keys revoked and expired; limits answering 429 and recovering;
and a concurrent mixed-tenant load in which every answer is checked against its own adapter."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.conftest import (
    ADMIN_TOKEN,
    BASE_NAME,
    bearer,
    cli,
    issue_key,
    tenant_with_key,
)
from tests.e2e.merged_reference import greedy_tokens

pytestmark = pytest.mark.engine

PROMPT = "The gateway serves"
MAX_TOKENS = 12
RUN = uuid.uuid4().hex[:6]  # names unique to this session's run


@dataclass(frozen=True)
class World:
    keys: dict[str, str]  # tenant → key
    adapters: dict[str, str]  # adapter name → demo adapter whose files it was registered from
    visible: dict[str, set[str]]  # tenant → names it may use (base included where allowed)


def name(stem: str) -> str:
    return f"{stem}-{RUN}"


ALPHA, BETA, GAMMA = name("alpha"), name("beta"), name("gamma")


@pytest.fixture(scope="module")
def world(gateway, demo) -> World:
    keys = {
        ALPHA: tenant_with_key(gateway, ALPHA),
        BETA: tenant_with_key(gateway, BETA),
        GAMMA: tenant_with_key(gateway, GAMMA, "--no-base"),
    }
    # (adapter, owner, demo files, --shared, extra tenants it is shared with)
    plan = [
        (name("alpha-private"), ALPHA, "demo-qkvo-r8", False, []),
        (name("beta-private"), BETA, "demo-mlp-r4", False, []),
        (name("alpha-for-beta"), ALPHA, "demo-all-r16", False, [BETA]),
        (name("gamma-global"), GAMMA, "demo-qv-rs32", True, []),
    ]
    for adapter, owner, files, shared, share_with in plan:
        args = ["adapters", "register", str(demo.adapters[files]), "--name", adapter]
        result = cli(gateway, *args, "--tenant", owner, *(["--shared"] if shared else []))
        assert result.returncode == 0, result.stderr
        for tenant in share_with:
            shared_out = cli(gateway, "adapters", "share", adapter, "--tenant", tenant)
            assert shared_out.returncode == 0, shared_out.stderr
    visible = {
        ALPHA: {BASE_NAME, name("alpha-private"), name("alpha-for-beta"), name("gamma-global")},
        BETA: {BASE_NAME, name("beta-private"), name("alpha-for-beta"), name("gamma-global")},
        GAMMA: {name("gamma-global")},  # created with --no-base
    }
    return World(keys, {a: files for a, _, files, _, _ in plan}, visible)


@pytest.fixture(scope="module")
def references(demo, world) -> dict[str, str]:
    """Adapter name → the text its own weights produce (HF with the adapter merged)."""
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    ids = tokenizer.encode(PROMPT)

    def text(adapter_files: str | None) -> str:
        adapter = None if adapter_files is None else demo.adapters[adapter_files]
        tokens = greedy_tokens(demo.base, adapter, ids, MAX_TOKENS)
        return tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")

    out = {adapter: text(files) for adapter, files in world.adapters.items()}
    out[BASE_NAME] = text(None)
    return out


def post(gateway, key: str | None, path: str, body: dict) -> httpx.Response:
    headers = bearer(key) if key is not None else {}
    return httpx.post(f"{gateway.v1}{path}", json=body, headers=headers, timeout=120)


def get(gateway, key: str, path: str) -> httpx.Response:
    return httpx.get(f"{gateway.v1}{path}", headers=bearer(key), timeout=60)


def call(gateway, key: str, endpoint: str, model: str) -> httpx.Response:
    """One request to `endpoint` for `model`; all generation is greedy and short."""
    if endpoint == "completions":
        body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        return post(gateway, key, "/completions", body)
    if endpoint == "chat":
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": model, "messages": messages, "max_tokens": 4, "temperature": 0}
        return post(gateway, key, "/chat/completions", body)
    if endpoint == "chat-stream":
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": model, "messages": messages, "max_tokens": 4, "stream": True}
        return post(gateway, key, "/chat/completions", body)
    assert endpoint == "retrieve"
    return get(gateway, key, f"/models/{model}")


def metric_value(gateway, sample: str, **labels: str) -> float:
    """One sample of the live /metrics scrape (0 when the series does not exist yet)."""
    text = gateway.metrics_text()
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == sample and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return 0.0


def not_found_shape(response: httpx.Response, model: str) -> dict:
    """The 404 body with the requested name blanked: must be byte-identical otherwise."""
    assert response.status_code == 404, response.text
    return httpx.Response(200, content=response.text.replace(model, "<model>")).json()


ENDPOINTS = ["completions", "chat", "chat-stream", "retrieve"]


@pytest.mark.parametrize("tenant", [ALPHA, BETA, GAMMA])
def test_models_lists_exactly_what_the_tenant_may_use(gateway, world, tenant):
    listed = {m["id"] for m in get(gateway, world.keys[tenant], "/models").json()["data"]}
    assert listed == world.visible[tenant]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("tenant", [ALPHA, BETA, GAMMA])
def test_scope_matrix(gateway, world, references, tenant, endpoint):
    """Every tenant by every adapter (own, shared-with, global, foreign, the demo tenant's, the
    base, one that does not exist) by every /v1 endpoint."""
    key = world.keys[tenant]
    candidates = [*world.adapters, BASE_NAME, "demo-qkvo-r8", name("never-registered")]
    refusals = {}
    for model in candidates:
        response = call(gateway, key, endpoint, model)
        if model in world.visible[tenant]:
            assert response.status_code == 200, (tenant, model, response.text)
            if endpoint == "completions":
                assert response.json()["choices"][0]["text"] == references[model], model
        else:
            refusals[model] = not_found_shape(response, model)
    # Foreign, other tenants', forbidden base and unknown names all read the same.
    shapes = list(refusals.values())
    assert shapes and all(shape == shapes[0] for shape in shapes), refusals
    assert shapes[0]["error"]["code"] == "model_not_found"


def test_versions_of_foreign_adapters_are_not_addressable_either(gateway, world):
    foreign = name("beta-private")
    pinned = call(gateway, world.keys[ALPHA], "completions", f"{foreign}@1")
    missing = call(gateway, world.keys[ALPHA], "completions", f"{name('nope')}@1")
    assert not_found_shape(pinned, f"{foreign}@1") == not_found_shape(missing, f"{name('nope')}@1")
    own = call(gateway, world.keys[BETA], "completions", f"{foreign}@1")
    assert own.status_code == 200


def test_unshare_takes_effect_on_the_next_request(gateway, world):
    adapter = name("alpha-for-beta")
    assert call(gateway, world.keys[BETA], "completions", adapter).status_code == 200
    assert cli(gateway, "adapters", "unshare", adapter, "--tenant", BETA).returncode == 0
    try:
        assert call(gateway, world.keys[BETA], "completions", adapter).status_code == 404
        assert call(gateway, world.keys[ALPHA], "completions", adapter).status_code == 200
    finally:
        assert cli(gateway, "adapters", "share", adapter, "--tenant", BETA).returncode == 0
    assert call(gateway, world.keys[BETA], "completions", adapter).status_code == 200


def test_missing_bad_revoked_and_expired_keys_get_the_same_401(gateway, world):
    tenant = name("keys")
    key = tenant_with_key(gateway, tenant)
    ok = call(gateway, key, "retrieve", BASE_NAME)
    assert ok.status_code == 200

    listed = cli(gateway, "keys", "list", "--tenant", tenant)
    assert listed.returncode == 0 and key not in listed.stdout  # ids only, never secrets
    revoked = cli(gateway, "keys", "revoke", key, "--reason", "leaked")
    assert revoked.returncode == 0, revoked.stderr
    assert '"status": "revoked"' in revoked.stdout
    after_revoke = call(gateway, key, "retrieve", BASE_NAME)  # the very next request

    short_lived = issue_key(gateway, tenant, "--expires-in-days", "0.00002")  # ≈ 1.7 s
    assert call(gateway, short_lived, "retrieve", BASE_NAME).status_code == 200
    time.sleep(2.5)
    after_expiry = call(gateway, short_lived, "retrieve", BASE_NAME)

    revoked_before = metric_value(gateway, "loraplex_auth_failures_total", reason="revoked")
    body = {"model": BASE_NAME, "prompt": "x", "max_tokens": 1}
    no_key = post(gateway, None, "/completions", body)
    garbage = post(gateway, "sk-not-a-loraplex-key", "/completions", body)
    forged = post(gateway, key[:-4] + "AAAA", "/completions", body)  # right id, wrong secret
    responses = [after_revoke, after_expiry, no_key, garbage, forged]
    assert [r.status_code for r in responses] == [401] * 5
    assert all(r.json() == no_key.json() for r in responses), [r.text for r in responses]
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert no_key.headers["www-authenticate"] == "Bearer"
    # `forged` presents the revoked key's id: counted as unknown, not as revoked.
    revoked_after = metric_value(gateway, "loraplex_auth_failures_total", reason="revoked")
    assert revoked_after == revoked_before
    assert metric_value(gateway, "loraplex_auth_failures_total", reason="missing") >= 1

    log = gateway.log_path.read_text(errors="replace")
    assert "auth.failure" in log and "reason=revoked" in log and "reason=expired" in log
    # lpx_<id>_<secret>; the secret is base64url and may hold "_" itself (rsplit once took a
    # one-letter tail of it, found in a log line by chance)
    secret_part = key.split("_", 2)[2]
    assert secret_part not in log and "sk-not-a-loraplex-key" not in log


def prefix_cache_hits(gateway) -> float:
    return metric_value(gateway, "vllm:prefix_cache_hits_total")


def hits_after(gateway, key: str, prompt: str, before: float, expect_more: bool) -> float:
    """Send `prompt` to the base model; the engine's prefix-cache hit count once it shows (its
    metrics are recorded as its step's outputs are handled, a moment after the response)."""
    body = {"model": BASE_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    response = post(gateway, key, "/completions", body)
    assert response.status_code == 200, response.text
    cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert (cached > 0) == expect_more, cached  # what the caller is told matches the engine
    deadline = time.monotonic() + (5.0 if expect_more else 1.0)
    while (hits := prefix_cache_hits(gateway)) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    return hits


def test_a_tenant_never_hits_the_prefix_cache_of_another_tenants_prompt(gateway, demo, world):
    """How fast a prompt starts would tell a tenant that another sent the same prefix: the
    gateway salts vLLM's prefix cache with the tenant (LORAPLEX_PREFIX_CACHE_SCOPE=tenant)."""
    tokenizer = AutoTokenizer.from_pretrained(demo.base)
    prompt = f"{uuid.uuid4().hex} " + " ".join(f"the gateway serves tenant {i}" for i in range(80))
    assert len(tokenizer(prompt)["input_ids"]) > 400  # several full KV blocks to reuse
    alpha, beta = world.keys[ALPHA], world.keys[BETA]
    start = prefix_cache_hits(gateway)
    first = hits_after(gateway, alpha, prompt, start, expect_more=False)
    assert first == start  # a prompt nobody sent before
    again = hits_after(gateway, alpha, prompt, first, expect_more=True)
    assert again > first  # the cache is on: alpha reuses its own prefix
    other = hits_after(gateway, beta, prompt, again, expect_more=False)
    assert other == again  # beta's identical prompt found nothing of alpha's
    assert hits_after(gateway, beta, prompt, other, expect_more=True) > other  # but its own


def test_tenant_keys_are_refused_on_admin_routes(gateway, world):
    for path in ("/adapters", "/tenants", "/keys", "/health"):
        response = httpx.get(
            f"{gateway.base_url}/admin/v1{path}", headers=bearer(world.keys[ALPHA]), timeout=30
        )
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_admin_token"
    admin_key_on_v1 = get(gateway, ADMIN_TOKEN, "/models")
    assert admin_key_on_v1.status_code == 401  # and the admin token is no tenant key


def test_requests_per_second_limit_answers_429_and_recovers(gateway):
    tenant = name("rps")
    key = tenant_with_key(gateway, tenant, "--rps", "0.25")  # burst 1, one per 4 s
    body = {"model": BASE_NAME, "prompt": "x", "max_tokens": 1}
    assert post(gateway, key, "/completions", body).status_code == 200
    refused = post(gateway, key, "/completions", body)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    counted = metric_value(
        gateway, "loraplex_rate_limited_total", tenant=tenant, limit="requests_per_second"
    )
    assert counted == 1
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 4
    time.sleep(retry_after + 0.2)
    assert post(gateway, key, "/completions", body).status_code == 200


def test_tokens_per_minute_limit_and_max_tokens_cap(gateway):
    tenant = name("tpm")
    key = tenant_with_key(gateway, tenant, "--tpm", "300", "--max-tokens", "200")
    big = {"model": BASE_NAME, "prompt": "x", "max_tokens": 201}
    capped = post(gateway, key, "/completions", big)
    assert capped.status_code == 400 and capped.json()["error"]["param"] == "max_tokens"
    run = {"model": BASE_NAME, "prompt": "x", "max_tokens": 200, "ignore_eos": True}
    assert post(gateway, key, "/completions", run).status_code == 200  # ≈ 202 of 300 spent
    refused = post(gateway, key, "/completions", run)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    # Raising the limit through the admin CLI applies from the next request, the time since
    # the last one counted at the new rate (100 000 a minute: the 202 missing take 0.1 s).
    raised = cli(gateway, "tenants", "limits", tenant, "--tpm", "100000")
    assert raised.returncode == 0, raised.stderr
    time.sleep(0.5)
    assert post(gateway, key, "/completions", run).status_code == 200


async def test_max_concurrent_limit(gateway):
    """Six requests of 4 sequences at once against a limit of 4 sequences: the one admitted
    runs for seconds (8000 tokens), so the others arrive while it holds the slots; a request
    of more sequences than the limit can never run (400)."""
    key = tenant_with_key(gateway, name("conc"), "--max-concurrent", "4")
    long_run = {"model": BASE_NAME, "prompt": "x", "max_tokens": 2000, "n": 4}
    long_run |= {"ignore_eos": True, "temperature": 1.0}
    async with httpx.AsyncClient(timeout=300, headers=bearer(key)) as client:
        url = f"{gateway.v1}/completions"
        too_wide = await client.post(url, json={**long_run, "n": 5, "max_tokens": 1})
        assert too_wide.status_code == 400, too_wide.text
        assert too_wide.json()["error"]["code"] == "max_concurrent_exceeded"
        responses = await asyncio.gather(*(client.post(url, json=long_run) for _ in range(6)))
        statuses = sorted(r.status_code for r in responses)
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"]["message"].startswith("Too many concurrent sequences")
        assert refused.headers["retry-after"] == "1"
        # Everything finished: the slot is free again.
        short = {"model": BASE_NAME, "prompt": "x", "max_tokens": 1}
        assert (await client.post(url, json=short)).status_code == 200


async def test_concurrent_mixed_tenant_load_each_answer_from_its_own_adapter(
    gateway, world, references
):
    jobs = [
        (tenant, model)
        for _ in range(3)
        for tenant in (ALPHA, BETA, GAMMA)
        for model in sorted(world.visible[tenant])
    ]
    clients = {
        tenant: openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=300)
        for tenant, key in world.keys.items()
    }
    scope = {"tenant": BETA, "adapter": name("alpha-for-beta"), "version": "1"}
    route = {"route": "completions", "status": "200"}
    before = {
        "requests": metric_value(gateway, "loraplex_requests_total", **scope, **route),
        "ttft": metric_value(gateway, "loraplex_time_to_first_token_seconds_count", **scope),
        "tokens": metric_value(gateway, "loraplex_completion_tokens_total", **scope),
        "owner": metric_value(
            gateway, "loraplex_requests_total", **{**scope, "tenant": ALPHA}, **route
        ),
    }

    used: dict[tuple[str, str], int] = {}

    async def one(tenant: str, model: str) -> str:
        response = await clients[tenant].completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0
        )
        assert response.usage is not None
        used[tenant, model] = used.get((tenant, model), 0) + response.usage.completion_tokens
        return response.choices[0].text

    results = await asyncio.gather(*(one(tenant, model) for tenant, model in jobs))
    wrong = [
        (tenant, model, got)
        for (tenant, model), got in zip(jobs, results, strict=True)
        if got != references[model]
    ]
    assert not wrong, wrong
    assert len(set(references.values())) == len(references)  # the check can tell them apart
    # Metrics moved for the caller's tenant and the exact adapter version, not the owner's.
    assert metric_value(gateway, "loraplex_requests_total", **scope, **route) == (
        before["requests"] + 3
    )
    ttft = metric_value(gateway, "loraplex_time_to_first_token_seconds_count", **scope)
    assert ttft == before["ttft"] + 3
    tokens = metric_value(gateway, "loraplex_completion_tokens_total", **scope)
    assert tokens == before["tokens"] + used[BETA, name("alpha-for-beta")]
    owner = metric_value(gateway, "loraplex_requests_total", **{**scope, "tenant": ALPHA}, **route)
    assert owner == before["owner"] + 3
    assert metric_value(gateway, "loraplex_engine_up") == 1
    for client in clients.values():
        await client.close()
