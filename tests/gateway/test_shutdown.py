"""How a serving process ends: SIGTERM drains (readiness first, then the server stops), and an
engine that died for good stops the server so that the orchestrator starts a fresh one."""

from __future__ import annotations

import asyncio
import signal
import time

import uvicorn
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.engine.client import EngineHealth
from gateway.settings import Settings
from gateway.shutdown import DrainingServer, watch_engine
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
