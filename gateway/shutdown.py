"""How a serving process ends: draining on SIGTERM, and exiting when its engine has died.

Draining: an orchestrator sends SIGTERM and, at the same moment, starts taking the pod out of
its load balancers, which takes them a few seconds to notice. uvicorn on its own closes the
listener at once (new connections refused while a balancer still sends them) and cuts what is
in flight after a fixed 10 s. `DrainingServer` first keeps serving for `drain_s` with /readyz
answering 503 (the balancers stop sending), then shuts down with `shutdown_grace_s` for
in-flight requests and streams.

Engine death: vLLM's engine core does not come back once it died (killed, out of memory, a
fatal error): the gateway would answer 503 forever, and liveness probes would find the process
alive. `watch_engine` stops the server instead, and `serve` exits non-zero, so the orchestrator
(Kubernetes, compose's restart policy, systemd) starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn

from gateway.engine.client import EngineClient

logger = logging.getLogger(__name__)
STARTUP_FAILED_EXIT_CODE = 3  # uvicorn's own, when the lifespan's start-up failed
ENGINE_DIED_EXIT_CODE = 4
ENGINE_WATCH_INTERVAL_S = 1.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None], drain_s: float):
        super().__init__(config)
        self._drain = drain
        self._drain_s = drain_s
        self._drain_timer: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started and self._drain_timer is None:
            # Recorded as uvicorn records it: after the shutdown it raises the signal again,
            # so the process still ends the way a SIGTERM ends it.
            self._captured_signals.append(sig)
            logger.info("SIGTERM: /readyz is 503 for %.0f s, then shutting down", self._drain_s)
            self.drain_then_stop()
            return
        if self._drain_timer is not None:  # a second signal: no more waiting
            self._drain_timer.cancel()
        super().handle_exit(sig, frame)

    def drain_then_stop(self) -> None:
        """Unready at once, stop after `drain_s` (on SIGTERM, or when the engine died)."""
        if self._drain_timer is not None:
            return
        self._drain()
        self._drain_timer = threading.Timer(self._drain_s, self._stop)
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def _stop(self) -> None:
        self.should_exit = True


async def watch_engine(
    engine: EngineClient,
    on_death: Callable[[], None],
    interval_s: float | None = None,
) -> None:
    """Call `on_death` once when the engine reports that it died for good (`EngineHealth.dead`;
    an engine merely slow to answer a probe is not dead)."""
    while True:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S if interval_s is None else interval_s)
        health = await engine.health()
        if health.dead:
            logger.critical("the inference engine died (%s): stopping this gateway", health.detail)
            on_death()
            return
