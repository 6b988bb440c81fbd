"""How a serving process ends: draining on SIGTERM, and exiting when its engine has died.

Draining: an orchestrator sends SIGTERM and, at the same moment, starts taking the pod out of
its load balancers, which takes them a few seconds to notice. uvicorn on its own closes the
listener at once (new connections refused while a balancer still sends them) and cuts what is
in flight after a fixed 10 s. `DrainingServer` first keeps serving for `drain_s` with /readyz
answering 503 (the balancers stop sending), then shuts down with `shutdown_grace_s` for
in-flight requests and streams.

Start-up: uvicorn runs the lifespan's start-up to its end before it acts on a signal, and the
engine's start takes minutes for a large model on a GPU. `StartupGuard` lets SIGTERM or Ctrl-C
stop the engine's start instead: an orchestrator that scales down or rolls back a starting pod
waited for the whole load, then for its own kill timeout.

Engine death: vLLM's engine core does not come back once it died (killed, out of memory, a
fatal error): the gateway would answer 503 forever, and liveness probes would find the process
alive. `watch_engine` stops the server instead, and `serve` exits non-zero, so the orchestrator
(Kubernetes, compose's restart policy, systemd) starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import TypeVar

import uvicorn

from gateway.engine.client import EngineClient

logger = logging.getLogger(__name__)
STARTUP_FAILED_EXIT_CODE = 3  # uvicorn's own, when the lifespan's start-up failed
ENGINE_DIED_EXIT_CODE = 4
ENGINE_WATCH_INTERVAL_S = 1.0
T = TypeVar("T")


class StartupCancelled(RuntimeError):
    """A signal arrived while the engine was starting: the gateway stops instead of serving."""


class StartupGuard:
    """Runs the engine's start so that a signal (`request`, from the server's handler) stops it."""

    def __init__(self) -> None:
        self.requested = False
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request(self) -> None:
        """Stop the start now, or as soon as it begins. Safe in a signal handler: the loop
        is only woken through its self-pipe."""
        self.requested = True
        if self._loop is not None and self._event is not None:
            self._loop.call_soon_threadsafe(self._event.set)

    async def run(self, start: Awaitable[T]) -> T:
        """`start`'s result, or StartupCancelled once `request` was called; `start` is then
        cancelled and awaited, so it undoes what it began (EmbeddedVLLM.start does)."""
        self._event = stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self.requested:  # before the start, or between the two lines above
            stop.set()
        starting = asyncio.ensure_future(start)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this task was cancelled: so is the start
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            raise
        finally:
            stopping.cancel()
        if starting.done():
            return starting.result()
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        logger.warning("a signal arrived while the engine was starting: stopping, not serving")
        raise StartupCancelled("a signal arrived while the engine was starting")


class DrainingServer(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Callable[[], None],
        drain_s: float,
        startup: StartupGuard | None = None,
    ):
        super().__init__(config)
        self._drain = drain
        self._drain_s = drain_s
        self._drain_timer: threading.Timer | None = None
        self._startup = startup

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.started and self._startup is not None:
            self._startup.request()  # then uvicorn's own: the signal is raised again at exit
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

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's answer to a failed lifespan start-up (exit code 3)
            if self._startup is None or not self._startup.requested:
                raise
            # Stopped by the signal, not failed: uvicorn raises the signal again on its way
            # out, so the process ends the way that signal ends it.

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
