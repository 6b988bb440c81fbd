"""How a serving process ends: SIGTERM drains (readiness first, then the server stops), and an
engine that died for good stops the server so that the orchestrator starts a fresh one."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.engine.client import EngineHealth
from gateway.settings import Settings
from gateway.shutdown import DrainingServer, StartupCancelled, StartupGuard, watch_engine
from tests.gateway.fake_engine import ADMIN_TOKEN, BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root


async def _no_app(scope, receive, send) -> None:  # pragma: no cover - never called
    raise AssertionError


def draining_server(drain_s: float) -> tuple[DrainingServer, list[str]]:
    drained: list[str] = []
    server = DrainingServer(
        uvicorn.Config(_no_app), drain=lambda: drained.append("drain"), drain_s=drain_s
    )
    server.started = True
    return server, drained


def test_sigterm_first_drains_then_stops():
    server, drained = draining_server(0.2)
    server.handle_exit(signal.SIGTERM, None)
    assert drained == ["drain"] and not server.should_exit  # still serving, unready
    time.sleep(0.4)
    assert server.should_exit
    assert server._captured_signals == [signal.SIGTERM]  # raised again after the shutdown


def test_a_second_signal_during_the_drain_stops_at_once():
    server, drained = draining_server(30)
    server.handle_exit(signal.SIGTERM, None)
    server.handle_exit(signal.SIGINT, None)
    assert drained == ["drain"] and server.should_exit


def test_the_engines_death_drains_then_stops_without_a_signal_to_raise_again():
    server, drained = draining_server(0.1)
    server.drain_then_stop()
    server.drain_then_stop()  # once
    assert drained == ["drain"] and not server.should_exit
    time.sleep(0.3)
    assert server.should_exit and server._captured_signals == []  # serve exits with its code


def test_sigint_or_a_signal_before_start_up_stops_at_once():
    server, drained = draining_server(30)
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and drained == []
    server, drained = draining_server(30)
    server.started = False
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and drained == []


def test_readyz_is_503_while_draining(tmp_path):
    root = build_demo_root(tmp_path)
    with client_for(root, ScriptedEngine(["a"])) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.draining = True
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "draining"}
        assert client.get("/healthz").status_code == 200


class Dying(ScriptedEngine):
    def __init__(self, answers: list[EngineHealth]):
        super().__init__(["a"])
        self.answers = answers

    async def health(self) -> EngineHealth:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


SLOW = EngineHealth(alive=False, detail={"reason": "not answering"})
DEAD = EngineHealth(alive=False, detail={"reason": "engine stopped"}, dead=True)
ALIVE = EngineHealth(alive=True)


async def test_only_an_engine_dead_for_good_stops_the_gateway():
    deaths: list[str] = []
    slow = Dying([ALIVE, SLOW, SLOW, ALIVE])
    watching = asyncio.create_task(watch_engine(slow, lambda: deaths.append("x"), 0.01))
    await asyncio.sleep(0.1)
    assert deaths == [] and not watching.done()  # a probe that timed out is not a death
    watching.cancel()
    dying = Dying([ALIVE, SLOW, DEAD])
    await asyncio.wait_for(watch_engine(dying, lambda: deaths.append("x"), 0.01), 1)
    assert deaths == ["x"]


def test_the_app_reports_its_engines_death_once(tmp_path, monkeypatch):
    monkeypatch.setattr("gateway.shutdown.ENGINE_WATCH_INTERVAL_S", 0.01)
    root = build_demo_root(tmp_path)
    settings = Settings(
        base_model=root / "base",
        served_model_name=BASE,
        data_dir=root / "data",
        admin_token=ADMIN_TOKEN,
    )
    deaths: list[object] = []
    engine = Dying([ALIVE, ALIVE, DEAD])
    app = create_app(settings, engine=engine, on_engine_death=deaths.append)
    with TestClient(app):
        deadline = time.monotonic() + 5
        while not deaths and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    assert deaths == [app]


class SlowStart(ScriptedEngine):
    """An engine whose start runs until cancelled (a large model loading)."""

    def __init__(self) -> None:
        super().__init__(["a"])
        self.starting = asyncio.Event()
        self.start_cancelled = False
        self.stopped = False

    async def start(self) -> None:
        self.starting.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.start_cancelled = True
            raise

    async def stop(self) -> None:
        self.stopped = True


def _settings(root) -> Settings:
    return Settings(
        base_model=root / "base",
        served_model_name=BASE,
        data_dir=root / "data",
        admin_token=ADMIN_TOKEN,
    )


async def test_a_signal_during_the_engines_start_stops_it(tmp_path):
    engine, guard = SlowStart(), StartupGuard()
    app = create_app(_settings(build_demo_root(tmp_path)), engine=engine, startup=guard)

    async def signal_once_starting() -> None:
        await engine.starting.wait()
        guard.request()

    signalling = asyncio.create_task(signal_once_starting())
    began = time.monotonic()
    with pytest.raises(StartupCancelled):
        async with app.router.lifespan_context(app):
            raise AssertionError("served after the signal")
    await signalling
    assert time.monotonic() - began < 30
    assert engine.start_cancelled and engine.stopped


async def test_a_signal_before_the_start_stops_it_before_it_runs():
    guard = StartupGuard()
    guard.request()
    ran: list[str] = []

    async def start() -> None:
        ran.append("start")
        await asyncio.sleep(3600)

    with pytest.raises(StartupCancelled):
        await guard.run(start())
    assert ran in ([], ["start"])  # scheduled at most, then cancelled


async def test_a_start_without_a_signal_returns_its_result_and_errors():
    assert await StartupGuard().run(asyncio.sleep(0, result="engine")) == "engine"

    async def broken() -> None:
        raise RuntimeError("weights missing")

    with pytest.raises(RuntimeError, match="weights missing"):
        await StartupGuard().run(broken())


async def test_cancelling_the_guard_cancels_the_start():
    started, cancelled = asyncio.Event(), []

    async def start() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    guarding = asyncio.create_task(StartupGuard().run(start()))
    await started.wait()
    guarding.cancel()
    with pytest.raises(asyncio.CancelledError):
        await guarding
    assert cancelled == [True]


def test_a_signal_before_start_up_ends_asks_the_guard_to_stop_the_start():
    guard = StartupGuard()
    server = DrainingServer(uvicorn.Config(_no_app), drain=lambda: None, drain_s=30, startup=guard)
    server.handle_exit(signal.SIGTERM, None)
    assert guard.requested and server.should_exit
    guard = StartupGuard()
    server = DrainingServer(uvicorn.Config(_no_app), drain=lambda: None, drain_s=30, startup=guard)
    server.started = True
    server.handle_exit(signal.SIGTERM, None)
    assert not guard.requested and not server.should_exit  # serving: SIGTERM drains instead


async def _lifespan_failed_by_signal(guard: StartupGuard | None) -> DrainingServer:
    async def app(scope, receive, send) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "stopped"})

    config = uvicorn.Config(app, lifespan="on", port=0)
    config.load()
    server = DrainingServer(config, drain=lambda: None, drain_s=30, startup=guard)
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    return server


async def test_a_start_up_stopped_by_a_signal_ends_by_that_signal_not_as_a_failure():
    guard = StartupGuard()
    guard.request()
    server = await _lifespan_failed_by_signal(guard)  # no SystemExit(3): capture_signals
    assert not server.started  # then raises the recorded signal again
    with pytest.raises(SystemExit) as failed:
        await _lifespan_failed_by_signal(StartupGuard())  # a real failure stays exit code 3
    assert failed.value.code == 3
