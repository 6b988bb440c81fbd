"""Two gateway replicas on one registry (and one S3 bucket): what one replica's admin write does
reaches the other's engine, disk and routing within a few polls, not only its name caches.

- A version retired or deleted through `a` leaves `b`'s engine (it stayed loaded and counted in
  b's adapter budget until LRU happened to evict it), and `b`'s download of a deleted artifact
  leaves b's disk (only the deleting replica cleaned its own).
- A rollout write whose stamp is not the newest (the writer's clock lags, or its transaction
  committed late) still reaches `b`'s router (b kept splitting a promoted canary 50/50).
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

import registry.service.rollout_log as rollout_log
from registry.models import utcnow
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, complete, register, wait_for
from tests.registry.s3_server import CREDENTIALS, REGION, moto_server, new_bucket, s3_client

POLL_S = 0.05


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("replica-sync"))


class LoadingEngine(ScriptedEngine):
    def __init__(self, word: str):
        super().__init__([word])
        self.loaded: set[int] = set()

    async def add_adapter(self, adapter):
        self.loaded.add(adapter.engine_id)

    async def remove_adapter(self, engine_id):
        self.loaded.discard(engine_id)


def test_retired_and_deleted_through_one_replica_leave_the_others_engine_and_disk(
    demo_root, tmp_path, monkeypatch
):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    with moto_server() as endpoint:
        bucket = new_bucket(s3_client(endpoint))
        shared = {
            "rollout_poll_interval_s": POLL_S,
            "catalog_cache_ttl_s": 30.0,
            "data_dir": tmp_path / "data",  # one registry database
            "artifact_store": f"s3://{bucket}/artifacts/",
            "s3_endpoint_url": endpoint,
            "s3_region": REGION,
        }
        engine_b = LoadingEngine("b")
        with (
            client_for(demo_root, LoadingEngine("a"), artifact_dir=tmp_path / "a", **shared) as a,
            client_for(demo_root, engine_b, artifact_dir=tmp_path / "b", **shared) as b,
        ):
            b.headers["Authorization"] = a.headers["Authorization"]
            register(a, demo_root, "gone", "v1")
            assert complete(b, "gone") == 200
            version_id = engine_b.calls[-1][1].engine_id
            cache_b = b.app.state.adapter_admin._cache
            assert version_id in engine_b.loaded and cache_b.resident() == [version_id]
            copies_b = list((tmp_path / "b" / "trees").iterdir())
            assert len(copies_b) == 1  # b downloaded the artifact to serve it

            retired = a.post("/admin/v1/adapters/gone/versions/1/retire", headers=ADMIN)
            assert retired.status_code == 200, retired.text
            assert wait_for(lambda: version_id not in engine_b.loaded, timeout_s=3.0)
            assert cache_b.resident() == [] and cache_b.resident_bytes == 0
            assert complete(b, "gone") == 404

            deleted = a.delete("/admin/v1/adapters/gone/versions/1", headers=ADMIN)
            assert deleted.status_code == 200, deleted.text
            assert wait_for(lambda: not copies_b[0].exists(), timeout_s=3.0)


def canary(client, root, name: str) -> None:
    register(client, root, name, "v1")
    register(client, root, name, "v2")
    assert client.post(f"/admin/v1/adapters/{name}/versions/2/evaluate", headers=ADMIN).is_success
    started = client.post(
        f"/admin/v1/rollouts/{name}/start", json={"version": 2, "percent": 50}, headers=ADMIN
    )
    assert started.status_code == 200, started.text


def test_a_promotion_by_a_replica_whose_clock_lags_reaches_the_others(
    demo_root, tmp_path, monkeypatch
):
    settings = {"rollout_poll_interval_s": POLL_S, "data_dir": tmp_path / "data"}
    with (
        client_for(demo_root, ScriptedEngine(["a"]), **settings) as a,
        client_for(demo_root, ScriptedEngine(["b"]), **settings) as b,
    ):
        b.headers["Authorization"] = a.headers["Authorization"]
        canary(a, demo_root, "xx")
        canary(a, demo_root, "yy")  # yy's stamp is now the newest
        router_b = b.app.state.rollout_router
        assert wait_for(lambda: (v := router_b.view("xx")) and v.canary_version == 2)

        monkeypatch.setattr(rollout_log, "utcnow", lambda: utcnow() - timedelta(seconds=60))
        promoted = a.post("/admin/v1/rollouts/xx/promote", headers=ADMIN)
        monkeypatch.undo()
        assert promoted.status_code == 200, promoted.text
        assert promoted.json()["stable_version"] == 2

        def promoted_on_b() -> bool:
            view = router_b.view("xx")
            return view is None or (view.canary_version is None and view.stable_version == 2)

        assert wait_for(promoted_on_b, timeout_s=3.0)
        time.sleep(2 * POLL_S)
        assert all(router_b.route("xx", f"user:u{i}") in (None, "xx@2") for i in range(40))
