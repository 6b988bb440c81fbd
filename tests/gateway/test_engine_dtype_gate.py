"""The gate judges adapters' values against the dtype the engine holds LoRA weights in: vLLM
casts an fp32 adapter to an fp16 engine's dtype, and a value past ±65504 becomes inf there."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import FILES, build_demo_root, complete
from tests.registry.helpers import edit_tensors

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TARGET = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = build_demo_root(tmp_path_factory.mktemp("dtype-gate"))
    big = root / "big"
    big.mkdir()
    for name in FILES:
        (big / name).write_bytes((root / "v1" / name).read_bytes())

    def plant(tensors):
        tensors[TARGET][0, 0] = 50000.0  # fits fp16 itself; the scale of 2 takes it past
        return tensors

    edit_tensors(big, plant)
    return root


def _engine(lora_dtype: str | None) -> ScriptedEngine:
    engine = ScriptedEngine(["a"])
    engine.lora_dtype = lora_dtype
    return engine


def _upload(client, root: Path, name: str, folder: str, tenant: str):
    files = [("files", (f, (root / folder / f).read_bytes())) for f in FILES]
    form = {"name": name, "tenant": tenant}
    return client.post("/admin/v1/adapters", data=form, files=files, headers=ADMIN)


def test_an_fp16_engine_refuses_at_registration_what_its_cast_would_turn_into_inf(demo_root):
    with client_for(demo_root, _engine("float16"), data_dir=demo_root / "fp16") as client:
        refused = _upload(client, demo_root, "big", "big", client.tenant)
        assert refused.status_code == 422, refused.text
        problems = refused.json()["error"]["problems"]
        assert [p["code"] for p in problems] == ["value_out_of_engine_range"]
        assert TARGET in problems[0]["message"] and "100000" in problems[0]["message"]
        assert complete(client, "big") == 404  # nothing was stored
        assert _upload(client, demo_root, "small", "v1", client.tenant).status_code == 201
        assert complete(client, "small") == 200


def test_a_bf16_engine_serves_the_same_adapter(demo_root):
    with client_for(demo_root, _engine("bfloat16"), data_dir=demo_root / "bf16") as client:
        assert _upload(client, demo_root, "big", "big", client.tenant).status_code == 201
        assert complete(client, "big") == 200


def test_an_adapter_registered_for_a_wider_engine_never_reaches_an_fp16_one(demo_root):
    """Registered while the gateway served bf16, then redeployed with an fp16 engine on the
    same registry: the gate before the first load refuses it, and the engine never sees it."""
    data = demo_root / "redeployed"
    with client_for(demo_root, _engine("bfloat16"), data_dir=data) as client:
        tenant = client.tenant
        assert _upload(client, demo_root, "big", "big", tenant).status_code == 201
        assert _upload(client, demo_root, "small", "v1", tenant).status_code == 201
    fp16 = _engine("float16")
    with client_for(demo_root, fp16, data_dir=data) as client:
        key = client.post(f"/admin/v1/tenants/{tenant}/keys", headers=ADMIN).json()["key"]
        client.headers["Authorization"] = f"Bearer {key}"
        assert complete(client, "big") == 404
        assert fp16.calls == []  # refused before the engine was asked anything
        assert complete(client, "small") == 200
        assert len(fp16.calls) == 1


async def test_an_explicit_dtype_in_the_settings_gates_the_start_up_import(demo_root, tmp_path):
    """The start-up import runs before the engine: with dtype float16 set, it already knows."""
    import shutil

    from gateway.registry_runtime import import_adapter_dir, open_registry
    from gateway.settings import Settings

    folder = tmp_path / "import"
    for name in ("big", "v1"):
        shutil.copytree(demo_root / name, folder / name)
    imported = {}
    for dtype in ("float16", "auto"):
        settings = Settings(base_model=demo_root / "base", data_dir=tmp_path / dtype, dtype=dtype)
        runtime = await open_registry(settings, demo_root / "base", "dtype-base")
        try:
            assert runtime.limits().dtype == ("F16" if dtype == "float16" else None)
            imported[dtype] = await import_adapter_dir(runtime, folder, "importer")
        finally:
            await runtime.close()
    assert imported == {"float16": ["v1"], "auto": ["big", "v1"]}
