"""Stacks through the admin API: a version serving several adapters together is registered
only when every component's card allows the others, only from the tenant's own and globally
shared adapters, and carries the components' lineage and licences; every refusal is listed,
audited and stores nothing."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.demo import DemoAdapterSpec, build_adapter
from registry import service
from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, FILES, build_demo_root

TASK_POLICY = {"mode": "allow_listed", "with_objectives": ["safety_guardrail"]}
GUARD_POLICY = {"mode": "allow_listed", "with_objectives": ["sft"]}
GUARD = {"objective": "safety_guardrail", "stacking": GUARD_POLICY}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = build_demo_root(tmp_path_factory.mktemp("stacks"))
    build_adapter(root / "base", root / "r32", DemoAdapterSpec("r32", 32, 16, ["q_proj"], seed=3))
    return root


def register(
    client,
    root: Path,
    name: str,
    folder: str,
    *,
    tenant: str | None = None,
    objective: str = "sft",
    stacking: dict[str, Any] | None = None,
    carded: bool = True,
    visibility: str | None = None,
    **card: Any,
) -> None:
    form: dict[str, str] = {"name": name, "tenant": tenant or client.tenant}
    if visibility is not None:
        form["visibility"] = visibility
    if carded:
        body = {"owner": "ml@example.com", "objective": objective, **card}
        if stacking is not None:
            body["stacking"] = stacking
        form["card"] = json.dumps(body)
    files = [("files", (f, (root / folder / f).read_bytes())) for f in FILES]
    response = client.post("/admin/v1/adapters", data=form, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text


def stack(client, name: str, *components: str | tuple[str, float], **body: Any):
    parts = [
        {"adapter": c} if isinstance(c, str) else {"adapter": c[0], "weight": c[1]}
        for c in components
    ]
    payload = {"name": name, "tenant": client.tenant, "components": parts, **body}
    return client.post("/admin/v1/adapters/stack", json=payload, headers=ADMIN)


def problems(response) -> list[tuple[str, str]]:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    return [(p["code"], p["message"]) for p in error["problems"]]


def names(tag: str, *kinds: str) -> list[str]:
    return [f"{kind}-{tag}" for kind in kinds]


def test_a_stack_of_allowed_adapters_registers_and_serves_as_one_adapter(demo_root):
    tag = uuid.uuid4().hex[:6]
    task, guard, stacked = names(tag, "task", "guard", "guarded")
    digest = secrets.token_hex(32)
    engine = ScriptedEngine(["ok"])
    with client_for(demo_root, engine) as client:
        register(
            client,
            demo_root,
            task,
            "v1",
            stacking=TASK_POLICY,
            datasets=[{"name": "tickets", "sha256": digest}],
        )
        register(
            client, demo_root, guard, "v2", objective="safety_guardrail", stacking=GUARD_POLICY
        )
        response = stack(client, stacked, task, (f"{guard}@1", 0.5), description="task + guard")
        assert response.status_code == 201, response.text
        version = response.json()
        assert (version["name"], version["version"], version["rank"]) == (stacked, 1, 16)
        assert (version["alpha"], version["use_rslora"]) == (16.0, False)
        assert version["dtype"] == "F32"
        card = version["card"]
        assert card["training"] == {
            "stack_method": "concat",
            "stack_of": f"{task}@1 {guard}@1",
            "stack_weights": "1.0 0.5",
        }
        assert card["description"] == "task + guard"
        assert card["stacking"]["mode"] == "exclusive"

        # served by its own name, as one adapter: the engine gets the stacked folder
        body = {"model": stacked, "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 200
        handle = engine.calls[-1][1]
        assert handle is not None
        config = json.loads((Path(handle.path) / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (16, 16)

        # the dataset of a component finds the stack too
        found = client.get(f"/admin/v1/datasets/{digest}/adapters", headers=ADMIN).json()["data"]
        assert {(f["adapter"], f["version"]) for f in found} == {(task, 1), (stacked, 1)}

        # a second stack into the same adapter is its next version, like any registration
        again = stack(client, stacked, task, guard)
        assert again.status_code == 201, again.text
        assert again.json()["version"] == 2

        # what keeps serving the task's weights if it is retired
        derived = client.get(f"/admin/v1/adapters/{task}/versions/1/derived", headers=ADMIN)
        assert derived.status_code == 200, derived.text
        assert [(d["adapter"], d["version"], d["how"]) for d in derived.json()["data"]] == [
            (stacked, 1, "stack"),
            (stacked, 2, "stack"),
        ]
        missing = client.get(f"/admin/v1/adapters/{task}/versions/7/derived", headers=ADMIN)
        assert missing.status_code == 404


def test_every_refusal_is_listed_audited_and_stores_nothing(demo_root):
    tag = uuid.uuid4().hex[:6]
    task, loner, bare, big, stacked = names(tag, "task", "loner", "bare", "big", "stacked")
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, task, "v1", stacking=TASK_POLICY)
        register(client, demo_root, loner, "v2", objective="dpo")  # exclusive by default
        register(client, demo_root, bare, "v2", carded=False)
        register(client, demo_root, big, "r32", objective="safety_guardrail", stacking=GUARD_POLICY)

        listed = problems(stack(client, stacked, task, loner, bare, f"missing-{tag}"))
        codes = [code for code, _ in listed]
        assert codes.count("stack_component_invalid") == 1  # the missing one
        assert f"'missing-{tag}'" in listed[0][1]
        text = " ".join(message for _, message in listed)
        assert f"{bare}@1 has no Adaptation Card" in text
        assert f"{task}@1's stacking policy (allows objectives safety_guardrail) does not " in text
        assert f"{loner}@1's stacking policy (exclusive) does not allow {task}@1" in text

        over = problems(stack(client, stacked, task, big))  # 8 + 32 > 32
        assert [code for code, _ in over] == ["rank_exceeds_limit"]

        twice = problems(stack(client, stacked, task, f"{task}@1"))
        assert "listed more than once" in twice[0][1]

        assert client.get(f"/admin/v1/adapters/{stacked}", headers=ADMIN).status_code == 404

        async def audited() -> list[Any]:
            async with client.app.state.registry.sessions() as session:
                return await service.list_audit(session, target=f"adapter:{stacked}")

        rejected = [e for e in client.portal.call(audited) if e.action.endswith("reject")]
        assert len(rejected) == 3 and all(e.details["stack"] for e in rejected)
        refused = REGISTRY.get_sample_value(
            "loraplex_registry_operations_total", {"operation": "stack", "result": "refused"}
        )
        assert refused is not None and refused >= 3


def test_only_the_tenants_own_and_globally_shared_adapters_can_be_stacked(demo_root):
    tag = uuid.uuid4().hex[:6]
    task, public, lent, private, stacked = names(tag, "task", "public", "lent", "private", "st")
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        other = f"o{tag}"
        created = client.post("/admin/v1/tenants", json={"name": other}, headers=ADMIN)
        assert created.status_code in (200, 201), created.text
        register(client, demo_root, task, "v1", stacking=TASK_POLICY)
        guard = {"objective": "safety_guardrail", "stacking": GUARD_POLICY}
        register(client, demo_root, public, "v2", tenant=other, visibility="shared", **guard)
        register(client, demo_root, lent, "v2", tenant=other, **guard)
        register(client, demo_root, private, "v2", tenant=other, **guard)
        # the other tenant's adapters: one shared with everyone, one lent to this tenant alone
        lend = client.post(
            f"/admin/v1/adapters/{lent}/shares", json={"tenant": client.tenant}, headers=ADMIN
        )
        assert lend.status_code == 200, lend.text

        weighted = problems(stack(client, stacked, task, (public, -1.0)))
        assert "stacked as trained, weight 1, not -1.0" in weighted[0][1]
        assert stack(client, stacked, task, public).status_code == 201
        borrowed = problems(stack(client, f"{stacked}-2", task, lent))
        assert borrowed[0][0] == "stack_component_invalid"
        assert f"shared it with {client.tenant!r} alone" in borrowed[0][1]
        unseen = problems(stack(client, f"{stacked}-3", task, private))
        assert unseen[0][0] == "stack_component_invalid"
        assert "that tenant" in unseen[0][1]


def test_partner_only_data_keeps_a_stack_private(demo_root):
    tag = uuid.uuid4().hex[:6]
    task, guard, stacked = names(tag, "task", "guard", "stacked")
    partner = {"name": "partner", "sha256": secrets.token_hex(32), "license": "PARTNER_ONLY"}
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, task, "v1", stacking=TASK_POLICY, datasets=[partner])
        register(
            client, demo_root, guard, "v2", objective="safety_guardrail", stacking=GUARD_POLICY
        )
        refused = problems(stack(client, stacked, task, guard, visibility="shared"))
        assert [code for code, _ in refused] == ["license_partner_only"]
        assert stack(client, stacked, task, guard).status_code == 201
        other = f"o{tag}"
        created = client.post("/admin/v1/tenants", json={"name": other}, headers=ADMIN)
        assert created.status_code in (200, 201), created.text
        share = client.post(
            f"/admin/v1/adapters/{stacked}/shares", json={"tenant": other}, headers=ADMIN
        )
        assert share.status_code == 422, share.text
        assert share.json()["error"]["code"] == "license_partner_only"


@pytest.mark.parametrize(
    "components",
    [
        [{"adapter": "a"}],  # one is not a stack
        [{"adapter": "a"}, {"adapter": "b", "weight": 0}],
        [{"adapter": "a"}, {"adapter": "b", "weight": 17}],
        [{"adapter": f"a{i}"} for i in range(9)],
    ],
)
def test_malformed_stacks_are_400_before_anything_is_read(demo_root, components):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        body = {"name": "s", "tenant": client.tenant, "components": components}
        response = client.post("/admin/v1/adapters/stack", json=body, headers=ADMIN)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"].startswith("components")


def test_stacking_needs_the_admin_token(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        body = {"name": "s", "tenant": client.tenant, "components": [{"adapter": "a"}] * 2}
        assert client.post("/admin/v1/adapters/stack", json=body).status_code == 401
        wrong = {"Authorization": f"Bearer {ADMIN_TOKEN}x"}
        assert client.post("/admin/v1/adapters/stack", json=body, headers=wrong).status_code == 401


def test_a_stack_heavier_than_an_upload_may_be_is_413_and_stores_nothing(demo_root):
    tag = uuid.uuid4().hex[:6]
    task, guard, stacked = names(tag, "task", "guard", "stacked")
    # each demo upload (r8 q/v over 2 layers, fp32) weighs ~66 KB; their r16 stack ~131 KB
    with client_for(demo_root, ScriptedEngine(["a"]), upload_max_bytes=100_000) as client:
        register(client, demo_root, task, "v1", stacking=TASK_POLICY)
        register(client, demo_root, guard, "v2", **GUARD)
        response = stack(client, stacked, task, guard)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "upload_too_large"
        assert client.get(f"/admin/v1/adapters/{stacked}", headers=ADMIN).status_code == 404
