"""Session fixtures shared by every test package: the demo world and one real gateway.

The gateway runs as a real `python -m gateway serve` subprocess with its embedded vLLM engine,
started once per test session (≈ 20 s on 2 cores) and driven over HTTP by the official openai
client, exactly as users drive it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.demo import DemoPaths, init_demo

BASE_NAME = "loraplex-demo-base"
ADMIN_TOKEN = "test-admin-token"
METRICS_TOKEN = "test-metrics-token"
DEMO_TENANT = "demo"
# Four adapters in the demo and max_loras 4: a burst with all of them plus the base fills every
# slot, the exact condition in which vLLM 0.32's CPU ops gave base requests the last adapter.
MAX_LORAS = 4
READY_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return init_demo(tmp_path_factory.mktemp("demo"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningGateway:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # Tenant `demo`'s key once the demo adapters are registered (see `gateway`).
    api_key: str = ""

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def metrics_text(self) -> str:
        """One /metrics scrape, as Prometheus makes it (with the metrics token)."""
        response = httpx.get(
            f"{self.base_url}/metrics",
            headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.text

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_gateway(
    demo: DemoPaths | None, workdir: Path, *args: str, **env_overrides: str
) -> RunningGateway:
    """`python -m gateway serve ARGS`, ready; demo None → the CLI's own demo mode builds
    everything."""
    gateway = launch_gateway(demo, workdir, *args, **env_overrides)
    process = gateway.process
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{gateway.log_tail()}")
        try:
            if httpx.get(f"{gateway.base_url}/readyz", timeout=2).status_code == 200:
                return gateway
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_gateway(gateway)
    raise RuntimeError(f"gateway not ready in {READY_TIMEOUT_S}s:\n{gateway.log_tail()}")


def launch_gateway(
    demo: DemoPaths | None, workdir: Path, *args: str, **env_overrides: str
) -> RunningGateway:
    """`python -m gateway serve ARGS`, started (not yet ready)."""
    port = free_port()
    model_env = (
        {}
        if demo is None
        else {
            "LORAPLEX_BASE_MODEL": str(demo.base),
            "LORAPLEX_SERVED_MODEL_NAME": BASE_NAME,
        }
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")},
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_DATA_DIR": str(workdir / "data"),
        "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
        "LORAPLEX_METRICS_TOKEN": METRICS_TOKEN,
        **model_env,
        "LORAPLEX_DRIFT_SAMPLE_RATE": "0",  # sampled at random otherwise: tests that opt in
        "LORAPLEX_MAX_LORAS": str(MAX_LORAS),
        "LORAPLEX_MAX_LORA_RANK": "32",
        "LORAPLEX_MAX_MODEL_LEN": "2048",
        "LORAPLEX_DTYPE": "float32",
        **env_overrides,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"gateway-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", *args],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        # Own process group (stop_gateway reaches the engine children) but the tests' session:
        # Linux's autogroup scheduler shares CPU between sessions, and a gateway in a session
        # of its own left the test process unscheduled for seconds on 2 cores (the same
        # stalls benchmarks/serve/servers.py measured and removed this way).
        process_group=0,
    )
    return RunningGateway(f"http://127.0.0.1:{port}", process, log_path)


def stop_gateway(gateway: RunningGateway) -> None:
    if gateway.process.poll() is None:
        gateway.process.terminate()
        try:
            gateway.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(gateway.process.pid, 9)
            gateway.process.wait()


def cli(gateway: RunningGateway, *args: str) -> subprocess.CompletedProcess[str]:
    """`loraplex ARGS` against a running gateway, as an operator would type it."""
    env = {**os.environ, "LORAPLEX_URL": gateway.base_url, "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def register_demo_adapters(gateway: RunningGateway, demo: DemoPaths) -> str:
    """Tenant `demo` owning the demo adapters, and a key for it (returned)."""
    created = cli(gateway, "tenants", "create", DEMO_TENANT)
    assert created.returncode == 0, created.stderr
    for name, path in demo.adapters.items():
        result = cli(
            gateway, "adapters", "register", str(path), "--name", name, "--tenant", DEMO_TENANT
        )
        assert result.returncode == 0, result.stderr
    return issue_key(gateway, DEMO_TENANT)


def issue_key(gateway: RunningGateway, tenant: str, *options: str) -> str:
    """`loraplex keys create --tenant T`: the key is the last line of stdout."""
    result = cli(gateway, "keys", "create", "--tenant", tenant, *options)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def tenant_with_key(gateway: RunningGateway, tenant: str, *create_options: str) -> str:
    created = cli(gateway, "tenants", "create", tenant, *create_options)
    assert created.returncode == 0, created.stderr
    return issue_key(gateway, tenant)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def gateway(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """One engine for the session; its adapters arrive through the admin API after start-up,
    so every adapter test also proves registration → first token without a restart."""
    running = start_gateway(
        demo,
        tmp_path_factory.mktemp("gateway"),
        LORAPLEX_ENABLE_FAULTS="1",
        # Compact JSON: the demo's random weights would pad JSON with whitespace to max_tokens.
        LORAPLEX_STRUCTURED_OUTPUTS_COMPACT_JSON="1",
        LORAPLEX_TOOL_CALL_PARSER="hermes",  # tool_choice "auto" (tests/e2e/test_tool_calls.py)
        LORAPLEX_REASONING_PARSER="qwen3",  # enable_thinking: tests/e2e/test_reasoning.py
        # Every adapter request measures its prompt's perplexity (tests/e2e/test_prompt_drift.py),
        # so every adapter test also shows that leaves its output alone.
        LORAPLEX_DRIFT_SAMPLE_RATE="1",
        LORAPLEX_DRIFT_REFERENCE_SAMPLES="10",
    )
    try:
        running.api_key = register_demo_adapters(running, demo)
        yield running
    finally:
        stop_gateway(running)
