"""The operator's mistakes at the command line end with exit status 2 and a message naming the
mistake, never a traceback: invalid settings, unreadable cards, inf/nan numbers, unwritable
demo folders. Nothing here reaches a gateway (LORAPLEX_URL points nowhere)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gateway.logging_config
from gateway.cli import app
from gateway.shutdown import DrainingServer

NOWHERE = "http://127.0.0.1:9"  # discard port: a call that got through would fail to connect


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    for name in ("LORAPLEX_PORT", "LORAPLEX_MAX_LORA_RANK", "LORAPLEX_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORAPLEX_URL", NOWHERE)
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", "an-admin-token-for-tests")
    return CliRunner()


@pytest.fixture
def served(monkeypatch) -> dict:
    """The uvicorn configuration, once `serve` got that far (nothing starts); the log setup
    stays the test's (caplog's handler on the root logger)."""
    captured: dict = {}

    def run(server: DrainingServer) -> None:
        captured.update(vars(server.config))
        server.started = True

    monkeypatch.setattr(DrainingServer, "run", run)
    monkeypatch.setattr(gateway.logging_config, "configure_logging", lambda *a: None)
    return captured


def assert_usage_error(result, *expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--port", "70000"], {}, "port (LORAPLEX_PORT): Input should be less than or equal"),
        ([], {"LORAPLEX_MAX_LORA_RANK": "48"}, "max_lora_rank (LORAPLEX_MAX_LORA_RANK)"),
        ([], {"LORAPLEX_LOG_LEVEL": "verbose"}, "log_level must be one of"),
        ([], {"LORAPLEX_LOG_LEVEL": "trace"}, "log_level must be one of"),
        ([], {"LORAPLEX_ADMIN_TOKEN": "short-secret"}, "at least 16 characters"),
        ([], {"LORAPLEX_DEMO": "true", "LORAPLEX_ADAPTER_DIR": "/models/adapters"}, "DEMO"),
    ],
)
def test_invalid_settings_exit_2_naming_each(runner, served, monkeypatch, args, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = runner.invoke(app, ["serve", *args])
    assert_usage_error(result, "invalid setting", expected)
    assert "short-secret" not in result.output  # a refused token is not echoed
    assert not served


def test_warn_serves_at_warning_level(runner, served, monkeypatch):
    monkeypatch.setenv("LORAPLEX_LOG_LEVEL", "warn")
    assert runner.invoke(app, ["serve"]).exit_code == 0
    assert served["log_level"] == "warning"


def test_unknown_loraplex_variables_are_warned_about(runner, served, monkeypatch, caplog):
    monkeypatch.setenv("LORAPLEX_MAX_LORA", "8")
    with caplog.at_level(logging.WARNING, logger="gateway.cli"):
        assert runner.invoke(app, ["serve"]).exit_code == 0
    assert "LORAPLEX_MAX_LORA is not a loraplex setting and is ignored" in caplog.text
    assert "did you mean LORAPLEX_MAX_LORAS?" in caplog.text
    assert "LORAPLEX_URL" not in caplog.text  # the CLI's own variable


@pytest.mark.parametrize(
    "args",
    [
        ["tenants", "limits", "acme", "--rps", "inf"],
        ["tenants", "create", "acme", "--rps", "nan"],
        ["faults", "set", "bot@1", "--latency-ms", "inf"],
        ["faults", "set", "bot@1", "--error-rate", "nan"],
        ["rollout", "thresholds", "bot", "--max-error-rate", "nan"],
        ["rollout", "thresholds", "bot", "--max-p95-e2e-ms", "-inf"],
        ["keys", "create", "--tenant", "acme", "--expires-in-days", "nan"],
    ],
)
def test_non_finite_numbers_are_usage_errors(runner, args):
    assert_usage_error(runner.invoke(app, args), "is not a finite number")


@pytest.mark.parametrize("source", ["folder", "s3://bucket/adapter"])
@pytest.mark.parametrize("card", ["missing.json", "a-folder", "not-utf8.json"])
def test_an_unreadable_card_is_a_usage_error(runner, tmp_path, monkeypatch, source, card):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "not-utf8.json").write_bytes(b"\xff\xfe{")
    args = ["adapters", "register", source, "--name", "bot", "--tenant", "acme", "--card", card]
    result = runner.invoke(app, args)
    assert_usage_error(result, f"cannot read the card {card}")
    assert "cannot reach the gateway" not in result.output


def test_demo_init_into_an_unwritable_place_is_a_usage_error(runner):
    result = runner.invoke(app, ["demo", "init", str(Path("/dev/null/demo"))])
    assert_usage_error(result, "cannot write the demo under /dev/null/demo")


@pytest.mark.parametrize("pasted", ["not a key", "lpx_short", "lpx_x_\n", "a" * 13])
def test_revoking_something_that_is_neither_a_key_id_nor_a_key_sends_nothing(runner, pasted):
    # It may be a secret: sent, it would sit in the URL path the server logs (review).
    result = runner.invoke(app, ["keys", "revoke", pasted])
    assert_usage_error(result, "not a key id")
    assert "cannot reach the gateway" not in result.output


def test_a_pasted_key_with_blanks_or_quotes_is_revoked_by_its_id():
    from gateway.cli_admin import key_id_of
    from registry.tenancy import generate_api_key

    key, key_id, _ = generate_api_key()
    for pasted in (f" {key}", f"{key}\n", f"'{key}'", f'"{key}"', key_id):
        assert key_id_of(pasted) == key_id
