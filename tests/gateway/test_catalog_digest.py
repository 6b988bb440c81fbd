"""What the engine loads for a version is that version's registered files: before the first
load the catalog re-runs the gate on the stored files and checks their digest against the
version's artifact digest. A compatible but different adapter written into a version's folder
in the store passes the gate; the digest refuses it (500 adapter_load_failed, and the log says
why), while an intact version beside it is served as usual."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import FILES, build_demo_root, register


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("digest"))


def complete(client, model: str):
    return client.post("/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})


def test_a_compatible_but_different_adapter_in_the_store_is_refused(demo_root, tmp_path, caplog):
    with client_for(demo_root, ScriptedEngine(["a"]), data_dir=tmp_path / "data") as client:
        register(client, demo_root, "swapped", "v1")
        stored = [p.parent for p in (tmp_path / "data").rglob("adapter_model.safetensors")]
        assert len(stored) == 1
        for name in FILES:  # v2: the same base, rank and modules, other weights
            (stored[0] / name).unlink()
            (stored[0] / name).write_bytes((demo_root / "v2" / name).read_bytes())
        register(client, demo_root, "intact", "v2")

        with caplog.at_level(logging.ERROR, logger="gateway.catalog"):
            refused = complete(client, "swapped")
        assert refused.status_code == 500, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "adapter_load_failed")
        assert "request id" in error["message"]
        assert "refusing to load swapped@1" in caplog.text and "not the registered" in caplog.text
        assert complete(client, "swapped").status_code == 500  # refused every time, not once
        assert complete(client, "intact").status_code == 200
