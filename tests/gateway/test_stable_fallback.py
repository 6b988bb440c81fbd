"""Automatic stable fallback, driven by the rollback monitor through the app: an armed stable
(rollback path set by an admin) that breaches moves its traffic to the target; a target that is
itself breaching is refused (audited once, the stable keeps serving, no retry storm); an
unarmed stable never moves on its own. Failures come from fault injection (error rate 1.0);
the scripted engine records which adapter version each request reached. The same behaviour
through the real engine, with latency instead of errors, is in tests/e2e/test_rollout.py."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY

from gateway.engine.client import ChoiceDelta, GenerationUpdate
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, complete, register, wait_for

WINDOW = 10  # the smallest window an override may set


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("fallback"))


def arm(client, name: str, target: str | None) -> None:
    if target is not None:
        path = client.put(
            f"/admin/v1/rollouts/{name}/rollback-path", json={"target": target}, headers=ADMIN
        )
        assert path.status_code == 200, path.text
        assert path.json()["auto_fallback"] is True
    limits = client.put(
        f"/admin/v1/rollouts/{name}/thresholds", json={"window": WINDOW}, headers=ADMIN
    )
    assert limits.status_code == 200, limits.text


def break_version(client, name: str, version: int = 1) -> None:
    fault = {"adapter": name, "version": version, "error_rate": 1.0}
    assert client.post("/admin/v1/faults", json=fault, headers=ADMIN).status_code == 200


def status(client, name: str) -> dict:
    return client.get(f"/admin/v1/rollouts/{name}", headers=ADMIN).json()


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_breaching_armed_stable_falls_back_to_its_target_and_restore_returns(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine, enable_faults=True) as client:
        register(client, demo_root, "fb-main", "v1")
        register(client, demo_root, "fb-alt", "v2")
        complete(client, "fb-alt")
        alt_engine_id = engine.calls[-1][1].engine_id
        arm(client, "fb-main", "fb-alt")
        break_version(client, "fb-main")

        codes = [complete(client, "fb-main") for _ in range(WINDOW)]
        assert codes == [500] * WINDOW  # the injected failures the monitor judges
        assert wait_for(lambda: status(client, "fb-main")["active_target"] == "fb-alt@1")

        assert complete(client, "fb-main") == 200  # now served by the target
        assert engine.calls[-1][1].engine_id == alt_engine_id
        event = next(e for e in status(client, "fb-main")["events"])
        assert event["action"] == "stable_fallback" and event["actor"] == "rollout-monitor"
        assert event["figures"]["error_rate"] == 1.0 and event["figures"]["samples"] == WINDOW
        assert (
            counter("loraplex_rollbacks_total", adapter="fb-main", version="1", reason="error_rate")
            == 1
        )

        client.delete("/admin/v1/faults", headers=ADMIN)
        restored = client.post("/admin/v1/rollouts/fb-main/restore", headers=ADMIN)
        assert restored.status_code == 200 and restored.json()["active_target"] is None
        assert complete(client, "fb-main") == 200
        assert engine.calls[-1][1].engine_id != alt_engine_id  # its own stable again


def test_fallback_into_a_breaching_target_is_refused_once_and_the_stable_keeps_serving(
    demo_root,
):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine, enable_faults=True) as client:
        register(client, demo_root, "rf-main", "v1")
        register(client, demo_root, "rf-alt", "v2")
        assert complete(client, "rf-main") == 200
        main_engine_id = engine.calls[-1][1].engine_id
        arm(client, "rf-main", "rf-alt")
        break_version(client, "rf-alt")
        assert [complete(client, "rf-alt") for _ in range(WINDOW)] == [500] * WINDOW

        break_version(client, "rf-main")
        refusals = {"adapter": "rf-main", "version": "1", "action": "fallback_refused"}
        for _ in range(3):  # three full windows of breach: one attempt, then backing off
            assert [complete(client, "rf-main") for _ in range(WINDOW)] == [500] * WINDOW
            assert wait_for(lambda: counter("loraplex_rollout_transitions_total", **refusals) > 0)
        time.sleep(0.3)
        assert counter("loraplex_rollout_transitions_total", **refusals) == 1
        assert status(client, "rf-main")["active_target"] is None  # the stable keeps serving

        client.delete("/admin/v1/faults", headers=ADMIN)
        assert complete(client, "rf-main") == 200
        assert engine.calls[-1][1].engine_id == main_engine_id


def test_unarmed_stable_never_falls_back_on_its_own(demo_root):
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine, enable_faults=True) as client:
        register(client, demo_root, "plain", "v1")
        arm(client, "plain", None)  # thresholds only: no rollback path, no card
        assert status(client, "plain")["auto_fallback"] is False
        break_version(client, "plain")
        assert [complete(client, "plain") for _ in range(2 * WINDOW)] == [500] * (2 * WINDOW)
        time.sleep(0.3)
        assert status(client, "plain")["active_target"] is None
        assert (
            counter("loraplex_rollbacks_total", adapter="plain", version="1", reason="error_rate")
            == 0
        )


def test_a_fallback_to_the_base_never_serves_a_caller_whose_policy_forbids_the_base(demo_root):
    """Tenant B may not call the base model and uses A's shared adapter. Rolled back to `base`,
    the adapter answers B 503 model_unavailable: neither the base nor the rolled-back stable.
    A, whose policy allows the base, gets the base; restoring serves B again."""
    engine = ScriptedEngine(["a"])
    with client_for(demo_root, engine) as client:
        register(client, demo_root, "fb-guarded", "v1")
        tenant = "no-base-tenant"
        body = {"name": tenant, "limits": {"allow_base_model": False}}
        assert client.post("/admin/v1/tenants", json=body, headers=ADMIN).status_code == 201
        key = client.post(f"/admin/v1/tenants/{tenant}/keys", headers=ADMIN).json()["key"]
        guarded = {"Authorization": f"Bearer {key}"}
        share = {"tenant": tenant}
        shared = client.post("/admin/v1/adapters/fb-guarded/shares", json=share, headers=ADMIN)
        assert shared.status_code == 200, shared.text

        def ask(route: str, headers: dict | None = None):
            body: dict = {"model": "fb-guarded", "max_tokens": 1}
            if route == "chat":
                body["messages"] = [{"role": "user", "content": "x"}]
                return client.post("/v1/chat/completions", json=body, headers=headers or {})
            body["prompt"] = "x"
            return client.post("/v1/completions", json=body, headers=headers or {})

        card_before = client.get("/v1/models/fb-guarded", headers=guarded).json()
        assert ask("chat", guarded).status_code == 200
        rolled = client.post("/admin/v1/rollouts/fb-guarded/rollback", json={}, headers=ADMIN)
        assert rolled.status_code == 200 and rolled.json()["active_target"] == "base"

        calls = len(engine.calls)
        for route in ("chat", "completions"):
            refused = ask(route, guarded)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "model_unavailable"
        assert len(engine.calls) == calls  # nothing reached the engine for B
        assert client.get("/v1/models/fb-guarded", headers=guarded).json() == card_before
        assert ask("chat").status_code == 200  # the owner may use the base: served by it
        assert engine.calls[-1][1] is None

        restored = client.post("/admin/v1/rollouts/fb-guarded/restore", headers=ADMIN)
        assert restored.status_code == 200
        assert ask("chat", guarded).status_code == 200
        assert engine.calls[-1][1] is not None


def test_a_refused_manual_fallback_is_a_409_listing_why(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, "rf-self", "v1")
        arm(client, "rf-self", "rf-self@1")  # caught when used: the failing version itself
        manual = client.post("/admin/v1/rollouts/rf-self/rollback", json={}, headers=ADMIN)
        assert manual.status_code == 409, manual.text
        error = manual.json()["error"]
        assert error["code"] == "rollback_refused"
        assert "itself" in error["problems"][0]["message"]
        assert status(client, "rf-self")["active_target"] is None


class FailingLoads(ScriptedEngine):
    """Loads fail once `fail` is set (a corrupt or incompatible artifact). Loading on arrival,
    the engine refuses the requests for an adapter it could not load, as
    kernels.engine_core_loads does: they end with finish_reason "error"."""

    fail = False

    def __init__(self, words, *, on_arrival: bool):
        super().__init__(words)
        self.loads_adapters_on_arrival = on_arrival
        self.loaded: set[int] = set()

    async def add_adapter(self, adapter):
        if self.fail:
            raise RuntimeError("corrupt weights")
        self.loaded.add(adapter.engine_id)
        return await super().add_adapter(adapter)

    async def generate(self, request_id, prompt_token_ids, options, adapter):
        if self.fail and adapter is not None and adapter.engine_id not in self.loaded:
            choice = ChoiceDelta(index=0, text="", token_ids=[], finish_reason="error")
            yield GenerationUpdate(prompt_tokens=len(prompt_token_ids), choices=[choice])
            return
        async for update in super().generate(request_id, prompt_token_ids, options, adapter):
            yield update


@pytest.mark.parametrize("on_arrival", [False, True], ids=["awaited", "on-arrival"])
def test_a_canary_that_cannot_load_is_rolled_back_by_its_errors(demo_root, on_arrival):
    """Every canary caller got 500 and the canary stayed: the failed load ended the request
    before its metrics existed, so its window never saw it (review). Loading on arrival, the
    refused request's answer is the load's error, not a generation failure."""
    engine = FailingLoads(["a"], on_arrival=on_arrival)
    name = "lf-arrival" if on_arrival else "lf"  # the demo root is shared by the module
    with client_for(demo_root, engine) as client:
        register(client, demo_root, name, "v1")
        register(client, demo_root, name, "v2")
        assert complete(client, f"{name}@1") == 200  # v1 loaded
        engine.fail = True
        evaluated = client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN)
        assert evaluated.status_code == 200, evaluated.text
        arm(client, name, None)  # window 10
        started = client.post(
            f"/admin/v1/rollouts/{name}/start", json={"version": 2, "percent": 50}, headers=ADMIN
        )
        assert started.status_code == 200, started.text
        body = {"model": name, "prompt": "x", "max_tokens": 1}
        answers = [
            client.post("/v1/completions", json={**body, "user": f"u{i}"}) for i in range(60)
        ]
        failed = [a.json()["error"]["code"] for a in answers if a.status_code == 500]
        assert failed and set(failed) == {"adapter_load_failed"}
        assert wait_for(lambda: status(client, name)["canary_version"] is None)
        assert status(client, name)["stage"] == "rolled_back"
        after = [
            client.post("/v1/completions", json={**body, "user": f"u{i}"}).status_code
            for i in range(20)
        ]
        assert after == [200] * 20  # everyone on the stable again
