"""Admin adapter registration through the API: what a form left out means."""

from __future__ import annotations

import pytest

from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import FILES, build_demo_root

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("adapter-admin"))


def upload(client, root, folder: str, **form: str):
    files = [("files", (f, (root / folder / f).read_bytes())) for f in FILES]
    data = {"name": "guard", "tenant": client.tenant, **form}
    return client.post("/admin/v1/adapters", data=data, files=files, headers=ADMIN)


def test_a_new_version_keeps_its_adapters_visibility_unless_told(demo_root):
    """v2 of a shared adapter registered without `visibility` used to be refused
    (visibility_mismatch): the form's default was private."""
    with client_for(demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "vis") as client:
        first = upload(client, demo_root, "v1", visibility="shared")
        assert first.status_code == 201, first.text
        second = upload(client, demo_root, "v2")
        assert second.status_code == 201, second.text
        listed = client.get("/admin/v1/adapters/guard", headers=ADMIN).json()
        assert listed["visibility"] == "shared"
        assert [v["version"] for v in listed["versions"]] == [1, 2]
        refused = upload(client, demo_root, "v1", visibility="private")  # an explicit change
        assert refused.status_code == 422
        assert refused.json()["error"]["problems"][0]["code"] == "visibility_mismatch"
