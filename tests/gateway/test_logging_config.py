"""Access-log lines never carry a whole API key, even one pasted where its id goes."""

from __future__ import annotations

import logging

from gateway.logging_config import RedactKeyPaths, redact_key_paths
from registry.tenancy import generate_api_key, key_id_for, parse_api_key


def test_a_whole_key_in_a_key_id_position_is_logged_as_its_id():
    key, key_id, _ = generate_api_key()
    parsed = parse_api_key(key)
    assert parsed is not None and parsed[0] == key_id
    assert redact_key_paths(f"/admin/v1/keys/{key}/revoke") == f"/admin/v1/keys/{key_id}/revoke"
    chosen = "operator-chosen-key-123456"
    assert chosen not in redact_key_paths(f"/admin/v1/keys/{chosen}/revoke")
    assert redact_key_paths(f"/admin/v1/keys/{key_id}/revoke") == f"/admin/v1/keys/{key_id}/revoke"
    assert redact_key_paths("/admin/v1/keys/%3Cjunk%3E/revoke") == (
        "/admin/v1/keys/<redacted>/revoke"
    )
    assert redact_key_paths("/v1/models") == "/v1/models"


def test_the_filter_rewrites_uvicorn_access_records():
    key = "operator-chosen-key-123456"
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", f"/admin/v1/keys/{key}/revoke", "1.1", 404),
        None,
    )
    assert RedactKeyPaths().filter(record)
    assert key not in record.getMessage() and "/admin/v1/keys/x" in record.getMessage()


def test_a_chosen_key_with_slashes_is_redacted_whole():
    """Chosen keys (LORAPLEX_IMPORT_API_KEY, LORAPLEX_DEMO_API_KEY) may hold "/": the key-id
    pattern stopped at the first one and logged `<redacted>/et/revoke`."""
    chosen = "S3cr/et/chosen-key+/=x"
    chosen_id = key_id_for(chosen)
    assert chosen_id is not None
    assert redact_key_paths(f"/admin/v1/keys/{chosen}/revoke") == (
        f"/admin/v1/keys/{chosen_id}/revoke"
    )
    assert redact_key_paths(f"/admin/v1/keys/{chosen}") == f"/admin/v1/keys/{chosen_id}"
    assert redact_key_paths(f"/admin/v1/keys/{chosen}/revoke?reason=a/b") == (
        f"/admin/v1/keys/{chosen_id}/revoke?reason=a/b"
    )
    assert redact_key_paths("/admin/v1/keys/S3cr/et/revoke") == "/admin/v1/keys/<redacted>/revoke"
    assert redact_key_paths("/admin/v1/keys/S3cr/et/x/revoke") == "/admin/v1/keys/<redacted>/revoke"
    assert redact_key_paths("/admin/v1/keys/S3cr/et") == "/admin/v1/keys/<redacted>"
