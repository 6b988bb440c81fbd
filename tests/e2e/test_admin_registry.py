"""Admin API and CLI against the live gateway: gate refusals, versions, retire, auth, base pin."""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import replace

import httpx
import openai
import pytest

from gateway.demo import DEMO_ADAPTERS, DemoAdapterSpec, build_adapter
from tests.conftest import ADMIN_TOKEN, BASE_NAME, DEMO_TENANT, bearer, cli, start_gateway

pytestmark = pytest.mark.engine
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def admin(gateway, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(
        method, f"{gateway.base_url}/admin/v1{path}", headers=AUTH, timeout=120, **kwargs
    )


def chat(gateway, model: str) -> str:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.api_key, max_retries=0, timeout=60)
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0
    )
    return response.choices[0].message.content or ""


def test_cli_refusal_lists_every_reason_and_stores_nothing(gateway, demo, tmp_path):
    too_big = tmp_path / "rank64"
    build_adapter(demo.base, too_big, DemoAdapterSpec("r64", 64, 16, ["q_proj"], seed=3))
    result = cli(
        gateway, "adapters", "register", str(too_big), "--name", "too-big", "--tenant", DEMO_TENANT
    )
    assert result.returncode == 1
    assert "max_lora_rank" in result.stderr and "32" in result.stderr
    assert admin(gateway, "GET", "/adapters/too-big").status_code == 404
    bad_name = cli(
        gateway, "adapters", "register", str(too_big), "--name", "../etc", "--tenant", DEMO_TENANT
    )
    assert bad_name.returncode == 1


def test_registered_version_serves_at_once_and_retire_takes_it_away(gateway, demo, tmp_path):
    source = demo.adapters[DEMO_ADAPTERS[0].name]
    result = cli(
        gateway,
        "adapters",
        "register",
        str(source),
        "--name",
        "fresh-adapter",
        "--tenant",
        DEMO_TENANT,
    )
    assert result.returncode == 0, result.stderr
    assert chat(gateway, "fresh-adapter") == chat(gateway, DEMO_ADAPTERS[0].name)
    assert chat(gateway, "fresh-adapter@1") == chat(gateway, "fresh-adapter")

    # A new version of the same adapter (different files) does not take the name: `name@2`
    # reaches it at once, the name only through a canary (here 50 % then straight to 100 %).
    v2 = tmp_path / "v2"
    shutil.copytree(demo.adapters[DEMO_ADAPTERS[1].name], v2)
    assert (
        cli(
            gateway,
            "adapters",
            "register",
            str(v2),
            "--name",
            "fresh-adapter",
            "--tenant",
            DEMO_TENANT,
        ).returncode
        == 0
    )
    shown = admin(gateway, "GET", "/adapters/fresh-adapter").json()
    assert [v["version"] for v in shown["versions"]] == [1, 2]
    assert chat(gateway, "fresh-adapter") == chat(gateway, DEMO_ADAPTERS[0].name)
    assert chat(gateway, "fresh-adapter@2") == chat(gateway, DEMO_ADAPTERS[1].name)
    assert cli(gateway, "adapters", "evaluate", "fresh-adapter@2").returncode == 0
    for step in (
        ("start", "fresh-adapter", "--version", "2", "--percent", "50"),
        ("promote", "fresh-adapter", "--to-percent", "100"),
    ):
        done = cli(gateway, "rollout", *step)
        assert done.returncode == 0, done.stderr
    assert chat(gateway, "fresh-adapter") == chat(gateway, DEMO_ADAPTERS[1].name)

    # Retiring the stable hands the name back to the version below it.
    retired = cli(gateway, "adapters", "retire", "fresh-adapter@2", "--reason", "test")
    assert retired.returncode == 0, retired.stderr
    assert chat(gateway, "fresh-adapter") == chat(gateway, DEMO_ADAPTERS[0].name)
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "fresh-adapter@2")
    assert cli(gateway, "adapters", "delete", "fresh-adapter@2").returncode == 0
    models = httpx.get(f"{gateway.v1}/models", headers=bearer(gateway.api_key), timeout=30).json()[
        "data"
    ]
    assert "fresh-adapter" in {m["id"] for m in models}


