"""/v1 request metrics by tenant, adapter and version, and status, through the app with a
scripted engine (tests/e2e checks the same counters move under the real engine)."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("metrics")
    build_base(root / "base")
    return root


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_tokens_and_latency_are_labelled_by_tenant(demo_root):
    engine = ScriptedEngine(["a", "b", "c", "d"])
    with client_for(demo_root, engine) as client:
        tenant = client.tenant
        scope = {"tenant": tenant, "adapter": "", "version": ""}
        ok = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "max_tokens": 4})
        assert ok.status_code == 200
        missing = client.post(
            "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 4}
        )
        assert missing.status_code == 404
        unauthenticated = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x"},
            headers={"Authorization": "Bearer wrong-key-wrong-key-wrong"},
        )
        assert unauthenticated.status_code == 401
        streamed = client.post(
            "/v1/completions",
            json={"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True},
        )
        assert streamed.status_code == 200

    route = {"route": "completions"}
    assert sample("loraplex_requests_total", **scope, **route, status="200") == 2
    assert sample("loraplex_requests_total", **scope, **route, status="404") == 1
    anonymous = {"tenant": "", "adapter": "", "version": ""}
    assert sample("loraplex_requests_total", **anonymous, **route, status="401") >= 1
    assert sample("loraplex_completion_tokens_total", **scope) == 4 + 3
    assert sample("loraplex_prompt_tokens_total", **scope) > 0
    assert sample("loraplex_time_to_first_token_seconds_count", **scope) == 2
    assert sample("loraplex_time_per_output_token_seconds_count", **scope) == 2
    assert sample("loraplex_request_duration_seconds_count", **scope, **route, outcome="ok") == 2
    assert sample("loraplex_requests_in_flight", tenant=tenant, adapter="") == 0
    assert sample("loraplex_requests_queued", tenant=tenant, adapter="") == 0
    assert sample("loraplex_auth_failures_total", reason="unknown") >= 1


def test_a_stream_that_fails_midway_counts_as_a_server_error(demo_root):
    from gateway.engine.client import EngineError

    engine = ScriptedEngine(["a", "b", "c"], fail_after=1, error=EngineError("boom"))
    with client_for(demo_root, engine) as client:
        scope = {"tenant": client.tenant, "adapter": "", "version": ""}
        body = {"model": BASE, "prompt": "x", "max_tokens": 3, "stream": True}
        assert client.post("/v1/completions", json=body).status_code == 200
    route = {"route": "completions"}
    assert sample("loraplex_requests_total", **scope, **route, status="500") == 1
    assert sample("loraplex_requests_total", **scope, **route, status="200") == 0
    assert sample("loraplex_requests_in_flight", tenant=client.tenant, adapter="") == 0


@pytest.mark.parametrize(
    "shape",
    [
        {"n": 4, "temperature": 1.0},  # four sampled choices of one prompt
        {"n": 3, "temperature": 0.0},  # greedy n: one engine request per copy
        {"n": 2, "temperature": 1.0, "prompt": ["x", "y"]},  # two prompts, two choices each
    ],
    ids=["n4", "greedy-n3", "2-prompts-n2"],
)
def test_time_per_output_token_is_per_sequence(demo_root, shape):
    """Sequences decode side by side: with n choices (or several prompts) each token of each
    sequence still took the engine's inter-token delay. Dividing the wall time by every
    sequence's tokens together reported 1/n of it (review)."""
    delay = 0.05
    engine = ScriptedEngine([f"w{i}" for i in range(6)], delay=delay)
    with client_for(demo_root, engine) as client:
        scope = {"tenant": client.tenant, "adapter": "", "version": ""}
        body = {"model": BASE, "prompt": "x", "max_tokens": 6, **shape}
        reply = client.post("/v1/completions", json=body)
        assert reply.status_code == 200, reply.text
        sequences = shape["n"] * len(shape.get("prompt", "x"))
        assert reply.json()["usage"]["completion_tokens"] == 6 * sequences
    assert sample("loraplex_time_per_output_token_seconds_count", **scope) == 1
    per_token = sample("loraplex_time_per_output_token_seconds_sum", **scope)
    # asyncio.sleep never returns early: at least the delay (a little slack for clock reads).
    assert 0.9 * delay <= per_token < 10 * delay


