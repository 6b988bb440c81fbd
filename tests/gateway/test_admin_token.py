"""Admin and metrics tokens: an empty or blank one is no token (the admin API stays disabled), a
short one is refused at start, and a bare `Authorization: Bearer` never matches anything."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from starlette.requests import Request

from gateway.admin_auth import _bearer_matches
from gateway.app import create_app
from gateway.settings import MIN_TOKEN_CHARS, Settings
from tests.gateway.fake_engine import ScriptedEngine

BARE = ({"Authorization": "Bearer"}, {"Authorization": "Bearer "}, {"Authorization": "Bearer \t"})


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    from gateway.demo import build_base

    root = tmp_path_factory.mktemp("admin-token")
    build_base(root / "base")
    return root


@pytest.mark.parametrize("blank", ["", "   ", "\n"])
def test_blank_tokens_from_the_environment_are_unset(monkeypatch, blank):
    names = ("ADMIN_TOKEN", "METRICS_TOKEN", "FEEDBACK_SECRET", "DEMO_API_KEY", "IMPORT_API_KEY")
    for name in names:
        monkeypatch.setenv(f"LORAPLEX_{name}", blank)
    settings = Settings()
    assert settings.admin_token is None and settings.metrics_token is None
    assert settings.feedback_secret is None
    assert settings.demo_api_key is None and settings.import_api_key is None


def test_short_tokens_are_refused_and_long_ones_kept_without_surrounding_space():
    for field in ("admin_token", "metrics_token", "feedback_secret"):
        with pytest.raises(ValidationError, match=f"at least {MIN_TOKEN_CHARS} characters"):
            Settings(**{field: "x" * (MIN_TOKEN_CHARS - 1)})
    settings = Settings(admin_token="  a-long-enough-admin-token\n")
    assert settings.admin_token is not None
    assert settings.admin_token.get_secret_value() == "a-long-enough-admin-token"


def _request(authorization: str) -> Request:
    headers = [(b"authorization", authorization.encode())]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": headers})


def test_a_bare_bearer_matches_no_token_not_even_an_empty_one():
    for header in BARE:
        request = _request(header["Authorization"])
        assert not _bearer_matches(request, SecretStr(""))
        assert not _bearer_matches(request, SecretStr("a-long-enough-admin-token"))
    assert _bearer_matches(_request("Bearer  tok "), SecretStr("tok"))


def test_an_empty_admin_token_leaves_the_admin_api_disabled(demo_root, monkeypatch, caplog):
    """`LORAPLEX_ADMIN_TOKEN=` (an empty Secret value) opened the admin API to a bare
    `Authorization: Bearer`; it now means what unset means, start-up warning included."""
    monkeypatch.setenv("LORAPLEX_ADMIN_TOKEN", "")
    monkeypatch.setenv("LORAPLEX_METRICS_TOKEN", "")
    settings = Settings(
        base_model=demo_root / "base", adapter_dir=None, data_dir=demo_root / "empty-tokens"
    )
    with TestClient(create_app(settings, engine=ScriptedEngine(["a"]))) as client:
        for headers in ({}, *BARE):
            response = client.post("/admin/v1/tenants", json={"name": "evil"}, headers=headers)
            assert response.status_code == 403, (headers, response.text)
            assert response.json()["error"]["code"] == "admin_api_disabled"
    assert "neither LORAPLEX_METRICS_TOKEN nor LORAPLEX_ADMIN_TOKEN is set" in caplog.text


def test_with_tokens_set_a_bare_bearer_is_refused(demo_root):
    settings = Settings(
        base_model=demo_root / "base",
        adapter_dir=None,
        data_dir=demo_root / "set-tokens",
        admin_token="an-admin-token-for-tests",
        metrics_token="a-metrics-token-for-tests",
    )
    with TestClient(create_app(settings, engine=ScriptedEngine(["a"]))) as client:
        for headers in BARE:
            assert client.get("/admin/v1/tenants", headers=headers).status_code == 401
            assert client.get("/metrics", headers=headers).status_code == 401


def test_a_refused_token_is_not_echoed_in_the_error():
    with pytest.raises(ValidationError) as refused:
        Settings(admin_token="short-secret")
    assert "short-secret" not in str(refused.value)


PLACEHOLDERS = {
    "admin_token": "change-me-admin-token",
    "metrics_token": "change-me-metrics-token",
    "feedback_secret": "change-me-feedback-secret",
}


@pytest.mark.parametrize("field", sorted(PLACEHOLDERS))
def test_the_shipped_placeholder_tokens_are_refused_outside_demo_mode(monkeypatch, field):
    """deploy/k8s/secret.yaml and deploy/compose ship these: anyone who read the repository
    held the admin token of a gateway deployed as shipped with LORAPLEX_DEMO=false."""
    monkeypatch.delenv("LORAPLEX_DEMO", raising=False)
    monkeypatch.setenv(f"LORAPLEX_{field.upper()}", PLACEHOLDERS[field])
    with pytest.raises(ValidationError, match="set a real secret") as refused:
        Settings()
    assert PLACEHOLDERS[field] not in str(refused.value)
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(**{field: "change-me-and-something-longer"})
    monkeypatch.setenv("LORAPLEX_DEMO", "true")
    demo = Settings()
    token = getattr(demo, field)
    assert token is not None and token.get_secret_value() == PLACEHOLDERS[field]


@pytest.mark.parametrize(
    "token",
    [
        "ünicode-admin-token-00",  # Starlette reads the header as latin-1: it never matches
        "admin-token-with-€-sign",
        "an admin token with spaces",
        "admin-token\x0bwith-a-control",
        "admin-token-with-del\x7f-00",
    ],
)
def test_tokens_outside_visible_ascii_are_refused(token):
    for field in ("admin_token", "metrics_token", "feedback_secret"):
        with pytest.raises(ValidationError, match="visible ASCII") as refused:
            Settings(**{field: token})
        assert token not in str(refused.value)
