"""Serving through a registry outage: the caches of verified keys and model names keep answering
from expired entries while the database cannot be reached (stale-if-error), for a bounded time.

Without it, every request failed once the cache lifetime ended, base-model requests from keys
verified a second earlier included. An expired entry is used only when asking the registry
failed for connectivity (registry.db.is_unreachable), never for contention (a lock held too
long: registry.db.is_contention); a revocation or retirement still drops it at the first
successful change poll (the caches' invalidate), exactly as before.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from registry.db import is_contention, is_unreachable

logger = logging.getLogger(__name__)
# How long past its lifetime an entry may answer for the registry: 10 lifetimes, at most 10 min.
STALE_FACTOR = 10
MAX_STALE_S = 600.0
# While the registry is down, whether it is back is checked this often, in the background: with
# the host black-holed one attempt costs the connect or statement timeout (5-15 s), which every
# request holding a usable entry would otherwise wait out before being answered from it.
PROBE_INTERVAL_S = 2.0


class RegistryOutage:
    """One cache's view of whether the registry answers, and how stale an entry may be used."""

    def __init__(self, what: str, ttl_s: float, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._what = what  # for the log: "api keys", "model names"
        self._sessions = sessions
        self.stale_s = min(STALE_FACTOR * ttl_s, MAX_STALE_S)
        self._down_since: float | None = None
        self._next_probe = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    def usable(self, expires_at: float, now: float) -> bool:
        """Whether an entry that expired at `expires_at` may answer while the registry is down."""
        return now < expires_at + self.stale_s

    def skip_registry(self, now: float) -> bool:
        """True while the registry is known down: a caller holding a usable entry answers from
        it at once, and a background probe finds out when the registry is back."""
        if self._down_since is None:
            return False
        if self._probe is None and now >= self._next_probe and not self._closed:
            self._probe = asyncio.ensure_future(self._check())
        return True

    async def close(self) -> None:
        """Cancel the probe in flight and start no more (at shutdown): one left pending was
        destroyed with the event loop, or connected through the engine disposed after this."""
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)

    def note_failure(self, exc: BaseException) -> bool:
        """Whether a failed registry read failed for connectivity (and is recorded so); False
        for any other error, which the caller re-raises."""
        if not is_unreachable(exc) or is_contention(exc):
            # A lock held too long (one slow admin write, a busy SQLite writer) is no outage:
            # as one, every cache answered from expired entries, unasked, until a probe passed.
            return False
        now = time.monotonic()
        self._next_probe = now + PROBE_INTERVAL_S
        if self._down_since is None:
            self._down_since = now
            logger.warning(
                "registry unreachable: serving cached %s up to %.0f s past their lifetime (%r)",
                self._what,
                self.stale_s,
                getattr(exc, "orig", None) or type(exc).__name__,
            )
        return True

    def answered(self) -> None:
        if self._down_since is not None:
            logger.warning(
                "registry reachable again after %.0f s: %s are read from it again",
                time.monotonic() - self._down_since,
                self._what,
            )
        self._down_since = None

    async def _check(self) -> None:
        try:
            async with self._sessions() as session:
                await session.execute(text("SELECT 1"))
        except Exception as exc:
            if not self.note_failure(exc):
                logger.exception("registry probe failed")
        else:
            self.answered()
        finally:
            self._probe = None
            # Whatever failed, the next probe waits its turn: an error that is no outage
            # started one probe per request against a server already in trouble.
            self._next_probe = time.monotonic() + PROBE_INTERVAL_S
