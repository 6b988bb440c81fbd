"""Shadow mode through the app with the scripted engine: the client always gets the stable's
answer; a copy of the request reaches the candidate afterwards (same prompt and options, one
choice, same tenant, not charged to its limits); divergence, latency and outcomes are counted;
mirrors over the in-flight cap are dropped; callers outside the share, canary callers and pinned
requests are not mirrored. The real engine's version is in tests/e2e/test_rollout.py."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from gateway.demo import DemoAdapterSpec, build_adapter
from gateway.rollout_router import sticky_key
from registry.rollout import assign, shadow_bucket_key
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, register, wait_for

WORDS = ["a", "b", "c", "d"]
CANDIDATE = ["a", "b", "x", "y"]  # shares 2 of 4 tokens with the stable: divergence 0.5


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = build_demo_root(tmp_path_factory.mktemp("shadow"))
    spec = DemoAdapterSpec("v3", 8, 16, ["q_proj", "v_proj"], seed=3)
    build_adapter(root / "base", root / "v3", spec)
    return root


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def shadow_calls(engine: ScriptedEngine) -> list:
    return [call for call in engine.calls if call[0].startswith("shadow-")]


def last_client_call(engine: ScriptedEngine) -> int:
    """The engine id the last client request reached (mirrors may have run since)."""
    return next(c for c in reversed(engine.calls) if not c[0].startswith("shadow-"))[1].engine_id


def complete(client, model: str, user: str | None = None, **extra) -> dict:
    body = {"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0, **extra}
    if user is not None:
        body["user"] = user
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def with_shadow(client, engine: ScriptedEngine, root, name: str, percent: int) -> tuple[int, int]:
    """`name`: v1 stable, v2 evaluated in shadow at `percent` %, answering CANDIDATE.
    Returns the engine ids of v1 and v2."""
    register(client, root, name, "v1")
    register(client, root, name, "v2")
    early = {"version": 2, "percent": percent}
    refused = client.post(f"/admin/v1/rollouts/{name}/shadow", json=early, headers=ADMIN)
    assert refused.status_code == 409, refused.text  # not evaluated yet
    assert "starts from evaluated" in refused.json()["error"]["message"]
    evaluated = client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN)
    assert evaluated.status_code == 200, evaluated.text
    body = {"version": 2, "percent": percent, "reason": "evals passed"}
    started = client.post(f"/admin/v1/rollouts/{name}/shadow", json=body, headers=ADMIN)
    assert started.status_code == 200, started.text
    assert started.json()["shadow_version"] == 2 and started.json()["shadow_percent"] == percent
    assert started.json()["stable_version"] == 1
    ids = []
    for version in (1, 2):  # pinned requests: never mirrored
        complete(client, f"{name}@{version}")
        ids.append(last_client_call(engine))
    assert shadow_calls(engine) == []
    engine.words_for[ids[1]] = CANDIDATE
    return ids[0], ids[1]


def windows(client, name: str) -> dict:
    status = client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN)
    assert status.status_code == 200, status.text
    return status.json()["windows"]


def test_client_gets_the_stable_and_the_candidate_gets_a_copy(demo_root):
    engine = ScriptedEngine(WORDS)
    name = "sh-copy"
    with client_for(demo_root, engine, enable_faults=True) as client:
        stable, candidate = with_shadow(client, engine, demo_root, name, 100)
        labels = {"adapter": name, "version": "2"}
        before = {
            "diverged": sample("loraplex_shadow_requests_total", **labels, outcome="diverged"),
            "ratio": sample("loraplex_shadow_divergence_ratio_sum", **labels),
            "ttft": sample("loraplex_shadow_time_to_first_token_seconds_count", **labels),
            "e2e": sample("loraplex_shadow_duration_seconds_count", **labels),
            # The pinned name@2 request above is served traffic, not in the shadow's window.
            "samples": windows(client, name).get(f"{name}@2", {"samples": 0})["samples"],
        }
        assert before["samples"] == 0
        assert sample("loraplex_shadow_percent", **labels) == 100

        for i in range(5):
            answer = complete(client, name, user=f"user-{i}", seed=7)
            assert answer["choices"][0]["text"] == "abcd"  # the stable's words, never x/y
        # Chat with n=2 at temperature 0 runs two greedy copies: mirrored once, one choice.
        chat = client.post(
            "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "n": 2,
                  "max_tokens": 4, "temperature": 0},
        )  # fmt: skip
        assert chat.status_code == 200, chat.text
        assert {c["message"]["content"] for c in chat.json()["choices"]} == {"abcd"}

        assert wait_for(lambda: len(shadow_calls(engine)) == 6), shadow_calls(engine)
        for _, adapter, options in shadow_calls(engine):
            assert adapter is not None and adapter.engine_id == candidate
            assert (options.n, options.max_tokens, options.temperature) == (1, 4, 0)
        assert [c[2].seed for c in shadow_calls(engine)[:5]] == [7] * 5  # same options
        assert stable != candidate
        diverged = lambda: sample(  # noqa: E731
            "loraplex_shadow_requests_total", **labels, outcome="diverged"
        )
        assert wait_for(lambda: diverged() - before["diverged"] == 6)  # counted when done

        def after(key: str, metric: str) -> float:
            return sample(metric, **labels) - before[key]

        assert after("ratio", "loraplex_shadow_divergence_ratio_sum") == pytest.approx(3.0)
        assert after("ttft", "loraplex_shadow_time_to_first_token_seconds_count") == 6
        assert after("e2e", "loraplex_shadow_duration_seconds_count") == 6
        # The monitor recorded each mirror in the candidate's window (no verdict: no rollback).
        assert windows(client, name)[f"{name}@2"]["samples"] - before["samples"] == 6
        assert client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()["stage"] is None

        # Identical output is a match with divergence 0.
        engine.words_for[candidate] = WORDS
        complete(client, name, user="user-0")
        assert wait_for(
            lambda: sample("loraplex_shadow_requests_total", **labels, outcome="match") == 1
        )

        # Not charged to the tenant: with one request allowed at a time and the candidate made
        # slow, the caller's next request is admitted while its mirror still runs.
        limits = {"max_concurrent": 1}
        patched = client.patch(
            f"/admin/v1/tenants/{client.tenant}/limits", json=limits, headers=ADMIN
        )
        assert patched.status_code == 200, patched.text
        fault = {"adapter": name, "version": 2, "latency_ms": 1500}
        assert client.post("/admin/v1/faults", json=fault, headers=ADMIN).status_code == 200
        running = len(shadow_calls(engine))
        complete(client, name, user="user-1")
        complete(client, name, user="user-2")  # 200: the mirror holds no tenant slot
        assert len(shadow_calls(engine)) == running  # both mirrors still sleeping in the fault
        assert wait_for(lambda: len(shadow_calls(engine)) == running + 2)


def test_an_echo_with_logprobs_is_mirrored_without_its_prompt_logprobs(demo_root):
    """Nothing reads a mirror's logprobs: asking for the prompt's would only cost the candidate
    every prompt position's logits and its prefix cache."""
    engine = ScriptedEngine(WORDS)
    name = "sh-echo"
    with client_for(demo_root, engine) as client:
        with_shadow(client, engine, demo_root, name, 100)
        answer = complete(client, name, user="user-1", echo=True, logprobs=1, max_tokens=2)
        assert answer["choices"][0]["logprobs"]["token_logprobs"][0] is None
        client_call = next(c for c in reversed(engine.calls) if not c[0].startswith("shadow-"))
        assert client_call[2].echo_logprobs == 1
        assert wait_for(lambda: len(shadow_calls(engine)) == 1)
        mirrored = shadow_calls(engine)[0][2]
        assert mirrored.echo_logprobs is None and mirrored.logprobs is None


