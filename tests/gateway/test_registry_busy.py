"""A registry statement that gave up waiting on other transactions (PostgreSQL lock_timeout,
deadlock, statement_timeout; SQLite's busy timeout) is a 503 `registry_busy` with Retry-After:
the database answers and a retry may succeed. It was a 500 on PostgreSQL (found by review)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.exc import DBAPIError, OperationalError

from tests.gateway.fake_engine import ScriptedEngine, client_for
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
