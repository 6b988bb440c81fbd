"""How loading an adapter into the engine can fail, as the gateway answers it; what the host
cache knows of a version's load (CacheEntry); and how a request sent with its adapter's load
still in flight learns that the load is why it was refused."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from gateway.errors import LoraplexError


class AdapterLoadFailed(LoraplexError):
    status_code = 500
    error_type = "server_error"
    code = "adapter_load_failed"


class AdapterCapacityFull(LoraplexError):
    """Every adapter the engine can hold is in use by running requests."""

    status_code = 503
    error_type = "service_unavailable"
    code = "adapter_capacity_full"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"}


@dataclass
class CacheEntry:
    """A version resident in (or on its way into) the engine, as HostAdapterCache counts it."""

    size_bytes: int
    pins: int = 0
    # The load in flight, for an engine that loads adapters on arrival: requests already sent
    # with it await it when the engine refuses them. None once it answered.
    load: asyncio.Task[None] | None = None
    # Its last load failed while requests held it: the engine holds nothing, the next request
    # loads it again, and it leaves the cache with its last pin (one entry per version, so a
    # request's release can never take a pin off a later load's requests).
    failed: bool = False
    # Its last load got no answer in time: the engine may hold it, or refuse its requests until
    # the next load, so the next request sends one.
    unsure: bool = False

    @property
    def in_use(self) -> bool:
        return self.pins > 0 or self.load is not None


async def load_failure(load: asyncio.Task[None] | None) -> LoraplexError | None:
    """Why a request sent with `load` (HostAdapterCache.acquire) was refused, if the load is
    why: its error (AdapterLoadFailed, or EngineUnavailable for a dead engine). The engine
    answers the load before it refuses the request (the load was sent first), so this waits
    at most for that answer to be read."""
    if load is None:
        return None
    await asyncio.wait({load})  # neither raises its error nor cancels it with the caller
    if load.cancelled():
        return None
    error = load.exception()
    return error if isinstance(error, LoraplexError) else None


def retrieve_quietly(task: asyncio.Task[None]) -> None:
    """Done callback of a load: one nobody awaited (its requests were served, or gone) was
    logged and counted where it failed, and must not log "exception never retrieved" too."""
    if not task.cancelled():
        task.exception()
