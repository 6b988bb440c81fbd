from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.settings import Settings


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
    "bad", [{"max_lora_rank": 24}, {"port": 0}, {"max_loras": 0}, {"dtype": "int3"}]
)
def test_invalid_settings_are_refused(bad):
    with pytest.raises(ValidationError):
        Settings(**bad)