def test_garbage_uploads_are_4xx_and_store_nothing(gateway, demo):
    folder = demo.adapters[DEMO_ADAPTERS[0].name]
    config = (folder / "adapter_config.json").read_bytes()
    weights = (folder / "adapter_model.safetensors").read_bytes()
    cases = [
        ({"name": "junk-a", "tenant": DEMO_TENANT}, [("files", ("notes.txt", b"hello"))], 400),
        (
            {"name": "junk-b", "tenant": DEMO_TENANT},
            [("files", ("adapter_config.json", config))],
            400,
        ),  # weights missing
        (
            {"tenant": DEMO_TENANT},
            [
                ("files", ("adapter_config.json", config)),
                ("files", ("adapter_model.safetensors", weights)),
            ],
            400,
        ),
        (
            {"name": "junk-c", "tenant": DEMO_TENANT},
            [
                ("files", ("adapter_config.json", b"{not json")),
                ("files", ("adapter_model.safetensors", weights)),
            ],
            422,
        ),
        (
            {"name": "junk-d", "tenant": "no-such-tenant"},
            [
                ("files", ("adapter_config.json", config)),
                ("files", ("adapter_model.safetensors", weights)),
            ],
            404,
        ),
        (
            {"name": "junk-e", "tenant": DEMO_TENANT},
            [("files", ("adapter.tar", b"not a tar archive"))],
            400,
        ),
    ]
    for form, files, status in cases:
        response = admin(gateway, "POST", "/adapters", data=form, files=files)
        assert response.status_code == status, (form, response.text)
        assert set(response.json()) == {"error"}
        if "name" in form:
            assert admin(gateway, "GET", f"/adapters/{form['name']}").status_code == 404


def test_cli_usage_errors_exit_2(gateway, tmp_path):
    assert cli(gateway, "adapters", "retire", "no-version-given").returncode == 2
    missing = cli(
        gateway, "adapters", "register", str(tmp_path / "nope"), "--name", "x", "--tenant", "t"
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_admin_routes_need_the_admin_token(gateway):
    assert httpx.get(f"{gateway.base_url}/admin/v1/adapters", timeout=30).status_code == 401
    wrong = httpx.get(
        f"{gateway.base_url}/admin/v1/adapters",
        headers={"Authorization": "Bearer not-it"},
        timeout=30,
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_token"
    health = admin(gateway, "GET", "/health").json()
    assert health["status"] == "ok" and health["adapters"] >= len(DEMO_ADAPTERS)
    # dtype "auto": what vLLM resolved at start, which the gate now judges values against
    assert health["engine_lora_dtype"] in {"F16", "BF16", "F32"}
    bases = admin(gateway, "GET", "/base-models").json()
    assert [b["served"] for b in bases] == [True]


def test_import_by_path_only_under_allowed_roots(gateway, demo):
    outside = admin(
        gateway,
        "POST",
        "/adapters/import",
        json={
            "path": str(demo.adapters[DEMO_ADAPTERS[2].name]),
            "name": "by-path",
            "tenant": DEMO_TENANT,
        },
    )
    assert outside.status_code == 400 and outside.json()["error"]["code"] == "path_not_allowed"
    garbage = admin(gateway, "POST", "/adapters/import", json={"path": 3, "oops": True})
    assert garbage.status_code == 400


async def test_a_base_one_bit_off_refuses_to_start(demo, tmp_path):
    """The registry pins the base served under a name; one flipped bit → no start-up."""
    from registry import service
    from registry.compat import fingerprint_base_model
    from registry.db import make_engine, make_session_factory, migrate

    (tmp_path / "data").mkdir()
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'registry.db'}"
    await migrate(url)
    db = make_engine(url)
    async with make_session_factory(db)() as session:
        await service.register_base_model(
            session, name=BASE_NAME, fingerprint=fingerprint_base_model(demo.base), actor="test"
        )
    await db.dispose()

    flipped = tmp_path / "flipped-base"
    shutil.copytree(demo.base, flipped)
    weights = flipped / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="gateway exited early") as info:
        start_gateway(replace(demo, base=flipped), tmp_path)
    assert "BaseModelMismatch" in str(info.value), str(info.value)[-3000:]


def test_a_withdrawn_dataset_is_found_and_taken_out_of_service_from_the_cli(
    gateway, demo, tmp_path
):
    digest = secrets.token_hex(32)
    card = tmp_path / "card.json"
    dataset = {"name": "partner-tickets", "sha256": digest, "license": "PARTNER_ONLY"}
    card.write_text(json.dumps({"owner": "ml@demo", "objective": "sft", "datasets": [dataset]}))
    source = DEMO_ADAPTERS[-1].name
    registered = cli(
        gateway,
        "adapters",
        "register",
        str(demo.adapters[source]),
        "--name",
        "partner-bot",
        "--tenant",
        DEMO_TENANT,
        "--card",
        str(card),
    )
    assert registered.returncode == 0, registered.stderr
    assert chat(gateway, "partner-bot") == chat(gateway, source)

    listed = cli(gateway, "datasets", "adapters", f"sha256:{digest}")
    assert listed.returncode == 0, listed.stderr
    found = json.loads(listed.stdout)["data"]
    assert [(f["adapter"], f["version"], f["tenant"]) for f in found] == [
        ("partner-bot", 1, DEMO_TENANT)
    ]
    revoked = cli(gateway, "datasets", "revoke", digest, "--reason", "contract ended")
    assert revoked.returncode == 0, revoked.stderr
    assert json.loads(revoked.stdout)["versions"][0]["outcome"] == "retired"
    with pytest.raises(openai.NotFoundError):
        chat(gateway, "partner-bot")
    assert chat(gateway, source)  # the adapter it was copied from is another line
