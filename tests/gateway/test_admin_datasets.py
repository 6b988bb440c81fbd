"""Dataset lineage through the admin API: which adapter versions a dataset went into (from their
Adaptation Cards, over tenants), and withdrawing it takes each of them out of service through
the retire and delete paths (audited, no longer served), refusing only what a running rollout
holds, until a second call finishes the job."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from registry import service
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, FILES, build_demo_root

WITHDRAWN = "ab" * 32  # a fixed digest for the tests that register nothing
KEPT = "cd" * 32


def new_digest() -> str:
    """A dataset of this test's own: the module's tests share one registry."""
    return secrets.token_hex(32)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("datasets"))


def register(client, root: Path, name: str, folder: str, *digests: str, **form: str) -> None:
    card = {
        "owner": "ml@example.com",
        "objective": "sft",
        "datasets": [
            {"name": f"set-{d[:4]}", "sha256": d, "license": "PARTNER_ONLY"} for d in digests
        ],
    }
    files = [("files", (f, (root / folder / f).read_bytes())) for f in FILES]
    body = {"name": name, "tenant": client.tenant, "card": json.dumps(card), **form}
    response = client.post("/admin/v1/adapters", data=body, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text


def complete(client, model: str) -> int:
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    return client.post("/v1/completions", json=body).status_code


def lineage(client, digest: str) -> list[dict[str, Any]]:
    response = client.get(f"/admin/v1/datasets/{digest}/adapters", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def revoke(client, digest: str, **body: str) -> dict[str, Any]:
    response = client.post(f"/admin/v1/datasets/{digest}/revoke", json=body, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def outcomes(revoked: dict[str, Any]) -> dict[str, str]:
    return {f"{v['adapter']}@{v['version']}": v["outcome"] for v in revoked["versions"]}


def test_a_withdrawn_dataset_takes_every_version_trained_on_it_out_of_service(demo_root):
    tag, withdrawn = uuid.uuid4().hex[:6], new_digest()
    gone, kept, mixed = f"gone-{tag}", f"kept-{tag}", f"mixed-{tag}"
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, gone, "v1", withdrawn)
        register(client, demo_root, kept, "v1", KEPT)
        register(client, demo_root, mixed, "v1", KEPT)
        register(client, demo_root, mixed, "v2", KEPT, withdrawn)  # only v2 is trained on it
        for name in (gone, kept, mixed):
            assert complete(client, name) == 200

        found = lineage(client, "sha256:" + withdrawn.upper())
        assert [(f["adapter"], f["version"], f["state"]) for f in found] == sorted(
            [(gone, 1, "compatible"), (mixed, 2, "compatible")]
        )
        assert {(f["tenant"], f["dataset_license"]) for f in found} == {
            (client.tenant, "PARTNER_ONLY")
        }

        revoked = revoke(client, withdrawn, reason="partner contract ended")
        assert revoked["complete"] is True and revoked["action"] == "retire"
        assert outcomes(revoked) == {f"{gone}@1": "retired", f"{mixed}@2": "retired"}
        assert complete(client, gone) == 404  # nothing of it left to serve
        assert complete(client, f"{mixed}@2") == 404
        assert complete(client, mixed) == 200  # v1 was not trained on it
        assert complete(client, kept) == 200

        async def audited() -> list[Any]:
            async with client.app.state.registry.sessions() as session:
                return await service.list_audit(session, target=f"adapter:{gone}")

        entry = next(e for e in client.portal.call(audited) if e.action.endswith("retire"))
        assert entry.details["reason"] == (
            f"dataset sha256:{withdrawn} revoked: partner contract ended"
        )

        again = revoke(client, withdrawn)  # nothing left to do
        assert outcomes(again) == {f"{gone}@1": "already_retired", f"{mixed}@2": "already_retired"}
        deleted = revoke(client, withdrawn, action="delete")
        assert outcomes(deleted) == {f"{gone}@1": "deleted", f"{mixed}@2": "deleted"}
        assert {f["state"] for f in lineage(client, withdrawn)} == {"deleted"}
        assert complete(client, mixed) == 200 and complete(client, kept) == 200


def test_versions_a_running_canary_holds_are_refused_until_it_is_rolled_back(demo_root):
    tag, withdrawn = uuid.uuid4().hex[:6], new_digest()
    rolled, plain = f"canary-{tag}", f"plain-{tag}"
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, rolled, "v1", withdrawn)
        register(client, demo_root, rolled, "v2", withdrawn)
        register(client, demo_root, plain, "v1", withdrawn)
        evaluated = client.post(f"/admin/v1/adapters/{rolled}/versions/2/evaluate", headers=ADMIN)
        assert evaluated.status_code == 200, evaluated.text
        body = {"version": 2, "percent": 10}
        started = client.post(f"/admin/v1/rollouts/{rolled}/start", json=body, headers=ADMIN)
        assert started.status_code == 200, started.text

        revoked = revoke(client, withdrawn)
        assert revoked["complete"] is False
        assert outcomes(revoked) == {
            f"{rolled}@1": "refused",  # the stable while its canary runs
            f"{rolled}@2": "refused",  # the running canary
            f"{plain}@1": "retired",  # the others are not held back
        }
        reasons = [v["reason"] for v in revoked["versions"] if v["outcome"] == "refused"]
        assert all(reasons) and any("canary" in r for r in reasons)
        assert complete(client, plain) == 404 and complete(client, rolled) == 200

        back = client.post(f"/admin/v1/rollouts/{rolled}/rollback", headers=ADMIN)
        assert back.status_code == 200, back.text
        finished = revoke(client, withdrawn)
        assert finished["complete"] is True
        assert outcomes(finished) == {
            f"{rolled}@1": "retired",
            f"{rolled}@2": "retired",
            f"{plain}@1": "already_retired",
        }
        assert complete(client, rolled) == 404


@pytest.mark.parametrize("digest", ["abc", "zz" * 32, "md5:" + WITHDRAWN])
def test_a_dataset_is_named_by_its_sha256(demo_root, digest):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        for response in (
            client.get(f"/admin/v1/datasets/{digest}/adapters", headers=ADMIN),
            client.post(f"/admin/v1/datasets/{digest}/revoke", headers=ADMIN),
        ):
            assert response.status_code == 422, response.text
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_only_the_admin_reads_or_withdraws_datasets(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:  # its tenant key is sent
        assert client.get(f"/admin/v1/datasets/{WITHDRAWN}/adapters").status_code == 401
        assert client.post(f"/admin/v1/datasets/{WITHDRAWN}/revoke").status_code == 401


def start_and_promote(client, name: str) -> None:
    """v2 of `name` through a canary to production (its stable)."""
    assert client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN).is_success
    body = {"version": 2, "percent": 50}
    assert client.post(f"/admin/v1/rollouts/{name}/start", json=body, headers=ADMIN).is_success
    promoted = client.post(
        f"/admin/v1/rollouts/{name}/promote", json={"to_percent": 100}, headers=ADMIN
    )
    assert promoted.status_code == 200, promoted.text


def test_deleting_takes_out_serving_versions_and_never_hands_the_name_to_a_tainted_one(
    demo_root,
):
    """Delete alone refuses a serving stable or a production version: the revocation retires
    them first. And it retires each adapter's serving version last, so the name never passes
    to another version trained on the dataset (review)."""
    tag, withdrawn = uuid.uuid4().hex[:6], new_digest()
    prod, pinned = f"prod-{tag}", f"pinned-{tag}"
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, prod, "v1", KEPT)
        register(client, demo_root, prod, "v2", withdrawn)
        start_and_promote(client, prod)
        register(client, demo_root, pinned, "v1", withdrawn)
        register(client, demo_root, pinned, "v2", withdrawn)  # v1 stays the pinned stable

        deleted = revoke(client, withdrawn, action="delete")
        assert deleted["complete"] is True, deleted
        assert outcomes(deleted) == {
            f"{prod}@2": "deleted",
            f"{pinned}@1": "deleted",
            f"{pinned}@2": "deleted",
        }
        assert complete(client, prod) == 200  # back on v1, not trained on it
        assert complete(client, f"{prod}@2") == 404 and complete(client, pinned) == 404

        async def retires() -> list[Any]:
            async with client.app.state.registry.sessions() as session:
                audit = await service.list_audit(session, target=f"adapter:{pinned}")
                return [e.details for e in audit if e.action == "adapter_version.retire"]

        # Oldest first: v2 (not serving) went before the stable, whose name then went nowhere.
        details = list(reversed(client.portal.call(retires)))
        assert [d["version"] for d in details] == [2, 1]
        assert details[1]["stable_version"] is None


def test_concurrent_revocations_both_end_complete(demo_root):
    tag, withdrawn = uuid.uuid4().hex[:6], new_digest()
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        for i in range(3):
            register(client, demo_root, f"twice-{i}-{tag}", "v1", withdrawn)
        admin = client.app.state.dataset_admin

        async def both() -> list[Any]:
            return list(
                await asyncio.gather(
                    admin.revoke(withdrawn, "retire", None, "ops-a"),
                    admin.revoke(withdrawn, "retire", None, "ops-b"),
                )
            )

        first, second = client.portal.call(both)
        assert first.complete and second.complete, (first, second)
        for version in first.versions + second.versions:
            assert (version.outcome, version.state) in {
                ("retired", "retired"),
                ("already_retired", "retired"),
            }


def test_a_registry_failure_stops_the_revocation_and_a_second_call_finishes(demo_root, monkeypatch):
    tag, withdrawn = uuid.uuid4().hex[:6], new_digest()
    names = [f"fail-{i}-{tag}" for i in range(3)]
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        for name in names:
            register(client, demo_root, name, "v1", withdrawn)
        adapters = client.app.state.adapter_admin
        retire = adapters.retire
        calls = 0

        async def failing_second(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise OperationalError("UPDATE", None, ConnectionResetError("reset"))
            return await retire(*args)

        monkeypatch.setattr(adapters, "retire", failing_second)
        partial = revoke(client, withdrawn)
        assert partial["complete"] is False
        assert [v["outcome"] for v in partial["versions"]] == ["retired", "failed", "skipped"]
        assert all(v["reason"] for v in partial["versions"][1:])
        assert [complete(client, name) for name in names] == [404, 200, 200]

        monkeypatch.setattr(adapters, "retire", retire)
        finished = revoke(client, withdrawn)
        assert finished["complete"] is True
        assert [v["outcome"] for v in finished["versions"]] == [
            "already_retired",
            "retired",
            "retired",
        ]
        assert [complete(client, name) for name in names] == [404, 404, 404]
