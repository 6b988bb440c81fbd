"""deploy/compose: the files match the Compose specification, every service has a healthcheck
and ports, the gateway waits for a healthy registry and is ready only when its engine is, and
every path, volume, variable and address points at something that exists."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.conftest import run, settings_env_names
from tests.deploy.demo_base import demo_max_position_embeddings
from tests.deploy.promql import DEPLOY

COMPOSE_DIR = DEPLOY / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"
OVERRIDES = [COMPOSE_DIR / "docker-compose.gpu.yml", COMPOSE_DIR / "docker-compose.model.yml"]
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
SERVICES = {"gateway", "postgres", "redis", "prometheus", "grafana"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")
REQUIRED = "/required-at-run-time/"


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default, or "" when there is none;
    `${VAR:?message}` (the operator must set it): a host path no check should look for."""

    def value_of(match: re.Match[str]) -> str:
        return REQUIRED + match[1] if match[2] == "?" else match[3] or ""

    return _VARIABLE.sub(value_of, value)


def load(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def services() -> dict:
    return load()["services"]


def check_spec(*paths: Path):
    return run(
        sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
        *map(str, paths),
    )  # fmt: skip


def test_files_match_the_compose_specification():
    result = check_spec(COMPOSE, *OVERRIDES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_specification_check_catches_a_typo(tmp_path: Path):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("start_period: 600s", "start_perod: 600s"))
    assert check_spec(broken).returncode != 0


def test_the_stack(services):
    assert set(services) == SERVICES


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck_and_ports(services, name):
    service = services[name]
    check = service["healthcheck"]
    assert check["test"][0] in {"CMD", "CMD-SHELL"}, name
    assert {"interval", "timeout", "retries"} <= check.keys(), name
    assert service["ports"], name
    assert service.get("restart") == "unless-stopped", name


def test_gateway_waits_for_a_healthy_registry(services):
    assert services["gateway"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_gateway_is_healthy_only_when_its_engine_is_ready(services):
    check = services["gateway"]["healthcheck"]
    assert "/readyz" in " ".join(check["test"])
    port = interpolate(services["gateway"]["environment"]["LORAPLEX_PORT"])
    assert f":{port}/readyz" in " ".join(check["test"])
    # The engine needs minutes on a real model; compose must not give up before that.
    assert int(check["start_period"].rstrip("s")) >= 300


def test_gateway_shares_its_tenant_limits_through_the_compose_redis(services):
    env = services["gateway"]["environment"]
    url = urlsplit(interpolate(env["LORAPLEX_LIMITS_REDIS_URL"]))
    assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
    assert services["gateway"]["depends_on"]["redis"]["condition"] == "service_healthy"
    command = services["redis"]["command"]
    assert command[command.index("--save") + 1] == ""  # nothing on disk to keep


def test_gateway_uses_the_compose_postgres(services):
    env = services["gateway"]["environment"]
    url = urlsplit(interpolate(env["LORAPLEX_DATABASE_URL"]))
    database = services["postgres"]["environment"]
    assert url.scheme == "postgresql+asyncpg"
    assert url.hostname == "postgres" and url.port == 5432
    assert url.username == database["POSTGRES_USER"]
    assert url.password == interpolate(database["POSTGRES_PASSWORD"])
    assert url.path == f"/{database['POSTGRES_DB']}"


def test_gateway_environment_is_settings_the_gateway_reads(services, monkeypatch):
    from gateway.settings import Settings

    known = settings_env_names()
    environments = [services["gateway"]["environment"]]
    environments += [load(path)["services"]["gateway"].get("environment", {}) for path in OVERRIDES]
    for environment in environments:
        assert {name for name in environment if name.startswith("LORAPLEX_")} <= known
    for name, value in services["gateway"]["environment"].items():
        monkeypatch.setenv(name, interpolate(str(value)))
    settings = Settings()
    assert settings.demo is True
    assert settings.port == 8000 and settings.host == "0.0.0.0"


def test_prometheus_scrapes_the_gateway_service(services):
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "loraplex-gateway")
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services
    published = [interpolate(str(p)).rsplit(":", 1)[-1] for p in services[host]["ports"]]
    assert port in published


def test_prometheus_sends_the_metrics_token_the_gateway_expects(services):
    job = next(
        j
        for j in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
        if j["job_name"] == "loraplex-gateway"
    )
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    token_file = PROMETHEUS_CONFIG.parent / job["authorization"]["credentials_file"]
    expected = interpolate(str(services["gateway"]["environment"]["LORAPLEX_METRICS_TOKEN"]))
    assert token_file.read_text().strip() == expected
    # compose mounts the folder, so the file is where the config looks for it
    assert any(
        v.startswith("../prometheus:/etc/prometheus") for v in services["prometheus"]["volumes"]
    )


def test_bind_mounts_and_build_files_exist():
    for path in [COMPOSE, *OVERRIDES]:
        for name, service in load(path)["services"].items():
            for volume in service.get("volumes", []):
                source = interpolate(volume).split(":")[0]
                if source.startswith((".", "/")) and not source.startswith(REQUIRED):
                    assert (COMPOSE_DIR / source).exists(), f"{path.name} {name}: {source}"
            if build := service.get("build"):
                context = (COMPOSE_DIR / build["context"]).resolve()
                assert (context / "pyproject.toml").is_file(), f"{name}: context is the repo"
                assert (context / build["dockerfile"]).is_file(), f"{name}: {build}"


def test_named_volumes_are_declared():
    compose = load()
    declared = set(compose["volumes"])
    for path in [COMPOSE, *OVERRIDES]:
        for service in load(path)["services"].values():
            for volume in service.get("volumes", []):
                source = interpolate(volume).split(":")[0]
                if source and not source.startswith((".", "/")):
                    assert source in declared, source


def test_gpu_override_swaps_the_image_and_reserves_a_gpu():
    gateway = load(OVERRIDES[0])["services"]["gateway"]
    assert gateway["build"]["dockerfile"].endswith("Dockerfile.cuda")
    (device,) = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_docker_compose_accepts_the_stack(tmp_path: Path):
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        pytest.skip("no `docker compose` here: the specification check above stands in")
    files = [arg for path in [COMPOSE, *OVERRIDES] for arg in ("-f", str(path))]
    # docker-compose.model.yml requires these.
    env = {
        **os.environ,
        "LORAPLEX_BASE_MODEL": "/models/base",
        "LORAPLEX_MODELS_DIR": str(tmp_path),
        "LORAPLEX_ADMIN_TOKEN": "an-admin-token-of-the-operator",
        "LORAPLEX_METRICS_TOKEN": "a-metrics-token-of-the-operator",
    }
    result = run(docker, "compose", *files, "config", "--quiet", env=env)
    assert result.returncode == 0, result.stderr


def test_stopping_the_gateway_waits_for_its_drain_and_grace(services):
    """docker's default 10 s before SIGKILL cut requests the gateway was still finishing."""
    from gateway.settings import Settings

    defaults = Settings()
    grace = services["gateway"]["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > (
        defaults.shutdown_drain_s + defaults.shutdown_grace_s
    )


def published(port: str) -> tuple[str, str]:
    """(host address, host port) of a `[address:]port:container_port` mapping."""
    parts = port.split(":")
    return (parts[0] if len(parts) == 3 else "0.0.0.0", parts[-2])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_ports_are_published_on_loopback_unless_told(services, name):
    """The defaults are well-known secrets (admin/admin, change-me-*): out of the box nothing
    may answer beyond this machine. Each service has its own address variable: opening the
    gateway's must not publish Prometheus (no login, every tenant's series) or Grafana."""
    own = {
        "gateway": "LORAPLEX_BIND_ADDRESS",
        "prometheus": "PROMETHEUS_BIND_ADDRESS",
        "grafana": "GRAFANA_BIND_ADDRESS",
    }
    for port in services[name]["ports"]:
        assert published(interpolate(str(port)))[0] == "127.0.0.1", port
        if name in own:
            assert str(port).startswith(f"${{{own[name]}:-127.0.0.1}}:"), port


def test_prometheus_has_no_lifecycle_or_admin_api(services):
    """--web.enable-lifecycle lets anyone who reaches the port POST /-/quit (or /-/reload)."""
    command = services["prometheus"]["command"]
    assert not {"--web.enable-lifecycle", "--web.enable-admin-api"} & set(command)


def test_a_real_model_needs_the_operators_tokens(services):
    """Outside demo mode the gateway refuses the change-me-* defaults: the model override makes
    compose ask for the tokens instead of starting a gateway that exits."""
    defaults = services["gateway"]["environment"]
    override = load(OVERRIDES[1])["services"]["gateway"]["environment"]
    assert override["LORAPLEX_DEMO"] == "false"
    for name in ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_METRICS_TOKEN"):
        assert interpolate(defaults[name]).startswith("change-me")
        assert interpolate(override[name]).startswith(REQUIRED), name
    grafana = load(OVERRIDES[1])["services"]["grafana"]["environment"]
    assert interpolate(grafana["GF_SECURITY_ADMIN_PASSWORD"]).startswith(REQUIRED)


def test_the_demo_context_fits_the_demo_base(services, monkeypatch, tmp_path):
    """vLLM refuses a max_model_len above the base's max_position_embeddings; the stack serves
    the demo base by default, with or without the GPU override."""
    from gateway.settings import Settings

    environment = {**services["gateway"]["environment"]}
    environment.update(load(OVERRIDES[0])["services"]["gateway"].get("environment", {}))
    for name in settings_env_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, interpolate(str(value)))
    settings = Settings()
    assert settings.demo and settings.base_model is None, "the stack serves the demo"
    assert settings.max_model_len <= demo_max_position_embeddings(tmp_path / "base")
