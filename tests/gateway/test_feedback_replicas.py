"""POST /v1/feedback over several replicas (apps on one registry) and restarts: a response's
verdict is counted once, whichever replica hears it first; the others answer a retry as a
duplicate and another verdict as a conflict. The registry keeps verdicts only for the feedback
window, and one it cannot be asked about is a 503 that counts nothing."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from gateway.services.feedback import PRUNE_MARGIN_S
from registry import service
from registry.models import FeedbackVerdict
from tests.e2e.conftest import postgres_database  # noqa: F401 - a fixture
from tests.gateway.fake_engine import ScriptedEngine, client_for
from tests.gateway.rollout_helpers import build_demo_root, register
from tests.gateway.test_feedback import SECRET, complete, counted, feedback
from tests.gateway.test_registry_outage import FailingSessions, assert_registry_unavailable


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("feedback-replicas"))


def replica(demo_root: Path, **settings):
    return client_for(demo_root, ScriptedEngine(["a"]), feedback_secret=SECRET, **settings)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def registry_settings(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, object]:
    """One registry for every replica of a test: a SQLite file, or a PostgreSQL database."""
    if request.param == "sqlite":
        return {"data_dir": tmp_path / "data"}
    url = request.getfixturevalue("postgres_database")
    return {"data_dir": tmp_path / "data", "database_url": url}


def test_a_verdict_is_counted_once_over_replicas_and_restarts(demo_root, registry_settings):
    name = f"fbr-once-{uuid.uuid4().hex[:6]}"
    with (
        replica(demo_root, **registry_settings) as first,
        replica(demo_root, **registry_settings) as second,
    ):
        register(first, demo_root, name, "v1")
        response_id = complete(first, name)
        owner = {"Authorization": first.headers["Authorization"]}
        recorded = feedback(first, response_id, "failure")
        assert recorded.status_code == 200 and recorded.json()["duplicate"] is False
        assert counted(first.tenant, name, "1", "failure") == 1

        retried = feedback(second, response_id, "failure", headers=owner)  # another replica
        assert retried.status_code == 200, retried.text
        assert retried.json()["duplicate"] is True
        changed = feedback(second, response_id, "success", headers=owner)
        assert changed.status_code == 409, changed.text
        assert changed.json()["error"]["code"] == "feedback_conflict"
        assert "'failure'" in changed.json()["error"]["message"]
        # The conflict leaves the replica remembering the recorded verdict, not the refused one.
        assert feedback(second, response_id, "failure", headers=owner).json()["duplicate"] is True

        # The other way round: a verdict recorded first by the second replica.
        other_id = complete(first, name)
        assert feedback(second, other_id, "success", headers=owner).json()["duplicate"] is False
        assert feedback(first, other_id, "failure").status_code == 409

    with replica(demo_root, **registry_settings) as restarted:
        again = feedback(restarted, response_id, "failure", headers=owner)
        assert again.status_code == 200 and again.json()["duplicate"] is True
    # The process-wide counters: every replica above counts into them, each verdict once.
    assert counted(first.tenant, name, "1", "failure") == 1
    assert counted(first.tenant, name, "1", "success") == 1


def test_verdicts_past_the_feedback_window_are_pruned(demo_root):
    max_age_s = 60
    with replica(demo_root, feedback_max_age_s=max_age_s) as client:
        register(client, demo_root, "fbr-prune", "v1")
        sessions = client.app.state.registry.sessions
        now = datetime.now(UTC)
        margin = max_age_s + PRUNE_MARGIN_S
        ages = {"past": margin + 600, "within": margin - 600}

        async def seed() -> None:
            async with sessions() as session:
                for name, age_s in ages.items():
                    await service.record_verdict(
                        session,
                        response_sha256=hashlib.sha256(name.encode()).hexdigest(),
                        outcome="success",
                        at=now - timedelta(seconds=age_s),
                        token=name,
                    )

        async def keys() -> set[str]:
            async with sessions() as session:
                return set((await session.scalars(select(FeedbackVerdict.response_sha256))).all())

        portal = client.portal
        assert portal is not None
        portal.call(seed)
        response_id = complete(client, "fbr-prune")
        assert feedback(client, response_id, "success").status_code == 200
        left = portal.call(keys)
        digest = hashlib.sha256
        assert digest(b"past").hexdigest() not in left
        assert {digest(b"within").hexdigest(), digest(response_id.encode()).hexdigest()} <= left


def test_a_verdict_the_registry_cannot_record_is_a_503_and_counted_later(demo_root, tmp_path):
    with replica(demo_root, data_dir=tmp_path / "data") as client:
        register(client, demo_root, "fbr-outage", "v1")
        warm_id, response_id = complete(client, "fbr-outage"), complete(client, "fbr-outage")
        assert feedback(client, warm_id, "success").status_code == 200  # its version is known
        runtime = client.app.state.registry
        failing = FailingSessions(runtime.sessions)
        runtime.sessions = failing
        failing.down = True
        assert_registry_unavailable(feedback(client, response_id, "success"))
        assert counted(client.tenant, "fbr-outage", "1", "success") == 1
        failing.down = False
        later = feedback(client, response_id, "success")  # the client's retry
        assert later.status_code == 200 and later.json()["duplicate"] is False
        assert counted(client.tenant, "fbr-outage", "1", "success") == 2


def test_a_failed_prune_never_fails_or_loses_a_verdict(demo_root, tmp_path, monkeypatch):
    calls = 0

    async def unreachable(*args: object, **kwargs: object) -> int:
        nonlocal calls
        calls += 1
        raise OperationalError("DELETE", None, ConnectionResetError("reset"))

    monkeypatch.setattr(service, "prune_verdicts", unreachable)
    with replica(demo_root, data_dir=tmp_path / "data") as client:
        register(client, demo_root, "fbr-prune-fails", "v1")
        for _ in range(3):
            response_id = complete(client, "fbr-prune-fails")
            recorded = feedback(client, response_id, "success")
            assert recorded.status_code == 200 and recorded.json()["duplicate"] is False
        assert counted(client.tenant, "fbr-prune-fails", "1", "success") == 3
        assert calls == 1  # retried a minute later, not on every verdict


def test_a_verdict_whose_commit_answer_was_lost_is_counted_once(demo_root, tmp_path, monkeypatch):
    """The row was written but the commit raised (a timeout waiting on a synchronous standby):
    the call reads it back and counts it, rather than a 503 whose retry would find the row and
    count nothing, ever."""
    record_verdict = service.record_verdict
    lost = 0

    async def answer_lost(*args: object, **kwargs: object) -> str | None:
        nonlocal lost
        recorded = await record_verdict(*args, **kwargs)  # type: ignore[arg-type]
        lost += 1
        raise OperationalError("COMMIT", None, TimeoutError("no answer"))
        return recorded  # pragma: no cover

    with replica(demo_root, data_dir=tmp_path / "data") as client:
        register(client, demo_root, "fbr-lost-ack", "v1")
        response_id = complete(client, "fbr-lost-ack")
        monkeypatch.setattr(service, "record_verdict", answer_lost)
        recorded = feedback(client, response_id, "failure")
        assert recorded.status_code == 200, recorded.text
        assert recorded.json()["duplicate"] is False and lost == 1
        # Another call's row is not taken for this call's: a duplicate, counted once.
        client.app.state.feedback._recorded.clear()  # as a replica that never saw it
        again = feedback(client, response_id, "failure")
        assert again.status_code == 200 and again.json()["duplicate"] is True
        assert counted(client.tenant, "fbr-lost-ack", "1", "failure") == 1
