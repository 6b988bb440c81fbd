"""Only the owner's requests routed by the rollout judge an adapter's versions. A tenant the
adapter is shared with, or a caller pinning `name@N`, chooses its own prompt lengths and
max_tokens: its requests would otherwise roll back, fall back or promote another tenant's
canary and stable."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from gateway.catalog import ServedModel
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, FILES, build_demo_root, wait_for

WINDOW = 10
SLOW = 30  # tokens at 5 ms each: 150 ms, over the 100 ms bound


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("rollout-tenancy"))


def new_tenant(client) -> dict[str, str]:
    name = f"t{uuid.uuid4().hex[:8]}"
    assert client.post("/admin/v1/tenants", json={"name": name}, headers=ADMIN).is_success
    key = client.post(f"/admin/v1/tenants/{name}/keys", headers=ADMIN).json()["key"]
    return {"name": name, "Authorization": f"Bearer {key}"}


def register_as(
    client, root: Path, folder: str, tenant: str, name: str = "shared-bot", **form: str
) -> None:
    files = [("files", (f, (root / folder / f).read_bytes())) for f in FILES]
    body = {"name": name, "tenant": tenant, **form}
    response = client.post("/admin/v1/adapters", data=body, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text


def slow(client, tenant: dict[str, str], model: str, user: str = "") -> None:
    headers = {"Authorization": tenant["Authorization"]}
    body = {"model": model, "prompt": "x", "max_tokens": SLOW, "user": user}
    assert client.post("/v1/completions", json=body, headers=headers).status_code == 200


def canary_of(client) -> int | None:
    return client.get("/admin/v1/rollouts/shared-bot", headers=ADMIN).json()["canary_version"]


def test_only_the_owners_routed_requests_can_roll_back_its_canary(demo_root):
    with client_for(demo_root, ScriptedEngine(["w"] * 40, delay=0.005)) as client:
        owner, consumer = new_tenant(client), new_tenant(client)
        register_as(client, demo_root, "v1", owner["name"], visibility="shared")
        register_as(client, demo_root, "v2", owner["name"])
        evaluated = client.post("/admin/v1/adapters/shared-bot/versions/2/evaluate", headers=ADMIN)
        assert evaluated.is_success, evaluated.text
        limits = {"window": WINDOW, "max_p95_e2e_ms": 100}
        client.put("/admin/v1/rollouts/shared-bot/thresholds", json=limits, headers=ADMIN)
        started = client.post(
            "/admin/v1/rollouts/shared-bot/start", json={"version": 2, "percent": 50}, headers=ADMIN
        )
        assert started.status_code == 200, started.text

        # The consumer's slow requests, routed and pinned, and the owner's pinned ones: a
        # window's worth each, and the canary stays.
        for i in range(WINDOW + 2):
            slow(client, consumer, "shared-bot", user=f"c{i}")
            slow(client, consumer, "shared-bot@2")
            slow(client, owner, "shared-bot@2")
        assert not wait_for(lambda: canary_of(client) is None, timeout_s=0.5)
        assert canary_of(client) == 2

        # The owner's own routed traffic is the evidence: its slow canary requests roll it back.
        for i in range(4 * WINDOW):
            slow(client, owner, "shared-bot", user=f"o{i}")
            if canary_of(client) is None:
                break
        assert wait_for(lambda: canary_of(client) is None)


def test_a_canary_failing_every_consumer_request_is_rolled_back(demo_root):
    """Consumers' latency is not evidence, their server errors are: a canary answering 500 to
    every consumer of a shared adapter whose owner sent nothing kept serving (review)."""
    with client_for(demo_root, ScriptedEngine(["w"]), enable_faults=True) as client:
        owner, consumer = new_tenant(client), new_tenant(client)
        register_as(client, demo_root, "v1", owner["name"], "failing", visibility="shared")
        register_as(client, demo_root, "v2", owner["name"], "failing")
        assert client.post("/admin/v1/adapters/failing/versions/2/evaluate", headers=ADMIN)
        client.put("/admin/v1/rollouts/failing/thresholds", json={"window": WINDOW}, headers=ADMIN)
        started = client.post(
            "/admin/v1/rollouts/failing/start", json={"version": 2, "percent": 50}, headers=ADMIN
        )
        assert started.status_code == 200, started.text
        fault = {"adapter": "failing", "version": 2, "error_rate": 1.0}
        assert client.post("/admin/v1/faults", json=fault, headers=ADMIN).status_code == 200
        headers = {"Authorization": consumer["Authorization"]}
        body = {"model": "failing", "prompt": "x", "max_tokens": 1}

        def canary() -> int | None:
            status = client.get("/admin/v1/rollouts/failing", headers=ADMIN).json()
            return status["canary_version"]

        for i in range(6 * WINDOW):
            client.post("/v1/completions", json={**body, "user": f"c{i}"}, headers=headers)
            if canary() is None:
                break
        assert wait_for(lambda: canary() is None)


def test_a_fallback_target_out_of_a_callers_scope_serves_it_the_base_not_the_stable(demo_root):
    engine = ScriptedEngine(["w"])
    with client_for(demo_root, engine) as client:
        owner, consumer = new_tenant(client), new_tenant(client)
        register_as(client, demo_root, "v1", owner["name"], "fallen", visibility="shared")
        register_as(client, demo_root, "v2", owner["name"], "owners-own")  # private
        path = {"target": "owners-own"}
        set_path = client.put("/admin/v1/rollouts/fallen/rollback-path", json=path, headers=ADMIN)
        assert set_path.status_code == 200, set_path.text
        fell = client.post("/admin/v1/rollouts/fallen/rollback", json={}, headers=ADMIN)
        assert fell.json()["active_target"] == "owners-own@1", fell.text

        def served_for(tenant: dict[str, str]):
            body = {"model": "fallen", "prompt": "x", "max_tokens": 1}
            headers = {"Authorization": tenant["Authorization"]}
            assert client.post("/v1/completions", json=body, headers=headers).status_code == 200
            return engine.calls[-1][1]

        assert owners_own_sha(client) in served_for(owner).path
        # The stable was taken out of service: a tenant that may not use the target gets the
        # base (it was served the breaching stable).
        assert served_for(consumer) is None


def owners_own_sha(client) -> str:
    versions = client.get("/admin/v1/adapters/owners-own", headers=ADMIN).json()["versions"]
    return versions[0]["artifact_sha256"]


@pytest.mark.parametrize(
    ("owner", "pinned", "caller", "judged"),
    [
        ("acme", False, "acme", True),  # the owner, routed by the rollout
        ("acme", True, "acme", False),  # the owner pinning name@N
        ("acme", False, "globex", False),  # a tenant the adapter is shared with
        ("", False, "globex", True),  # the base model: anyone's requests
    ],
)
def test_whose_requests_judge_a_version(owner, pinned, caller, judged):
    served = ServedModel("bot", None, 0, adapter_name="bot", version=2, owner=owner, pinned=pinned)
    assert served.judged_by(caller) is judged
