"""At app shutdown, the caches' registry probes are cancelled and awaited before the registry
closes (found by review): nothing cancelled them, so a probe waiting on a black-holed database
outlived the lifespan and ran against the disposed engine. Through the real path: a cached
key and name outlive their lifetime while the registry refuses connections, and the next
requests answer from them and start the probes."""

from __future__ import annotations

import asyncio
import time

from gateway import registry_outage
from gateway.registry_outage import RegistryOutage
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root, register
from tests.gateway.test_registry_outage import FailingSessions

TTL_S = 0.2


def test_shutdown_cancels_the_outage_probes_before_the_registry_closes(tmp_path, monkeypatch):
    events: list[str] = []

    async def hung_probe(self: RegistryOutage) -> None:  # waits as on a black-holed database
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append(f"{self._what} probe cancelled")
            raise

    monkeypatch.setattr(RegistryOutage, "_check", hung_probe)
    monkeypatch.setattr(registry_outage, "PROBE_INTERVAL_S", 0.0)
    demo_root = build_demo_root(tmp_path / "demo")
    settings = {"data_dir": tmp_path / "data", "catalog_cache_ttl_s": TTL_S}
    with client_for(demo_root, ScriptedEngine(["a"]), **settings) as client:
        name = f"x{client.tenant}"
        register(client, demo_root, name, "v1")
        body = {"model": name, "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 200  # both cached
        runtime = client.app.state.registry
        close = runtime.close

        async def closing() -> None:
            events.append("registry closed")
            await close()

        runtime.close = closing
        failing = FailingSessions(runtime.sessions)
        runtime.sessions = failing  # the catalog and the authenticator ask through it
        failing.down = True
        for _ in range(2):  # the first notes the outage, the second starts the probes
            time.sleep(2 * TTL_S)  # the entries' lifetime ends (the name's was renewed)
            assert client.post("/v1/completions", json=body).status_code == 200
    assert sorted(events[:2]) == ["api keys probe cancelled", "model names probe cancelled"]
    assert events[2:] == ["registry closed"]
