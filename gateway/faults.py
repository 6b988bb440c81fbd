"""Fault injection for tests and game days: delay or fail requests served by one adapter version.

Off unless LORAPLEX_ENABLE_FAULTS=1 (the admin routes are not even mounted otherwise). Faults
act where the engine would be called, after scope, limits and rollout resolution, so they hit
exactly the traffic a real slow or broken version would: its TTFT, latency and error windows,
and therefore the rollback monitor.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from gateway.errors import LoraplexError


class InjectedFault(LoraplexError):
    status_code = 500
    error_type = "server_error"
    code = "injected_fault"


@dataclass(frozen=True)
class Fault:
    latency_ms: float = 0.0
    error_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or not 0 <= self.error_rate <= 1:
            raise ValueError("latency_ms must be >= 0 and error_rate in [0, 1]")


class FaultInjector:
    def __init__(self, rng: random.Random | None = None):
        self._faults: dict[tuple[str, int], Fault] = {}
        self._rng = rng or random.Random()

    def set(self, adapter: str, version: int, fault: Fault) -> None:
        self._faults[adapter, version] = fault

    def clear(self, adapter: str | None = None, version: int | None = None) -> int:
        """Remove faults (all, one adapter's, or one version's); returns how many."""
        doomed = [
            key
            for key in self._faults
            if (adapter is None or key[0] == adapter) and (version is None or key[1] == version)
        ]
        for key in doomed:
            del self._faults[key]
        return len(doomed)

    def active(self) -> dict[tuple[str, int], Fault]:
        return dict(self._faults)

    async def apply(self, adapter: str, version: int | None) -> None:
        """Called just before the engine: sleep, then maybe fail."""
        if version is None or not self._faults:
            return
        fault = self._faults.get((adapter, version))
        if fault is None:
            return
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000)
        if fault.error_rate and self._rng.random() < fault.error_rate:
            raise InjectedFault(f"Injected fault on {adapter}@{version}.")
