"""The registry probe of an outage stops with the gateway (found by review): nothing cancelled
it, so a probe waiting on a black-holed database at shutdown outlived the app ("Task was
destroyed but it is pending" at the loop's end), and a request during shutdown could start one
on the engine disposed a moment later. Against a port that accepts connections and never
answers: the probe waits in asyncpg's connect (5 s) as it does in a partition."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.catalog import RegistryCatalog
from gateway.registry_outage import RegistryOutage
from registry.db import CONNECT_TIMEOUT_S, make_engine, make_session_factory

REFUSED = OperationalError("SELECT 1", None, ConnectionRefusedError("refused"))


class BlackHole:
    """A TCP port that accepts connections and never answers on them."""

    def __init__(self) -> None:
        self.accepted = asyncio.Event()
        self.connections = 0
        self._held: list[asyncio.StreamWriter] = []

    async def swallow(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        self.connections += 1
        self.accepted.set()

    def close(self) -> None:
        for writer in self._held:
            writer.close()


@pytest.fixture
async def black_holed() -> AsyncIterator[tuple[AsyncEngine, BlackHole]]:
    """A registry engine whose database host is black-holed, and the hole."""
    hole = BlackHole()
    server = await asyncio.start_server(hole.swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    engine = make_engine(f"postgresql+asyncpg://loraplex@127.0.0.1:{port}/registry")
    try:
        yield engine, hole
    finally:
        await engine.dispose()
        server.close()
        hole.close()


async def probing(outage: RegistryOutage, hole: BlackHole) -> asyncio.Task[None]:
    """The outage's probe, started as a request holding a stale entry starts it, once it
    waits on the database."""
    outage.note_failure(REFUSED)
    outage._next_probe = 0.0  # the probe interval has passed
    assert outage.skip_registry(time.monotonic())
    probe = outage._probe
    assert probe is not None
    await hole.accepted.wait()
    return probe


async def test_closing_cancels_the_probe_in_flight_and_starts_no_more(black_holed):
    engine, hole = black_holed
    outage = RegistryOutage("api keys", 1.0, make_session_factory(engine))
    probe = await probing(outage, hole)
    await asyncio.wait_for(outage.close(), CONNECT_TIMEOUT_S / 2)  # not the connect's timeout
    assert probe.cancelled()
    # A request arriving during the rest of the shutdown is still answered from its entry,
    # but starts no probe on the engine about to be disposed.
    outage._next_probe = 0.0
    assert outage.skip_registry(time.monotonic())
    assert outage._probe is None and hole.connections == 1


async def test_closing_the_catalog_closes_its_outage(black_holed):
    engine, hole = black_holed
    runtime = SimpleNamespace(base_name="base", sessions=make_session_factory(engine))
    catalog = RegistryCatalog(runtime, cache_ttl_s=1.0)  # type: ignore[arg-type]
    probe = await probing(catalog._outage, hole)
    await asyncio.wait_for(catalog.close(), CONNECT_TIMEOUT_S / 2)
    assert probe.cancelled()


async def test_closing_the_catalog_cancels_scope_loads_their_callers_left(black_holed):
    """A caller that hung up leaves its scope load running (shielded, shared); a change
    (invalidate) forgets it as shared. Closing must still cancel it: it would otherwise wait on
    the database past the engine's disposal."""
    engine, hole = black_holed
    runtime = SimpleNamespace(
        base_name="base",
        sessions=make_session_factory(engine),
        store=None,
        base=SimpleNamespace(weights_sha256="00" * 32),
    )
    catalog = RegistryCatalog(runtime, cache_ttl_s=1.0)  # type: ignore[arg-type]
    caller = asyncio.ensure_future(catalog._scope("acme"))
    await asyncio.wait_for(hole.accepted.wait(), CONNECT_TIMEOUT_S / 2)
    [load] = catalog._running_loads
    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    catalog.invalidate()
    assert not load.done()
    await asyncio.wait_for(catalog.close(), CONNECT_TIMEOUT_S / 2)
    assert load.cancelled() and not catalog._running_loads
