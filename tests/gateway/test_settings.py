from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import Settings
from registry.card import RollbackTriggers
from registry.errors import InvalidThresholds
from registry.rollout import validate_threshold_override


def test_defaults_serve_the_demo_from_the_data_dir(monkeypatch):
    for name in ("LORAPLEX_BASE_MODEL", "LORAPLEX_ADAPTER_DIR", "LORAPLEX_SERVED_MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(data_dir=Path("/srv/lp"))
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.resolved_base_model() == Path("/srv/lp/demo/base")
    assert settings.resolved_adapter_dir() == Path("/srv/lp/demo/adapters")
    assert settings.resolved_model_name() == "loraplex-demo-base"


def test_environment_overrides_and_real_model(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAPLEX_BASE_MODEL", str(tmp_path / "Llama-3-8B"))
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "8")
    monkeypatch.delenv("LORAPLEX_ADAPTER_DIR", raising=False)
    monkeypatch.delenv("LORAPLEX_SERVED_MODEL_NAME", raising=False)
    settings = Settings()
    assert settings.max_loras == 8
    assert settings.resolved_model_name() == "Llama-3-8B"
    assert settings.resolved_adapter_dir() is None  # a real base never falls back to demo adapters


@pytest.mark.parametrize(
    "bad",
    [
        {"max_lora_rank": 24},
        {"port": 0},
        {"max_loras": 0},
        {"dtype": "int3"},
        {"http_keep_alive_s": 0},
        # Verdicts are kept this long: "never" overflowed the prune's date arithmetic (a 500).
        {"feedback_max_age_s": 10**11},
    ],
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)


def test_paged_mode_settings_reach_the_plugin_as_its_environment(monkeypatch):
    """Settings decide paged mode: what the engine's processes inherit reads back, through the
    plugin's own parser, as the same pool; off means off even if a stray variable said on."""
    from gateway.engine.vllm_embedded import paged_environment_for
    from kernels.vllm_plugin import paged_config_from_env

    for name in ("LORAPLEX_PAGED_LORA", "LORAPLEX_PAGED_POOL_BYTES"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="paged_pool_bytes"):
        Settings(paged_lora=True)
    with pytest.raises(ValidationError):
        Settings(paged_lora=True, paged_pool_bytes=0)

    on = Settings(paged_lora=True, paged_pool_bytes=4 << 20, paged_page_size=8)
    config = paged_config_from_env(paged_environment_for(on))
    assert config is not None
    assert (config.pool_bytes, config.page_size, config.max_wait_s) == (4 << 20, 8, 10.0)
    assert config.admission

    monkeypatch.setenv("LORAPLEX_PAGED_LORA", "1")
    monkeypatch.setenv("LORAPLEX_PAGED_POOL_BYTES", "4096")
    from_env = Settings(paged_max_wait_ms=500)
    assert from_env.paged_lora and from_env.paged_pool_bytes == 4096
    assert paged_config_from_env(paged_environment_for(from_env)).max_wait_s == 0.5
    rotate = Settings(paged_policy="rotate", paged_max_skip_ms=100)
    config = paged_config_from_env(paged_environment_for(rotate))
    assert config is not None and (config.policy, config.max_skip_s) == ("rotate", 0.1)
    with pytest.raises(ValidationError, match="paged_policy"):
        Settings(paged_policy="lru")
    assert paged_config_from_env(paged_environment_for(rotate)).kernel == "auto"
    triton = Settings(paged_kernel="triton")
    assert paged_config_from_env(paged_environment_for(triton)).kernel == "triton"
    with pytest.raises(ValidationError, match="paged_kernel"):
        Settings(paged_kernel="cuda")
    tight = Settings(paged_max_oversubscription=1.25)
    assert paged_config_from_env(paged_environment_for(tight)).max_oversubscription == 1.25
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="paged_max_oversubscription"):
            Settings(paged_max_oversubscription=bad)
    off = Settings(paged_lora=False)
    assert paged_config_from_env({**dict(os.environ), **paged_environment_for(off)}) is None