def test_mirrors_over_the_cap_are_dropped_and_failures_counted(demo_root):
    engine = ScriptedEngine(WORDS)
    name = "sh-cap"
    with client_for(demo_root, engine, enable_faults=True, shadow_max_inflight=1) as client:
        with_shadow(client, engine, demo_root, name, 100)
        labels = {"adapter": name, "version": "2"}
        fault = {"adapter": name, "version": 2, "latency_ms": 1500, "error_rate": 1.0}
        assert client.post("/admin/v1/faults", json=fault, headers=ADMIN).status_code == 200
        for i in range(3):  # the first mirror sleeps 1.5 s; the next two find the cap full
            assert complete(client, name, user=f"user-{i}")["choices"][0]["text"] == "abcd"
        assert sample("loraplex_shadow_requests_total", **labels, outcome="dropped") == 2
        # The one that ran failed in the candidate: an error for the shadow, none for clients.
        assert wait_for(
            lambda: sample("loraplex_shadow_requests_total", **labels, outcome="error") == 1
        )
        assert windows(client, name)[f"{name}@2"]["error_rate"] > 0
        assert shadow_calls(engine) == []  # it failed before the engine
        assert client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()["shadow_version"] == 2

        # The cap is per shadowed adapter: another adapter's mirror still runs while this
        # one's slot is held (one shared cap let one tenant's long requests starve it).
        other = "sh-cap-other"
        with_shadow(client, engine, demo_root, other, 100)
        assert client.post("/admin/v1/faults", json=fault, headers=ADMIN).status_code == 200
        complete(client, name, user="user-hold")  # holds sh-cap's one slot for 1.5 s
        complete(client, other, user="user-other")
        other_labels = {"adapter": other, "version": "2"}
        assert sample("loraplex_shadow_requests_total", **other_labels, outcome="dropped") == 0
        assert wait_for(
            lambda: (
                sample("loraplex_shadow_requests_total", **other_labels, outcome="diverged") == 1
            )
        )


