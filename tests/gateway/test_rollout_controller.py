"""The controller judges a canary on its own traffic: mirrored shadow copies of the same
version, recorded in the same window while it was a shadow, and an earlier canary's samples
are dropped when the canary starts (found by review: one 20 ms canary request after 100 slow
shadow copies rolled the canary back; after fast ones, auto-promoted it)."""

from __future__ import annotations

import dataclasses
import types
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.rollback_monitor import Sample
from gateway.rollout_controller import RolloutController
from registry.rollout import RolloutView, Thresholds

SHADOW = RolloutView(
    name="bot",
    tenant="acme",
    base_model="b",
    base_sha256="x",
    stable_version=2,
    stable_version_id=2,
    canary_version=None,
    canary_version_id=None,
    canary_percent=0,
    shadow_version=3,
    shadow_version_id=3,
    shadow_percent=10,
    paused=False,
    stage=None,
    rollback_target="base",
    active_target=None,
    auto_fallback=False,
    rolled_back_version=None,
    rolled_back_at=None,
    updated_at=None,
    stable_card=None,
    canary_card=None,
    shadow_card=None,
    threshold_override=None,
)
CANARY = dataclasses.replace(
    SHADOW,
    canary_version=3,
    canary_version_id=3,
    canary_percent=1,
    shadow_version=None,
    shadow_version_id=None,
    shadow_percent=0,
    stage="canary",
)


class Router:
    def __init__(self, view: RolloutView):
        self.current = view

    def view(self, name: str) -> RolloutView:
        return self.current


def controller(router: Router, *, auto_promote: bool) -> tuple[RolloutController, list[str]]:
    made = RolloutController(
        None,  # type: ignore[arg-type]  # the registry is only reached by spawned actions
        router,  # type: ignore[arg-type]
        Thresholds(sla_p95_e2e_ms=100, window=20),
        auto_promote=auto_promote,
    )
    spawned: list[str] = []

    def spawn(coroutine: Any) -> None:
        spawned.append(coroutine.cr_code.co_name)
        coroutine.close()

    made._spawn = spawn  # type: ignore[method-assign]
    return made, spawned


def request(e2e_s: float) -> Any:
    return types.SimpleNamespace(
        completed=True, failed=False, started=0.0, first_token_at=0.005, finished_at=e2e_s
    )


@pytest.mark.parametrize(("shadow_ms", "auto_promote"), [(500, False), (10, True)])
def test_shadow_copies_do_not_judge_the_canary_of_the_same_version(shadow_ms, auto_promote):
    router = Router(SHADOW)
    made, spawned = controller(router, auto_promote=auto_promote)
    for _ in range(100):
        made.record_shadow("bot", 3, Sample(0.005, shadow_ms / 1000, False))
    router.current = CANARY
    made.observe("bot", 3, request(0.020))
    assert spawned == []
    figures = made.figures("bot", 3)
    assert figures is not None and figures.samples == 1  # its own request only
    for _ in range(19):
        made.observe("bot", 3, request(0.020))
    assert spawned == (["_promote"] if auto_promote else [])  # a full window of its own


def test_a_restarted_canary_of_the_same_version_starts_a_new_window():
    router = Router(CANARY)
    made, spawned = controller(router, auto_promote=False)
    for _ in range(19):
        made.observe("bot", 3, request(0.5))  # slow, one short of a verdict
    # rolled back by another replica, then started again
    router.current = dataclasses.replace(
        CANARY, rolled_back_version=3, rolled_back_at=datetime(2026, 12, 6, tzinfo=UTC)
    )
    made.observe("bot", 3, request(0.5))
    assert spawned == []
    assert made.figures("bot", 3).samples == 1  # type: ignore[union-attr]


def test_only_server_side_errors_count_against_the_version():
    """A request the engine refused as invalid (400) is the client's doing; it used to be
    recorded as a failure of the version, and could roll a canary back (review)."""
    from gateway.errors import EngineUnavailable, InvalidRequest, ModelNotFound
    from gateway.services.generation import GenerationFailed, _the_versions_fault

    assert not _the_versions_fault(InvalidRequest("bad stop sequence"))
    assert not _the_versions_fault(ModelNotFound("x"))
    assert _the_versions_fault(GenerationFailed("engine failed"))
    assert _the_versions_fault(EngineUnavailable("down"))
    assert _the_versions_fault(RuntimeError("corrupt weights"))