def test_the_registered_adapters_reach_the_pool_split_unless_told_equal(monkeypatch):
    """The gateway's rank profile (registry) becomes LORAPLEX_PAGED_DEMAND, read back by the
    plugin as the same entries; paged_split=equal sends none (same pages in every group)."""
    from gateway.engine.vllm_embedded import paged_environment_for
    from kernels.page_groups import DemandEntry
    from kernels.vllm_plugin import BadPluginSetting, paged_config_from_env

    monkeypatch.delenv("LORAPLEX_PAGED_SPLIT", raising=False)
    demand = (DemandEntry(32, ("q_proj", "v_proj"), 15), DemandEntry(4, ("down_proj",), 11))
    on = Settings(paged_lora=True, paged_pool_bytes=4 << 20)
    assert on.paged_split == "demand"
    config = paged_config_from_env(paged_environment_for(on, demand))
    assert config is not None and config.demand == demand
    equal = Settings(paged_lora=True, paged_pool_bytes=4 << 20, paged_split="equal")
    config = paged_config_from_env(paged_environment_for(equal, demand))
    assert config is not None and config.demand == ()
    with pytest.raises(ValidationError, match="paged_split"):
        Settings(paged_split="proportional")
    env = {**paged_environment_for(on), "LORAPLEX_PAGED_DEMAND": '[[4, "q_proj", 1]]'}
    with pytest.raises(BadPluginSetting, match="LORAPLEX_PAGED_DEMAND"):
        paged_config_from_env(env)


def test_serve_hands_the_keep_alive_to_uvicorn(monkeypatch):
    """Idle connections outlive a load balancer's idle timeout unless configured otherwise."""
    from typer.testing import CliRunner

    from gateway.cli import app
    from gateway.shutdown import DrainingServer

    captured: dict = {}

    def run(server: DrainingServer) -> None:  # what serve configured; nothing starts
        captured.update(vars(server.config))
        server.started = True

    monkeypatch.setattr(DrainingServer, "run", run)
    monkeypatch.delenv("LORAPLEX_HTTP_KEEP_ALIVE_S", raising=False)
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    assert captured["timeout_keep_alive"] == 75
    monkeypatch.setenv("LORAPLEX_HTTP_KEEP_ALIVE_S", "30")
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    assert captured["timeout_keep_alive"] == 30


