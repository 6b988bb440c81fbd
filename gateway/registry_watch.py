"""Tells this replica's caches when the registry changed, wherever the change was made.

Name resolutions and verified keys are cached in each replica (RegistryCatalog,
KeyAuthenticator) so that the request path makes no database round trip. Every admin write in
the registry adds an audit row in its own transaction, so the newest audit id
(`service.change_generation`, two index reads) moves with any change: each replica polls it
every `poll_interval_s` and drops its caches when it moved. A retirement, revocation, share or
new version made through any replica therefore applies on all of them within one poll, and
between changes the caches hold for their whole TTL (a safety bound, not the freshness
mechanism). Callbacks may be coroutines (e.g. unloading versions another replica retired); one
that fails is run again at the next poll, the others are not.

The cost this removes: with only a 1 s TTL every active adapter name was resolved again each
second (two ORM queries, ~5 ms of the gateway's CPU each), which on a 2-core host ran beside
the engine: SQLAlchemy was about a third of the gateway's samples under the residency
benchmark's load.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence

from gateway.registry_runtime import RegistryRuntime
from registry import service

logger = logging.getLogger(__name__)


class RegistryWatch:
    def __init__(
        self,
        runtime: RegistryRuntime,
        on_change: Sequence[Callable[[], Awaitable[None] | None]],
        *,
        poll_interval_s: float = 0.5,
    ):
        self._runtime = runtime
        self._on_change = tuple(on_change)
        self._interval = poll_interval_s
        self._generation: tuple[int, int] | None = None
        self._missed = False  # a poll failed: whatever changed meanwhile was not seen
        self._failed: set[int] = set()  # callbacks that failed: run again at the next poll

    async def check(self) -> bool:
        """Read the change generation; True (and the caches dropped) when it moved since the
        last check, or when the check before this one failed. The first check only records."""
        try:
            async with self._runtime.sessions() as session:
                generation = await service.change_generation(session)
        except Exception:
            self._missed = True
            raise
        moved = self._missed or (self._generation is not None and generation != self._generation)
        self._generation, self._missed = generation, False
        # A change runs every callback; a poll without one retries only those that failed
        # (dropping every cache each poll because one callback keeps failing would cost the
        # request path its caches, and a failure must not keep the later callbacks from running).
        due = range(len(self._on_change)) if moved else sorted(self._failed)
        self._failed = set()
        first: Exception | None = None
        for index in due:
            try:
                result = self._on_change[index]()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                self._failed.add(index)
                first = first or exc
        if first is not None:
            raise RuntimeError(f"{len(self._failed)} registry change callback(s) failed") from first
        return moved

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and retried on the next tick. The
        caches keep serving meanwhile (the registry is what is unreachable) and are dropped
        by the first poll that succeeds again."""
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("registry change poll failed; retrying", exc_info=True)
            await asyncio.sleep(self._interval)
