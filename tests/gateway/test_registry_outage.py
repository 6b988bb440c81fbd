"""The registry's database goes away under a running gateway (failover, partition, restart).

Keys and model names verified before keep being served past the cache lifetime, up to a bound
(stale-if-error); what the caches cannot answer gets 503 `registry_unavailable` with
Retry-After in OpenAI's error shape, never a 500; and the gateway recovers when the database
is back. Through a TCP proxy in front of the real PostgreSQL that is stopped and restarted, as a
failover looks from the gateway; on SQLite, by a session factory that fails.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import make_url
from sqlalchemy.exc import OperationalError

from gateway.registry_outage import STALE_FACTOR
from tests.e2e.conftest import postgres_database  # noqa: F401 - a fixture
from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, register

TTL_S = 0.5
# No change poll during the test: its first success after the outage drops the caches anyway,
# and one landing between warming them and stopping the proxy would empty them early.
NO_POLL = {"rollout_poll_interval_s": 3600.0}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("outage"))


class Proxy:
    """A TCP proxy to PostgreSQL on its own event loop: `stop()` closes the listener and every
    connection through it (the database is gone), `start()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]):
        self._target = target
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.start()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def start(self) -> None:
        async def listen() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

        self._call(listen())

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for writer in self._writers:
                writer.close()
            self._writers.clear()
            await self._server.wait_closed()

        self._call(close())

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
def proxied_url(postgres_database: str) -> Iterator[tuple[str, Proxy]]:  # noqa: F811
    url = make_url(postgres_database)
    proxy = Proxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(False), proxy
    finally:
        proxy.close()


def complete(client: Any, model: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    return client.post("/v1/completions", json=body, headers=headers)


def assert_registry_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("service_unavailable", "registry_unavailable")
    assert "request id" in error["message"]


def issue_key(client: Any) -> tuple[str, str]:
    """A new key of the client's tenant, and its id."""
    issued = client.post(f"/admin/v1/tenants/{client.tenant}/keys", headers=ADMIN)
    assert issued.status_code == 201, issued.text
    return issued.json()["key"], issued.json()["key_id"]


@pytest.mark.postgres
def test_cached_keys_and_names_are_served_through_a_postgres_outage(
    demo_root, proxied_url, tmp_path
):
    url, proxy = proxied_url
    engine = ScriptedEngine(["a"])
    settings = {"database_url": url, "data_dir": tmp_path / "data", "catalog_cache_ttl_s": TTL_S}
    with client_for(demo_root, engine, **settings, **NO_POLL) as client:
        name = f"x{client.tenant}"
        register(client, demo_root, name, "v1")
        never_used, _ = issue_key(client)
        revoked, revoked_id = issue_key(client)
        assert complete(client, BASE, revoked).status_code == 200  # verified and cached ...
        assert client.post(f"/admin/v1/keys/{revoked_id}/revoke", headers=ADMIN).is_success
        assert complete(client, BASE, revoked).status_code == 401  # ... and dropped at once
        for model in (name, f"{name}@1", BASE):
            assert complete(client, model).status_code == 200
        warmed = time.monotonic()

        proxy.stop()
        time.sleep(2 * TTL_S)  # every cached entry's lifetime ends
        for model in (name, f"{name}@1", BASE):
            assert complete(client, model).status_code == 200, model
        # What no cache holds: the registry cannot be asked, and says so.
        assert_registry_unavailable(complete(client, BASE, never_used))
        assert_registry_unavailable(complete(client, BASE, revoked))  # not served from before
        assert_registry_unavailable(complete(client, f"{name}@2"))
        assert_registry_unavailable(client.get("/v1/models"))
        assert_registry_unavailable(client.get("/admin/v1/keys", headers=ADMIN))

        # Stale entries have a bound: past it, the cached key is no longer trusted either.
        time.sleep(max(0.0, warmed + (STALE_FACTOR + 1) * TTL_S + 0.2 - time.monotonic()))
        assert_registry_unavailable(complete(client, BASE))

        proxy.start()  # the database is back: everything is asked of it again
        assert complete(client, name).status_code == 200
        assert complete(client, BASE, never_used).status_code == 200
        assert complete(client, BASE, revoked).status_code == 401


class FailingSessions:
    """The registry's session factory, failing as an unreachable database does while `down`."""

    def __init__(self, sessions: Any):
        self._sessions = sessions
        self.down = False

    def __call__(self) -> Any:
        if self.down:
            raise OperationalError("SELECT 1", None, ConnectionRefusedError("refused"))
        return self._sessions()


def test_registry_errors_on_sqlite_serve_from_cache_or_answer_503(demo_root, tmp_path):
    with client_for(
        demo_root,
        ScriptedEngine(["a"]),
        data_dir=tmp_path / "data",
        catalog_cache_ttl_s=TTL_S,
        **NO_POLL,
    ) as client:
        name = f"x{client.tenant}"
        register(client, demo_root, name, "v1")
        never_used, _ = issue_key(client)
        assert complete(client, name).status_code == 200
        runtime = client.app.state.registry
        failing = FailingSessions(runtime.sessions)
        runtime.sessions = failing
        failing.down = True
        time.sleep(2 * TTL_S)
        assert complete(client, name).status_code == 200
        assert complete(client, BASE).status_code == 200
        assert_registry_unavailable(complete(client, BASE, never_used))
        assert_registry_unavailable(client.get("/v1/models"))
        failing.down = False
        assert complete(client, BASE, never_used).status_code == 200


async def test_a_probe_that_fails_on_something_else_still_waits_its_turn():
    """A probe refused with an error that is no outage left the next-probe time alone, so
    every request holding a usable entry started another connection attempt (1000 in 1 s)."""
    import logging

    from sqlalchemy.exc import DBAPIError, OperationalError

    from gateway.registry_outage import RegistryOutage

    attempts = 0

    class Refusing:
        async def __aenter__(self) -> None:
            nonlocal attempts
            attempts += 1
            raise DBAPIError("SELECT 1", None, Exception("some other refusal"))

        async def __aexit__(self, *exc: object) -> bool:
            return False

    outage = RegistryOutage("api keys", 30.0, lambda: Refusing())  # type: ignore[arg-type,return-value]
    outage.note_failure(OperationalError("x", None, ConnectionRefusedError()))
    outage._next_probe = 0.0  # the probe interval has passed
    logging.disable(logging.ERROR)
    try:
        for _ in range(200):
            assert outage.skip_registry(time.monotonic())
            await asyncio.sleep(0.001)
    finally:
        logging.disable(logging.NOTSET)
    assert attempts == 1


def test_a_server_out_of_connection_slots_is_an_outage():
    import asyncpg

    from registry.db import is_unreachable

    assert is_unreachable(asyncpg.TooManyConnectionsError("too many connections for role"))


async def test_a_locked_sqlite_database_is_no_outage(tmp_path):
    """A write that waited out busy_timeout behind another writer: the registry answers, so
    the caches stay fresh. It counted as an outage: after one busy writer, every cache answered
    from expired entries without asking the registry until a probe passed."""
    from gateway.registry_outage import RegistryOutage
    from tests.registry.test_db_contention import sqlite_busy_error

    outage = RegistryOutage("api keys", 30.0, None)  # type: ignore[arg-type]
    assert not outage.note_failure(await sqlite_busy_error(tmp_path))
    assert not outage.skip_registry(time.monotonic())
    assert outage.note_failure(OperationalError("SELECT 1", None, ConnectionRefusedError()))
    assert outage.skip_registry(time.monotonic())
