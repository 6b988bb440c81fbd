"""The rank diagnostic and truncation through the admin API: a version's spectrum, and a new
version cut to a lower rank that serves by its own address, with its card saying how it was
made; the requests that make no sense are refused with the reason."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, FILES, build_demo_root

CARD = {
    "owner": "ml@example.com",
    "objective": "sft",
    "evals": [{"name": "held-out", "metric": "accuracy", "value": 0.9}],
    "training": {"lr": 0.0002},
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("truncate"))


def truncations(result: str) -> float:
    labels = {"operation": "truncate", "result": result}
    return REGISTRY.get_sample_value("loraplex_registry_operations_total", labels) or 0


def register(client, root: Path, name: str, card: dict[str, Any] | None = None) -> None:
    form = {"name": name, "tenant": client.tenant}
    if card is not None:
        form["card"] = json.dumps(card)
    files = [("files", (f, (root / "v1" / f).read_bytes())) for f in FILES]
    response = client.post("/admin/v1/adapters", data=form, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text


def test_spectrum_then_truncate_to_a_servable_lower_rank_version(demo_root):
    name = f"bot-{uuid.uuid4().hex[:6]}"
    engine = ScriptedEngine(["ok"])
    with client_for(demo_root, engine) as client:
        register(client, demo_root, name, CARD)
        spectrum = client.get(f"/admin/v1/adapters/{name}/versions/1/spectrum", headers=ADMIN)
        assert spectrum.status_code == 200, spectrum.text
        body = spectrum.json()
        assert (body["rank"], body["energy"]) == (8, 0.95)
        # the demo adapter: q_proj and v_proj of 2 layers, rank 8 each
        assert len(body["modules"]) == 4
        for module in body["modules"]:
            values = module["singular_values"]
            assert len(values) == 8 and values == sorted(values, reverse=True)
            assert 1 <= module["rank_needed"] <= 8
        assert body["rank_needed"] == max(m["rank_needed"] for m in body["modules"])
        everything = client.get(
            f"/admin/v1/adapters/{name}/versions/1/spectrum?energy=1", headers=ADMIN
        ).json()
        assert everything["rank_needed"] == 8  # random weights use every rank

        response = client.post(
            f"/admin/v1/adapters/{name}/versions/1/truncate",
            json={"rank": 4, "reason": "pool pages"},
            headers=ADMIN,
        )
        assert response.status_code == 201, response.text
        version = response.json()
        assert (version["name"], version["version"], version["rank"]) == (name, 2, 4)
        assert version["card"]["evals"] == []  # evaluated as itself
        training = version["card"]["training"]
        assert training["lr"] == 0.0002 and training["truncated_from"] == f"{name}@1"
        assert training["truncated_rank"] == 4 and training["truncation_reason"] == "pool pages"
        assert 0 < training["energy_kept"] < 1

        body = {"model": f"{name}@2", "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 200
        handle = engine.calls[-1][1]
        config = json.loads((Path(handle.path) / "adapter_config.json").read_text())
        assert config["r"] == 4

        def needed(energy: float) -> int:
            url = f"/admin/v1/adapters/{name}/versions/1/spectrum?energy={energy}"
            return client.get(url, headers=ADMIN).json()["rank_needed"]

        # an energy whose rank is neither 8 nor 4 (rank 4 again would be the same files)
        energy = next(e for e in (0.2, 0.4, 0.6, 0.8, 0.9) if needed(e) not in (4, 8))
        by_energy = client.post(
            f"/admin/v1/adapters/{name}/versions/1/truncate", json={"energy": energy}, headers=ADMIN
        )
        assert by_energy.status_code == 201, by_energy.text
        assert (by_energy.json()["version"], by_energy.json()["rank"]) == (3, needed(energy))
        derived = client.get(f"/admin/v1/adapters/{name}/versions/1/derived", headers=ADMIN)
        assert [(d["version"], d["how"]) for d in derived.json()["data"]] == [
            (2, "truncation"),
            (3, "truncation"),
        ]
        kept = by_energy.json()["card"]["training"]["energy_kept"]
        assert kept >= energy - 1e-6


def test_a_version_without_a_card_truncates_with_a_minimal_one_for_lineage(demo_root):
    name = f"bare-{uuid.uuid4().hex[:6]}"
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, name)
        response = client.post(
            f"/admin/v1/adapters/{name}/versions/1/truncate", json={"rank": 2}, headers=ADMIN
        )
        assert response.status_code == 201, response.text
        card = response.json()["card"]
        assert (card["owner"], card["objective"]) == (client.tenant, "other")
        assert card["training"]["truncated_from"] == f"{name}@1"
        derived = client.get(f"/admin/v1/adapters/{name}/versions/1/derived", headers=ADMIN)
        assert [(d["version"], d["how"]) for d in derived.json()["data"]] == [(2, "truncation")]


def test_pointless_or_malformed_truncations_are_refused(demo_root):
    name = f"bot-{uuid.uuid4().hex[:6]}"
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, name, CARD)
        path = f"/admin/v1/adapters/{name}/versions/1/truncate"
        same = client.post(path, json={"rank": 8}, headers=ADMIN)
        assert same.status_code == 422 and "saves nothing" in same.json()["error"]["message"]
        everything = client.post(path, json={"energy": 1.0}, headers=ADMIN)
        assert everything.status_code == 422  # needs all 8
        for body in ({}, {"rank": 2, "energy": 0.9}, {"energy": 0}, {"rank": 0}):
            response = client.post(path, json=body, headers=ADMIN)
            assert response.status_code == 400, (body, response.text)
        assert client.post(path, json={"rank": 2}).status_code == 401
        missing = f"/admin/v1/adapters/{name}/versions/9/truncate"
        assert client.post(missing, json={"rank": 2}, headers=ADMIN).status_code == 404
        spectrum = f"/admin/v1/adapters/{name}/versions/1/spectrum"
        assert client.get(f"{spectrum}?energy=0", headers=ADMIN).status_code == 400
        assert client.get(spectrum).status_code == 401

        retire = client.post(f"/admin/v1/adapters/{name}/versions/1/retire", headers=ADMIN)
        assert retire.status_code == 200, retire.text
        retired = client.post(path, json={"rank": 2}, headers=ADMIN)
        assert retired.status_code == 422 and "retired" in retired.json()["error"]["message"]
        assert (
            client.get(f"/admin/v1/adapters/{name}", headers=ADMIN).json()["versions"][-1][
                "version"
            ]
            == 1
        )  # nothing registered by the refusals


def test_a_truncation_does_not_take_the_name_and_a_rolled_back_version_is_refused(demo_root):
    name = f"bot-{uuid.uuid4().hex[:6]}"
    engine = ScriptedEngine(["ok"])
    with client_for(demo_root, engine) as client:
        register(client, demo_root, name, CARD)
        files = [("files", (f, (demo_root / "v2" / f).read_bytes())) for f in FILES]
        form = {"name": name, "tenant": client.tenant, "card": json.dumps(CARD)}
        assert client.post("/admin/v1/adapters", data=form, files=files, headers=ADMIN).is_success
        truncated = client.post(
            f"/admin/v1/adapters/{name}/versions/1/truncate", json={"rank": 3}, headers=ADMIN
        )
        assert truncated.status_code == 201 and truncated.json()["version"] == 3
        body = {"model": name, "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 200
        config = json.loads((Path(engine.calls[-1][1].path) / "adapter_config.json").read_text())
        assert config["r"] == 8  # the name still serves v1

        evaluated = client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN)
        assert evaluated.status_code == 200, evaluated.text
        started = client.post(
            f"/admin/v1/rollouts/{name}/start", json={"version": 2}, headers=ADMIN
        )
        assert started.status_code == 200, started.text
        rolled = client.post(f"/admin/v1/rollouts/{name}/rollback", headers=ADMIN)
        assert rolled.status_code == 200, rolled.text
        before = truncations("refused")
        refused = client.post(
            f"/admin/v1/adapters/{name}/versions/2/truncate", json={"rank": 3}, headers=ADMIN
        )
        assert refused.status_code == 422, refused.text
        assert "rolled back" in refused.json()["error"]["message"]
        assert truncations("refused") == before + 1 and truncations("ok") >= 1


def test_version_numbers_past_the_database_integer_are_400(demo_root):
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        huge = 10**20
        for method, path in (
            ("GET", f"/admin/v1/adapters/x/versions/{huge}/spectrum"),
            ("POST", f"/admin/v1/adapters/x/versions/{huge}/retire"),
            ("POST", f"/admin/v1/adapters/x/versions/{huge}/evaluate"),
            ("DELETE", f"/admin/v1/adapters/x/versions/{huge}"),
        ):
            response = client.request(method, path, headers=ADMIN)
            assert response.status_code == 400, (path, response.text)


def test_an_artifact_deleted_while_it_is_read_is_a_conflict_not_a_crash(demo_root, monkeypatch):
    """A delete between the lookup and the read (the store's files gone): 409, retry."""
    import gateway.services.adapter_admin as adapter_admin

    def vanished(path: Path, *args: Any, **kwargs: Any) -> None:
        raise FileNotFoundError(path / "adapter_model.safetensors")

    name = f"bot-{uuid.uuid4().hex[:6]}"
    with client_for(demo_root, ScriptedEngine(["a"])) as client:
        register(client, demo_root, name, CARD)
        monkeypatch.setattr(adapter_admin, "write_truncated", vanished)
        response = client.post(
            f"/admin/v1/adapters/{name}/versions/1/truncate", json={"rank": 2}, headers=ADMIN
        )
        assert response.status_code == 409, response.text
        assert "deleted meanwhile" in response.json()["error"]["message"]
