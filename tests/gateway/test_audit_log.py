"""Audit lines hold what callers sent (a request path, an adapter name from the URL) before
anything validated it: no value may end the line, forge a field, or run on without bound."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import pytest

from gateway.audit_log import MAX_VALUE_CHARS, audit_event
from gateway.logging_config import JsonFormatter
from tests.gateway.fake_engine import ADMIN_TOKEN, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# Line ends for str.splitlines (and so for many log readers): \n, VT, NEL among them.
HOSTILE = "\n\x1b\x85\x0b\r\x0c\u2028"
FORGED = "x\nadmin.delete actor=admin result=ok\x1b[2J\x0bvt\x85nel"
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^ "]+)')


def fields_of(line: str) -> dict[str, str]:
    """The line's key=value fields, quoted values decoded: what a log reader recovers."""
    _, _, rest = line.partition(" ")
    parsed = {k: json.loads(v) if v.startswith('"') else v for k, v in _FIELD.findall(rest)}
    assert " ".join(f"{k}={v}" for k, v in _FIELD.findall(rest)) == rest, line
    return parsed


def audit_records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "audit", {}).get("event") == event]


def test_values_cannot_end_the_line_or_forge_a_field(caplog):
    values: dict[str, Any] = {
        "path": "/admin/v1/" + FORGED,
        "esc": "\x1b[31mred",
        "nel": "a\x85b",
        "vt": "a\x0bb",
        "spaced": "two words",
        "quoted": 'say "hi"',
        "plain": "acme",
        "version": 3,
    }
    with caplog.at_level(logging.INFO, logger="loraplex.audit"):
        audit_event("auth.failure", **values)
    (record,) = audit_records(caplog, "auth.failure")
    line = record.getMessage()
    assert line.splitlines() == [line] and not set(HOSTILE) & set(line)
    assert line.startswith("auth.failure ") and " plain=acme " in line and "version=3" in line
    assert fields_of(line) == {k: str(v) for k, v in values.items()}


def test_long_values_are_cut(caplog):
    with caplog.at_level(logging.INFO, logger="loraplex.audit"):
        audit_event("auth.failure", path="/" + "p" * 5000, client="127.0.0.1")
    (record,) = audit_records(caplog, "auth.failure")
    path = fields_of(record.getMessage())["path"]
    assert path == "/" + "p" * (MAX_VALUE_CHARS - 1) + "..."
    assert record.audit["path"] == path  # the JSON form is bounded too


def test_json_lines_hold_no_raw_line_break(caplog):
    with caplog.at_level(logging.INFO, logger="loraplex.audit"):
        audit_event("admin.retire", adapter=FORGED + "\u2028\u2029", actor="admin")
    (record,) = audit_records(caplog, "admin.retire")
    line = JsonFormatter().format(record)
    assert line.splitlines() == [line]
    assert json.loads(line)["audit"]["adapter"] == FORGED + "\u2028\u2029"


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return build_demo_root(tmp_path_factory.mktemp("audit-log"))


def test_through_the_app(demo_root, caplog):
    """An anonymous caller's path and an admin's unvalidated path parameter used to reach the
    audit log raw: a URL-encoded newline forged a line of its own."""
    with (
        client_for(demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "app") as client,
        caplog.at_level(logging.INFO, logger="loraplex.audit"),
    ):
        sneaky = "/admin/v1/adapters/%1B%5B2J%0Badmin.x%C2%85y%0Aadmin.delete%20result=ok"
        assert client.get(sneaky).status_code == 401
        name = "a%0Aadmin.retire%20actor=admin%20result=ok%0B%1B%C2%85"
        retired = client.post(f"/admin/v1/adapters/{name}/versions/1/retire", headers=ADMIN)
        assert retired.status_code in (404, 422), retired.text
    (failure,) = audit_records(caplog, "auth.failure")
    (retire,) = audit_records(caplog, "admin.retire")
    for record in (failure, retire):
        line = record.getMessage()
        assert line.splitlines() == [line] and not set(HOSTILE) & set(line), line
    # request.url drops \n (urlsplit does); the route's own parameters keep it.
    assert fields_of(failure.getMessage())["path"] == (
        "/admin/v1/adapters/\x1b[2J\x0badmin.x\x85yadmin.delete result=ok"
    )
    logged = fields_of(retire.getMessage())
    assert logged["adapter"] == "a\nadmin.retire actor=admin result=ok\x0b\x1b\x85"
    assert logged["result"] == "refused"


def test_a_key_pasted_into_an_anonymous_path_is_not_audited(demo_root, caplog):
    key = "an-operator-chosen-key-0123"
    with (
        client_for(demo_root, ScriptedEngine(["a"]), data_dir=demo_root / "key") as client,
        caplog.at_level(logging.INFO, logger="loraplex.audit"),
    ):
        assert client.post(f"/admin/v1/keys/{key}/revoke").status_code == 401
    (failure,) = audit_records(caplog, "auth.failure")
    assert key not in failure.getMessage() and key not in json.dumps(failure.audit)
    assert failure.audit["path"].startswith("/admin/v1/keys/x")
