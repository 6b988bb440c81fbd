"""Shared by the app-level rollout tests: a tiny demo base with two peft adapters (v1, v2) and
registration through the admin API as the client's tenant."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from gateway.demo import DemoAdapterSpec, build_adapter, build_base
from tests.gateway.fake_engine import ADMIN_TOKEN

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
FILES = ("adapter_config.json", "adapter_model.safetensors")


def build_demo_root(root: Path) -> Path:
    build_base(root / "base")
    for seed in (1, 2):
        spec = DemoAdapterSpec(f"v{seed}", 8, 16, ["q_proj", "v_proj"], seed=seed)
        build_adapter(root / "base", root / f"v{seed}", spec)
    return root


def register(client, root: Path, name: str, folder: str) -> None:
    files = [("files", (f, (root / folder / f).read_bytes())) for f in FILES]
    form = {"name": name, "tenant": client.tenant}
    response = client.post("/admin/v1/adapters", data=form, files=files, headers=ADMIN)
    assert response.status_code == 201, response.text


def complete(client, name: str) -> int:
    """One tiny completion for `name`; its status code."""
    body = {"model": name, "prompt": "x", "max_tokens": 1}
    return client.post("/v1/completions", json=body).status_code


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """For what the app does in a task after a response (the controller's rollbacks, shadow
    mirrors): poll until it shows."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
