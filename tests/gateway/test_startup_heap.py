"""What start-up built is frozen out of the garbage collector's reach once the gateway is
ready, so a full collection while serving traverses only what serving allocated (a full
collection over the start-up heap paused the event loop for ~250 ms)."""

from __future__ import annotations

import gc

from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root


def test_the_start_up_heap_is_frozen_when_the_gateway_is_ready(tmp_path):
    root = build_demo_root(tmp_path / "demo")
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with client_for(root, ScriptedEngine(["a"])) as client:
        assert client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 100_000  # torch, transformers, the tokenizer, the app
        # the app and its singletons are in the permanent generation: no collection visits them
        tracked = gc.get_objects()
        assert not any(o is client.app or o is client.app.state.catalog for o in tracked)
        after = object.__new__(type("ServingTime", (), {}))  # allocated while serving: tracked
        assert any(o is after for o in gc.get_objects())
    gc.unfreeze()
