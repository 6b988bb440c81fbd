"""An adapter the engine cannot load, through a real gateway and engine: that request's 500,
never the engine's death. vLLM 0.32 loads a missing adapter inside the engine step that first
schedules it, and a failed load there ends the engine for every tenant; loraplex's engine core
(kernels.engine_core_loads) loads it when the request arrives and refuses that request alone,
while the gateway sends the request without waiting for the load's answer.

Its own gateway: room for two adapters in the engine, so a third evicts the first, whose files
are then damaged; the catalog verified them at first use, so only the engine finds out."""

from __future__ import annotations

import httpx

from tests.conftest import bearer, cli, start_gateway, stop_gateway, tenant_with_key

SOURCES = ("demo-qkvo-r8", "demo-mlp-r4", "demo-qv-rs32")


def test_a_failed_load_is_that_requests_500_and_the_engine_serves_on(demo, tmp_path):
    gateway = start_gateway(demo, tmp_path, LORAPLEX_MAX_LORAS="2", LORAPLEX_MAX_CPU_LORAS="2")
    try:
        started = gateway.log_path.read_text(errors="replace")
        assert "the engine core has loraplex_loads_on_arrival: True" in started
        key = tenant_with_key(gateway, "lf")
        for source in SOURCES:
            registered = cli(
                gateway, "adapters", "register", str(demo.adapters[source]),
                "--name", source, "--tenant", "lf",
            )  # fmt: skip
            assert registered.returncode == 0, registered.stderr
        with httpx.Client(base_url=gateway.v1, headers=bearer(key), timeout=120) as client:

            def complete(model: str) -> httpx.Response:
                body = {"model": model, "prompt": "hello", "max_tokens": 4, "temperature": 0}
                return client.post("/completions", json=body)

            first = complete(SOURCES[0])
            assert first.status_code == 200, first.text
            for source in SOURCES[1:]:  # the third evicts the first from the engine
                assert complete(source).status_code == 200
            damaged = _stored_weights(tmp_path, demo.adapters[SOURCES[0]])
            damaged.write_bytes(b"\0" * 64)  # not safetensors any more
            failed = complete(SOURCES[0])
            assert failed.status_code == 500, failed.text
            assert failed.json()["error"]["code"] == "adapter_load_failed"
            again = complete(SOURCES[0])  # tried again, refused again: still one request's 500
            assert again.status_code == 500, again.text
            for model in (SOURCES[1], "loraplex-demo-base", SOURCES[2]):
                served = complete(model)
                assert served.status_code == 200, (model, served.text)
        assert httpx.get(f"{gateway.base_url}/readyz", timeout=10).status_code == 200
        assert gateway.process.poll() is None
        loads = [
            line
            for line in gateway.metrics_text().splitlines()
            if line.startswith("loraplex_adapter_loads_total") and SOURCES[0] in line
        ]
        assert any('result="error"' in line and line.endswith(" 2.0") for line in loads), loads
        # The load went ahead of its request (send_utility): one attempt per request, the
        # engine core's, and the request refused on the load's answer without trying again.
        log = gateway.log_path.read_text(errors="replace")
        assert log.count("Invocation of add_lora method failed") == 2
        assert "request refused" not in log  # kernels.engine_core_loads' own attempt failing
    finally:
        stop_gateway(gateway)


def _stored_weights(workdir, source):
    """The registered copy of `source`'s weights in the gateway's artifact store."""
    wanted = (source / "adapter_model.safetensors").read_bytes()
    found = [
        path
        for path in (workdir / "data").rglob("adapter_model.safetensors")
        if path.read_bytes() == wanted
    ]
    assert len(found) == 1, found
    return found[0]
