"""Admin adapter registration through the API: what a form left out means."""

from __future__ import annotations

import io
import logging
import tarfile

import pytest
from prometheus_client import REGISTRY

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


def refusals() -> float:
    labels = {"operation": "register", "result": "refused"}
    return REGISTRY.get_sample_value("loraplex_registry_operations_total", labels) or 0


def traversal_tar() -> bytes:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("../../etc/evil")
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    return archive.getvalue()


REFUSED = [
    ("traversal", "upload", {"files": [("files", ("a.tar", traversal_tar()))]}, "unsafe_archive"),
    ("oversize", "upload", {"files": None}, "upload_too_large"),
    ("names", "upload", {"files": [("files", ("x.bin", b"x"))]}, "invalid_request_error"),
    ("outside", "import", {"path": "/etc"}, "path_not_allowed"),
    ("relative", "import", {"path": "adapters/x"}, "path_not_allowed"),
    ("bucket", "import", {"path": "s3://not-allowed/adapter"}, "path_not_allowed"),
]


@pytest.mark.parametrize(("case", "route", "given", "code"), REFUSED, ids=[r[0] for r in REFUSED])
def test_a_refused_upload_or_import_is_audited_and_counted(
    demo_root, caplog, case, route, given, code
):
    """Staging (receiving, unpacking, path and bucket checks) ran outside registry_operation:
    these refusals left no audit line and no registry-operation count."""
    with (
        client_for(
            demo_root,
            ScriptedEngine(["a"]),
            data_dir=demo_root / f"refused-{case}",
            upload_max_bytes=30_000,  # a tar of one small file fits, the demo weights do not
            import_roots=[demo_root / "v1"],
            s3_import_buckets=["adapters"],
        ) as client,
        caplog.at_level(logging.INFO, logger="loraplex.audit"),
    ):
        before = refusals()
        form = {"name": f"refused-{case}", "tenant": client.tenant}
        if route == "upload":
            files = given["files"] or [
                ("files", (f, (demo_root / "v1" / f).read_bytes())) for f in FILES
            ]
            response = client.post("/admin/v1/adapters", data=form, files=files, headers=ADMIN)
        else:
            body = {**form, "path": given["path"]}
            response = client.post("/admin/v1/adapters/import", json=body, headers=ADMIN)
        assert 400 <= response.status_code < 500, response.text
        assert refusals() == before + 1
    lines = [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "audit", {}).get("event") == "admin.register"
    ]
    assert lines == [
        f"admin.register actor=admin result=refused code={code} adapter=refused-{case} "
        f"tenant={client.tenant}"
    ]


def test_a_registration_is_audited_once(demo_root, caplog):
    with (
        client_for(demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "ok") as client,
        caplog.at_level(logging.INFO, logger="loraplex.audit"),
    ):
        assert upload(client, demo_root, "v1").status_code == 201
    registered = [
        r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == "admin.register"
    ]
    assert registered == [
        {
            "event": "admin.register",
            "actor": "admin",
            "result": "ok",
            "adapter": "guard",
            "tenant": client.tenant,
        }
    ]
