"""Deleting a version while one of its requests runs: the request finishes on its adapter and
the engine lives. The engine here plays vLLM 0.32's rule that matters (worker_manager's
`_apply_adapters`): at every step a running request's adapter that is not loaded is loaded
again from its path, and a path that is gone is a fatal engine error, for every tenant."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from gateway.engine.client import EngineDead
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, register


class ReloadingEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(["a", "b", "c", "d"])
        self.loaded: set[int] = set()
        self.first_step = threading.Event()
        self.go_on = threading.Event()
        self.died: str | None = None

    async def add_adapter(self, adapter):
        self.loaded.add(adapter.engine_id)

    async def remove_adapter(self, engine_id):
        self.loaded.discard(engine_id)

    async def generate(self, request_id, prompt_token_ids, options, adapter):
        steps = super().generate(request_id, prompt_token_ids, options, adapter)
        async for update in steps:
            if adapter is not None and adapter.engine_id not in self.loaded:
                if not (Path(adapter.path) / "adapter_model.safetensors").is_file():
                    self.died = f"LoRAAdapterNotFoundError: {adapter.path}"
                    raise EngineDead(self.died)
                self.loaded.add(adapter.engine_id)
            yield update
            if not self.first_step.is_set():
                self.first_step.set()
                while not self.go_on.is_set():
                    await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("retire-in-flight"))


def test_deleting_a_version_under_a_running_request_keeps_the_engine_alive(demo_root):
    engine = ReloadingEngine()
    with client_for(demo_root, engine) as client:
        register(client, demo_root, "doomed", "v1")  # its only version: deletable
        result: dict[str, object] = {}

        def stream() -> None:
            body = {"model": "doomed", "prompt": "hello", "max_tokens": 4, "stream": True}
            with client.stream("POST", "/v1/completions", json=body) as response:
                result["status"] = response.status_code
                result["body"] = response.read().decode()

        worker = threading.Thread(target=stream)
        worker.start()
        assert engine.first_step.wait(10)
        deleted = client.delete("/admin/v1/adapters/doomed/versions/1", headers=ADMIN)
        assert deleted.status_code == 200, deleted.text
        version_id = engine.calls[-1][1].engine_id
        assert version_id in engine.loaded  # still held by the running request
        refused = client.post("/v1/completions", json={"model": "doomed", "prompt": "x"})
        assert refused.status_code == 404  # no new request reaches it
        engine.go_on.set()
        worker.join(10)

        assert engine.died is None
        assert result["status"] == 200 and "error" not in str(result["body"])
        assert str(result["body"]).rstrip().endswith("data: [DONE]")
        assert version_id not in engine.loaded  # unloaded after its last request
        assert client.app.state.adapter_admin._cache.resident() == []