def test_only_stable_callers_in_the_share_are_mirrored(demo_root):
    engine = ScriptedEngine(WORDS)
    name = "sh-share"
    with client_for(demo_root, engine) as client:
        stable, _ = with_shadow(client, engine, demo_root, name, 20)
        users = [f"user-{i}" for i in range(40)]
        inside = [u for u in users if assign(sticky_key(u, None, ""), shadow_bucket_key(name), 20)]
        assert 0 < len(inside) < len(users)
        for user in users:
            complete(client, name, user=user)
        assert wait_for(lambda: len(shadow_calls(engine)) == len(inside))
        time.sleep(0.2)
        assert len(shadow_calls(engine)) == len(inside)  # nobody outside the share

        # A canary of v3 beside the shadow: its callers are not mirrored, the stable's are.
        register(client, demo_root, name, "v3")
        evaluated = client.post(f"/admin/v1/adapters/{name}/versions/3/evaluate", headers=ADMIN)
        assert evaluated.status_code == 200, evaluated.text
        body = {"version": 3, "percent": 50}
        started = client.post(f"/admin/v1/rollouts/{name}/start", json=body, headers=ADMIN)
        assert started.status_code == 200, started.text
        assert started.json()["shadow_version"] == 2  # both run
        served = {}
        mirrored_before = len(shadow_calls(engine))
        for user in inside:
            complete(client, name, user=user)
            served[user] = last_client_call(engine)
        on_stable = sum(1 for v in served.values() if v == stable)
        assert 0 < on_stable < len(inside), served
        assert wait_for(lambda: len(shadow_calls(engine)) == mirrored_before + on_stable)
        time.sleep(0.2)
        assert len(shadow_calls(engine)) == mirrored_before + on_stable

        # Stopping: no more mirrors, the candidate is evaluated again, its gauge series is gone
        # (kept at 0, one series per version ever mirrored stayed until restart).
        stopped = client.delete(f"/admin/v1/rollouts/{name}/shadow", headers=ADMIN)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["shadow_version"] is None
        again = client.delete(f"/admin/v1/rollouts/{name}/shadow", headers=ADMIN)
        assert again.status_code == 409 and "no shadow" in again.json()["error"]["message"]
        count = len(shadow_calls(engine))
        for user in inside:
            complete(client, name, user=user)
        time.sleep(0.2)
        assert len(shadow_calls(engine)) == count
        labels = {"adapter": name, "version": "2"}
        assert REGISTRY.get_sample_value("loraplex_shadow_percent", labels) is None
        versions = client.get(f"/admin/v1/adapters/{name}", headers=ADMIN).json()["versions"]
        assert next(v for v in versions if v["version"] == 2)["state"] == "evaluated"
        events = client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()["events"]
        assert [e["action"] for e in events][:1] == ["shadow_stop"]