def test_demo_mode_owns_its_import_and_refuses_an_adapter_folder(monkeypatch):
    """Demo mode's key reaches what is imported with it: the demo adapters only, tenant `demo`
    (an adapter folder beside it once made the demo key tenant `default`'s)."""
    for name in ("LORAPLEX_BASE_MODEL", "LORAPLEX_ADAPTER_DIR", "LORAPLEX_IMPORT_TENANT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="LORAPLEX_ADAPTER_DIR"):
        Settings(demo=True, adapter_dir=Path("/models/adapters"))
    demo = Settings(data_dir=Path("/srv/lp"), demo=True, import_tenant="default")
    assert demo.resolved_import_tenant() == "demo"
    assert demo.resolved_adapter_dir() == Path("/srv/lp/demo/adapters")
    real = Settings(adapter_dir=Path("/models/adapters"), import_tenant="acme")
    assert real.resolved_import_tenant() == "acme"


@pytest.mark.parametrize(
    ("given", "level"),
    [("info", "INFO"), ("Debug", "DEBUG"), ("warn", "WARNING"), (" ERROR ", "ERROR")],
)
def test_log_levels_are_normalised_to_what_logging_and_uvicorn_know(given, level):
    from uvicorn.config import LOG_LEVELS

    settings = Settings(log_level=given)
    assert settings.log_level == level
    assert settings.log_level.lower() in LOG_LEVELS
    assert isinstance(logging.getLevelName(settings.log_level), int)


@pytest.mark.parametrize("bad", ["verbose", "trace", "5", ""])
def test_unknown_log_levels_are_refused(bad):
    with pytest.raises(ValidationError, match="log_level"):
        Settings(log_level=bad)


def test_unknown_loraplex_variables_are_found_and_the_projects_own_are_not():
    from gateway.settings import unknown_environment

    environ = {
        "LORAPLEX_MAX_LORA": "8",  # misspelt LORAPLEX_MAX_LORAS
        "loraplex_max_loras": "8",  # pydantic-settings matches names in any case
        "LORAPLEX_PORT": "8000",
        "LORAPLEX_URL": "http://gw:8000",
        "LORAPLEX_KEY": "lpx_x",
        "LORAPLEX_PAGED_ADMISSION": "1",
        "LORAPLEX_PAGED_DEMAND": "[]",
        "LORAPLEX_MODELS_DIR": "/srv/models",
        "LORAPLEX_HTTP_PORT": "8080",
        "LORAPLEX_TEST_POSTGRES_URL": "postgresql://x",
        "PATH": "/usr/bin",
    }
    assert unknown_environment(environ) == ["LORAPLEX_MAX_LORA"]


def _accepts(make) -> bool:
    try:
        make()
    except (ValidationError, InvalidThresholds):
        return False
    return True


@pytest.mark.parametrize("window", [1, 9, 10, 100, 100_000, 100_001])
def test_the_rollout_window_has_the_range_of_the_card_and_the_override(window):
    """A default window of 1 let a single slow request roll a canary back, while cards and
    admin overrides required 10..100000 requests (review)."""
    accepted = {
        "settings": _accepts(lambda: Settings(rollout_window=window)),
        "card": _accepts(lambda: RollbackTriggers(window_requests=window)),
        "override": _accepts(lambda: validate_threshold_override({"window": window})),
    }
    assert set(accepted.values()) == {10 <= window <= 100_000}, accepted


@pytest.mark.parametrize(("value", "expected"), [("", None), ("  ", None), ("0.8", 0.8)])
@pytest.mark.parametrize("setting", ["rollout_min_task_success", "rollout_min_tool_call_validity"])
def test_an_empty_outcome_minimum_turns_its_rule_off(monkeypatch, setting, value, expected):
    monkeypatch.setenv(f"LORAPLEX_{setting.upper()}", value)
    assert getattr(Settings(), setting) == expected


def test_structured_outputs_settings_reach_the_engine_with_one_backend():
    """No "auto": vLLM's engine core compiles every constraint with the backend of the first
    it saw, whatever backend its front end checked a later one with."""
    from gateway.engine.vllm_embedded import EmbeddedVLLM

    assert Settings().structured_outputs_backend == "xgrammar"
    for refused in ("auto", "outlines"):
        with pytest.raises(ValidationError, match="structured_outputs_backend"):
            Settings(structured_outputs_backend=refused)
    for backend, compact in (("xgrammar", False), ("xgrammar", True), ("guidance", True)):
        settings = Settings(
            structured_outputs_backend=backend, structured_outputs_compact_json=compact
        )
        config = EmbeddedVLLM(settings, "/nowhere", "m")._engine_args().structured_outputs_config
        assert (config.backend, config.disable_any_whitespace) == (backend, compact)


@pytest.mark.parametrize(("value", "expected"), [("", None), (" ", None), ("hermes", "hermes")])
def test_an_empty_tool_call_parser_leaves_auto_tool_choice_off(monkeypatch, value, expected):
    """The model compose file passes LORAPLEX_TOOL_CALL_PARSER through, empty by default."""
    monkeypatch.setenv("LORAPLEX_TOOL_CALL_PARSER", value)
    assert Settings().tool_call_parser == expected


@pytest.mark.parametrize(("value", "expected"), [("", None), (" ", None), ("qwen3", "qwen3")])
def test_an_empty_reasoning_parser_leaves_outputs_unsplit(monkeypatch, value, expected):
    """The model compose file passes LORAPLEX_REASONING_PARSER through, empty by default; the
    engine gets the same parser (a constraint starts after the reasoning), or none."""
    from gateway.engine.vllm_embedded import EmbeddedVLLM

    monkeypatch.setenv("LORAPLEX_REASONING_PARSER", value)
    settings = Settings()
    assert settings.reasoning_parser == expected
    config = EmbeddedVLLM(settings, "/nowhere", "m")._engine_args().structured_outputs_config
    assert config.reasoning_parser == (expected or "")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("  ", None),
        ("redis://:s3cret@redis:6379/2", "redis://:s3cret@redis:6379/2"),
        ("rediss://redis.internal", "rediss://redis.internal"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_the_limits_store_url_is_a_redis_url_or_unset(monkeypatch, value, expected):
    monkeypatch.setenv("LORAPLEX_LIMITS_REDIS_URL", value)
    url = Settings().limits_redis_url
    assert (url.get_secret_value() if url is not None else None) == expected
    assert "s3cret" not in repr(Settings())  # a password in the URL is never printed


@pytest.mark.parametrize(
    "bad", ["http://:s3cret@redis:6379", "redis://:s3cret@redis:port", "s3cret", "redis:s3cret"]
)
def test_a_limits_store_url_that_is_not_redis_is_refused_without_its_password(monkeypatch, bad):
    monkeypatch.setenv("LORAPLEX_LIMITS_REDIS_URL", bad)
    with pytest.raises(ValidationError, match="limits_redis_url") as refused:
        Settings()
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "{tenant}"])
def test_the_limits_key_prefix_is_a_plain_name(monkeypatch, bad):
    monkeypatch.setenv("LORAPLEX_LIMITS_REDIS_PREFIX", bad)
    with pytest.raises(ValidationError, match="limits_redis_prefix"):
        Settings()


def test_the_shipped_redis_password_is_refused_outside_demo_mode(monkeypatch):
    monkeypatch.setenv(
        "LORAPLEX_LIMITS_REDIS_URL", "redis://:change-me-redis@loraplex-redis:6379/0"
    )
    assert Settings(demo=True).limits_redis_url is not None
    with pytest.raises(ValidationError, match="placeholder password") as refused:
        Settings(demo=False)
    assert "change-me-redis" not in str(refused.value)
