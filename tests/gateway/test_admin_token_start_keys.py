"""Keys start-up issues: demo mode's key belongs to tenant `demo`, which owns only the demo
adapters, and a start without demo mode revokes it; the operator's import key is kept.

The shipped Kubernetes ConfigMap once set LORAPLEX_DEMO=true beside LORAPLEX_ADAPTER_DIR: the
demo key (a well-known value in secret.yaml) became tenant `default`'s, and kept reaching every
adapter later imported there after the switch to a real model."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from gateway.app import create_app
from gateway.demo import DEMO_ADAPTERS, init_demo
from gateway.registry_runtime import ensure_start_key, open_registry
from gateway.settings import Settings
from registry import service
from tests.gateway.fake_engine import ADMIN_TOKEN, BASE, ScriptedEngine

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEMO_KEY = "change-me-demo-key"
IMPORT_KEY = "an-import-key-chosen-by-ci-0123"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def demo_world(tmp_path_factory) -> Path:
    return init_demo(tmp_path_factory.mktemp("start-keys") / "demo").root


@pytest.fixture
def data_dir(demo_world, tmp_path) -> Path:
    """A data dir whose demo world is already built (demo mode builds it when missing)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(demo_world)
    return tmp_path / "data"


def models(client: TestClient, key: str) -> tuple[int, list[str]]:
    response = client.get("/v1/models", headers=bearer(key))
    return response.status_code, [m["id"] for m in response.json().get("data", [])]


def keys(client: TestClient) -> dict[str, dict]:
    return {key["key_id"]: key for key in client.get("/admin/v1/keys", headers=ADMIN).json()}


def test_demo_key_is_tenant_demos_and_goes_when_demo_mode_does(data_dir, tmp_path, caplog):
    demo = Settings(data_dir=data_dir, demo=True, demo_api_key=DEMO_KEY, admin_token=ADMIN_TOKEN)
    with TestClient(create_app(demo, engine=ScriptedEngine(["a"]))) as client:
        status, served = models(client, DEMO_KEY)
        assert status == 200
        assert set(served) == {BASE, *(spec.name for spec in DEMO_ADAPTERS)}
        (demo_key,) = keys(client).values()
        assert (demo_key["tenant"], demo_key["label"]) == ("demo", "demo")
        # An admin's own key labelled "demo" is no start-up key: it outlives demo mode.
        created = client.post(
            "/admin/v1/tenants/demo/keys", json={"label": "demo"}, headers=ADMIN
        ).json()

    # The switch to a real model: production adapters imported for tenant `default`.
    production = tmp_path / "adapters"
    shutil.copytree(data_dir / "demo" / "adapters" / DEMO_ADAPTERS[0].name, production / "prod")
    real = Settings(
        data_dir=data_dir,
        base_model=data_dir / "demo" / "base",
        served_model_name=BASE,
        adapter_dir=production,
        import_api_key=IMPORT_KEY,
        admin_token=ADMIN_TOKEN,
    )
    with (
        caplog.at_level(logging.WARNING, logger="gateway.registry_runtime"),
        TestClient(create_app(real, engine=ScriptedEngine(["a"]))) as client,
    ):
        assert models(client, DEMO_KEY)[0] == 401
        status, served = models(client, IMPORT_KEY)
        assert status == 200 and "prod" in served
        assert models(client, created["key"])[0] == 200
        listed = keys(client)
        assert listed[demo_key["key_id"]]["status"] == "revoked"
        assert listed[created["key_id"]]["status"] == "active"
        (import_key,) = [k for k in listed.values() if k["tenant"] == "default"]
        assert import_key["label"] == "import"
    assert f"revoked demo key {demo_key['key_id']} of tenant demo" in caplog.text

    # Demo mode again with the revoked key: start-up says so instead of serving without it.
    with (
        pytest.raises(ValueError, match="LORAPLEX_DEMO_API_KEY was revoked"),
        TestClient(create_app(demo, engine=ScriptedEngine(["a"]))),
    ):
        pass


async def test_an_import_key_labelled_demo_by_older_versions_is_kept(demo_world, tmp_path):
    """Before the `import` label, LORAPLEX_IMPORT_API_KEY's key was labelled `demo` too: the one
    the settings still name is the operator's, not the demo's."""
    settings = Settings(
        base_model=demo_world / "base", data_dir=tmp_path, import_api_key=IMPORT_KEY
    )
    runtime = await open_registry(settings, demo_world / "base", BASE)
    try:
        async with runtime.sessions() as session:
            await service.create_tenant(session, name="ci", actor="system")
            for plaintext in (IMPORT_KEY, None):
                await service.create_api_key(
                    session, tenant="ci", actor="system", label="demo", plaintext=plaintext
                )
    finally:
        await runtime.close()
    runtime = await open_registry(settings, demo_world / "base", BASE)
    try:
        async with runtime.sessions() as session:
            listed = await service.list_api_keys(session, tenant="ci")
            assert [key.revoked_at is None for key in listed] == [True, False]
            principal = await service.authenticate_api_key(session, presented=IMPORT_KEY)
            assert principal.tenant == "ci"
    finally:
        await runtime.close()


async def test_start_key_refusals_name_the_variable_that_caused_them(demo_world, tmp_path):
    settings = Settings(base_model=demo_world / "base", data_dir=tmp_path)
    runtime = await open_registry(settings, demo_world / "base", BASE)
    try:
        assert await ensure_start_key(runtime, "acme", SecretStr(IMPORT_KEY)) == IMPORT_KEY
        with pytest.raises(ValueError, match=r"^LORAPLEX_IMPORT_API_KEY belongs to another"):
            await ensure_start_key(runtime, "globex", SecretStr(IMPORT_KEY))
        runtime.demo = True
        with pytest.raises(ValueError, match=r"^LORAPLEX_DEMO_API_KEY belongs to another"):
            await ensure_start_key(runtime, "demo", SecretStr(IMPORT_KEY))
    finally:
        await runtime.close()