def test_a_request_refused_after_its_model_resolved_counts_against_that_version(tmp_path):
    """A 429 or 400 for adapter `bot` (rate limit, max_tokens cap, context length) is bot's,
    not the base model's: the scope was set only once the request was admitted (review)."""
    from tests.gateway.rollout_helpers import ADMIN, build_demo_root, register

    root = build_demo_root(tmp_path)
    with client_for(root, ScriptedEngine(["a", "b"])) as client:
        tenant = client.tenant
        register(client, root, "bot", "v1")
        limits = {"requests_per_second": 1, "burst": 2, "max_tokens": 50}
        assert client.patch(f"/admin/v1/tenants/{tenant}/limits", json=limits, headers=ADMIN)
        statuses = [
            client.post("/v1/completions", json={"model": "bot", "prompt": "x", **extra})
            for extra in (
                {"max_tokens": 1},  # 200
                {"max_tokens": 51},  # 400: above the key's cap (the bucket keeps its token)
                {"max_tokens": 1},  # 200: the burst's second token
                {"max_tokens": 1},  # 429: no token left
            )
        ]
        assert [r.status_code for r in statuses] == [200, 400, 200, 429], statuses[-1].text
        chat = {"model": "bot", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
        assert client.post("/v1/chat/completions", json=chat).status_code == 429
    bot = {"tenant": tenant, "adapter": "bot", "version": "1", "route": "completions"}
    for status, count in (("200", 2), ("400", 1), ("429", 1)):
        assert sample("loraplex_requests_total", **bot, status=status) == count, status
    assert sample("loraplex_requests_total", **{**bot, "route": "chat"}, status="429") == 1
    base = {"tenant": tenant, "adapter": "", "version": "", "route": "completions"}
    for status in ("400", "429"):
        assert sample("loraplex_requests_total", **base, status=status) == 0
    assert sample("loraplex_rate_limited_total", tenant=tenant, limit="max_tokens") == 1
    assert sample("loraplex_rate_limited_total", tenant=tenant, limit="requests_per_second") == 2


def test_requests_clients_gave_up_on_are_timed(demo_root):
    """Every client hangs up on a slow engine: the latency histogram saw none of them, so the
    p95 alerts had nothing to fire on (review). They are timed until they left, as
    outcome="client_closed"; refusals are not timed at all."""
    import asyncio

    from tests.gateway.fake_engine import asgi_post

    engine = ScriptedEngine([f"w{i} " for i in range(5)], delay=0.01, first_delay=2.0)
    hang_up_s = 0.2
    with client_for(demo_root, engine) as client:
        scope = {"tenant": client.tenant, "adapter": "", "version": ""}

        async def abandon() -> list[int | None]:
            results = await asyncio.gather(
                *(
                    asgi_post(
                        client.app,
                        "/v1/completions",
                        {"model": BASE, "prompt": "x", "max_tokens": 5, "stream": stream},
                        dict(client.headers),
                        hang_up_after_s=hang_up_s,
                    )
                    for stream in (True, True, False)
                )
            )
            return [result.status for result in results]

        assert client.portal.call(abandon) == [499, 499, 499]
        refused = client.post("/v1/completions", json={"model": BASE, "prompt": "x", "n": 0})
        assert refused.status_code == 400
    route = {"route": "completions"}
    assert sample("loraplex_requests_total", **scope, **route, status="499") == 3
    closed = {**scope, **route, "outcome": "client_closed"}
    assert sample("loraplex_request_duration_seconds_count", **closed) == 3
    assert sample("loraplex_request_duration_seconds_sum", **closed) >= 3 * hang_up_s
    for outcome in ("ok", "error"):
        count = sample("loraplex_request_duration_seconds_count", **scope, **route, outcome=outcome)
        assert count == 0, outcome
