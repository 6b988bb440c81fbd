"""A registry statement that gave up waiting on other transactions (PostgreSQL lock_timeout,
deadlock, statement_timeout; SQLite's busy timeout) is a 503 `registry_busy` with Retry-After:
the database answers and a retry may succeed. It was a 500 on PostgreSQL (found by review)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError

from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("registry-busy"))


class SQLiteBusy(Exception):
    sqlite_errorcode = 5  # SQLITE_BUSY


def lock_timeout() -> BaseException:
    return DBAPIError("UPDATE adapters", None, asyncpg.exceptions.LockNotAvailableError("lock"))


def deadlock() -> BaseException:
    return DBAPIError("UPDATE adapters", None, asyncpg.exceptions.DeadlockDetectedError("dl"))


def sqlite_busy() -> BaseException:
    return OperationalError("UPDATE adapters", None, SQLiteBusy("database is locked"))


class BusySessions:
    def __init__(self, error: BaseException):
        self._error = error

    def __call__(self) -> Any:
        raise self._error


@pytest.mark.parametrize("error", [lock_timeout, deadlock, sqlite_busy])
def test_a_statement_that_waited_out_its_lock_is_a_503_to_retry(demo_root, tmp_path, error):
    with client_for(demo_root, ScriptedEngine(["a"]), data_dir=tmp_path) as client:
        runtime = client.app.state.registry
        healthy = runtime.sessions
        runtime.sessions = BusySessions(error())
        try:
            response = client.get("/admin/v1/tenants", headers=ADMIN)
        finally:
            runtime.sessions = healthy
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "registry_busy"
    assert response.headers["Retry-After"] == "1"


class CountingBusy:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        raise sqlite_busy()


def test_a_busy_registry_is_asked_once_per_request_not_by_the_gate_and_the_route(
    demo_root, tmp_path, caplog
):
    """The gate took the busy timeout for an unexpected error and let the request through, so
    the route waited out the same lock again before the same 503 (found by review)."""
    settings = {"data_dir": tmp_path, "catalog_cache_ttl_s": 0.2, "rollout_poll_interval_s": 3600}
    with client_for(demo_root, ScriptedEngine(["a"]), **settings) as client:
        runtime = client.app.state.registry
        healthy = runtime.sessions
        time.sleep(0.3)  # the key's cached verification expired
        busy = runtime.sessions = CountingBusy()
        try:
            body = {"model": BASE, "prompt": "x", "max_tokens": 1}
            response = client.post("/v1/completions", json=body)
        finally:
            runtime.sessions = healthy
    assert response.status_code == 503 and response.json()["error"]["code"] == "registry_busy"
    assert busy.calls == 1
    assert not [r for r in caplog.records if "ahead of its route" in r.getMessage()]
