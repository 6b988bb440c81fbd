"""deploy/docker: the Dockerfiles lint clean (hadolint) and hold what the stack relies on:
Python 3.11, the right extra, a non-root user, port 8000, a readiness healthcheck, and a build
context that sends every file the image copies."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import dockerfile
import pytest

from tests.deploy.conftest import run
from tests.deploy.promql import DEPLOY, ROOT

DOCKER = DEPLOY / "docker"
VARIANTS = {"cpu": "cpu", "cuda": "gpu"}  # Dockerfile suffix → pyproject extra
TORCH_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def instructions(variant: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKER / f"Dockerfile.{variant}")))


def of(commands: list[dockerfile.Command], name: str) -> list[dockerfile.Command]:
    return [command for command in commands if command.cmd == name]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_dockerfiles_lint_clean(hadolint):
    files = [str(DOCKER / f"Dockerfile.{variant}") for variant in VARIANTS]
    result = run(hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_catches_a_bad_dockerfile(hadolint, tmp_path: Path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN cd /src && pip install .\nCMD loraplex serve\n")
    result = run(hadolint, "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(bad))
    assert result.returncode != 0
    assert "DL3003" in result.stdout and "DL3025" in result.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_python_3_11(variant):
    text = (DOCKER / f"Dockerfile.{variant}").read_text()
    assert pyproject()["project"]["requires-python"] == ">=3.11,<3.12"
    (base,) = of(instructions(variant), "FROM")
    if variant == "cpu":
        assert base.value[0].startswith("python:3.11")
    else:
        assert base.value[0].startswith("nvidia/cuda:")
        assert "python3.11 -m venv" in text


@pytest.mark.parametrize("variant", VARIANTS)
def test_installs_its_extra(variant):
    extra = VARIANTS[variant]
    assert extra in pyproject()["project"]["optional-dependencies"]
    runs = " ".join(" ".join(command.value) for command in of(instructions(variant), "RUN"))
    assert re.search(rf"pip install [^&]*\"\.\[{extra}(,[a-z0-9]+)*\]\"", runs), runs


def test_cpu_image_removes_the_cuda_torch_extras_after_installing():
    runs = [" ".join(command.value) for command in of(instructions("cpu"), "RUN")]
    install = next(i for i, text in enumerate(runs) if "pip install --extra-index-url" in text)
    after = " ".join(runs[install:])
    assert after.index("pip install") < after.index("pip uninstall")
    for package in TORCH_EXTRAS:
        assert package in after.split("pip uninstall", 1)[1]
    # The CPU torch comes from the PyTorch CPU index, as `make setup` documents.
    (arg,) = of(instructions("cpu"), "ARG")
    assert "download.pytorch.org/whl/cpu" in arg.value[0]


@pytest.mark.parametrize("variant", VARIANTS)
def test_runs_as_non_root_on_port_8000_with_a_readiness_healthcheck(variant):
    commands = instructions(variant)
    users = of(commands, "USER")
    assert users and users[-1].value[0].split(":")[0] not in {"root", "0"}
    last_user = commands.index(users[-1])
    assert commands.index(of(commands, "CMD")[-1]) > last_user
    assert [command.value for command in of(commands, "EXPOSE")] == [("8000",)]
    (healthcheck,) = of(commands, "HEALTHCHECK")
    assert "/readyz" in " ".join(healthcheck.value)
    assert any(flag.startswith("--start-period=") for flag in healthcheck.flags)
    assert of(commands, "CMD")[-1].value == ("loraplex", "serve")
    env = " ".join(" ".join(command.value) for command in of(commands, "ENV"))
    assert "LORAPLEX_HOST 0.0.0.0" in env or "LORAPLEX_HOST=0.0.0.0" in env


def ignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            result = not negate
    return result


@pytest.mark.parametrize("variant", VARIANTS)
def test_build_context_sends_what_the_image_copies(variant):
    ignore = DOCKER / f"Dockerfile.{variant}.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for command in of(instructions(variant), "COPY"):
        for source in command.value[:-1]:
            assert (ROOT / source).exists(), source
            assert not ignored(patterns, source), f"{source} is excluded by {ignore.name}"
    for heavy in (".venv", ".git", ".loraplex", "benchmarks/results", "tests"):
        assert ignored(patterns, heavy), f"{heavy} would be sent to the build"
    # The package's own source trees are all there (pyproject's packages.find).
    includes = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {source for command in of(instructions(variant), "COPY") for source in command.value}
    assert {pattern.rstrip("*") for pattern in includes} <= copied
