"""An eval report as evidence through the admin API (POST .../evaluate with `report`): the
harness's real run through the app marks a version evaluated and leaves its gates in the audit
row; a failing gate, answers served by another version or to another tenant, dropped or
repeated answers are each refused with every problem listed, and the version stays compatible;
LORAPLEX_EVALUATE_REQUIRES_REPORT refuses an evaluation without one."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.evals.gates import EvalReport, Generation, Run
from gateway.evals.runner import encode_request, request_body, run_seed, run_suite
from gateway.evals.suite import Suite
from gateway.feedback_ids import ResponseIds
from gateway.services.eval_evidence import EvalEvidence, Serving
from registry import service
from tests.gateway.fake_engine import BASE, ScriptedEngine, client_for
from tests.gateway.rollout_helpers import ADMIN, build_demo_root, complete, register

JSON_WORDS = ['{"order"', ": 7}"]
SUITE = Suite.model_validate(
    {
        "name": "orders",
        "cases": [
            {"id": "as-json", "prompt": "order 7", "checks": [{"type": "json"}]},
            {
                "id": "chat",
                "slice": "chat",
                "messages": [{"role": "user", "content": "order?"}],
                "checks": [{"type": "max_words", "limit": 5}],
            },
        ],
    }
)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_root(tmp_path_factory.mktemp("eval"))


async def _harness(app, key: str, model: str, baseline: str | None, tenant: str | None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers={"Authorization": key}
    ) as http:
        return await run_suite(
            http, SUITE, model=model, baseline=baseline, repeat=2, concurrency=3, tenant=tenant
        )


def harness(client, model: str, baseline: str | None = None, tenant: str | None = None):
    key = client.headers["Authorization"]
    report = client.portal.call(_harness, client.app, key, model, baseline, tenant)
    assert isinstance(report, EvalReport)
    return report


def evaluate(client, name: str, version: int, report: EvalReport | dict | None, **extra: Any):
    body: dict[str, Any] = {"reason": "suite orders", **extra}
    if report is not None:
        body["report"] = (
            report.model_dump(mode="json", by_alias=True)
            if isinstance(report, EvalReport)
            else report
        )
    return client.post(
        f"/admin/v1/adapters/{name}/versions/{version}/evaluate", json=body, headers=ADMIN
    )


def state(client, name: str, version: int) -> str:
    versions = client.get(f"/admin/v1/adapters/{name}", headers=ADMIN).json()["versions"]
    return next(v["state"] for v in versions if v["version"] == version)


def problems(response) -> list[tuple[str, str]]:
    return [(p["code"], p["message"]) for p in response.json()["error"]["problems"]]


def two_versions(client, demo_root: Path, engine: ScriptedEngine, name: str) -> int:
    """`name` v1 and v2 registered; v2's engine id."""
    register(client, demo_root, name, "v1")
    register(client, demo_root, name, "v2")
    assert complete(client, f"{name}@2") == 200
    return engine.calls[-1][1].engine_id


def test_a_passing_report_marks_the_version_evaluated_and_its_gates_are_audited(demo_root):
    engine = ScriptedEngine(JSON_WORDS)
    with client_for(demo_root, engine) as client:
        two_versions(client, demo_root, engine, "ev-pass")
        report = harness(client, "ev-pass@2", baseline="ev-pass@1")
        assert report.passed, report.gates
        assert len(report.candidate.generations) == len(report.baseline.generations) == 4
        assert {g.text for g in report.candidate.generations} == {'{"order": 7}'}
        accepted = evaluate(client, "ev-pass", 2, report)
        assert accepted.status_code == 200, accepted.text
        assert accepted.json()["state"] == "evaluated"

        async def audited():
            async with client.app.state.registry.sessions() as session:
                return await service.list_audit(session, target="adapter:ev-pass")

        entry = next(e for e in client.portal.call(audited) if e.action.endswith("evaluate"))
        evidence = entry.details["evidence"]
        assert evidence["passed"] is True and evidence["suite"] == "orders"
        assert evidence["tenant"] == client.tenant and evidence["baseline"] == "ev-pass@1"
        assert evidence["cases"] == 2 and evidence["repeat"] == 2
        assert evidence["gates"]["task_success"] == "100.0% (4/4) vs baseline 100.0% (4/4)"
        assert len(evidence["suite_sha256"]) == 64
        assert entry.details["reason"] == "suite orders"


def test_a_report_whose_gates_fail_is_refused_and_the_version_stays_compatible(demo_root):
    engine = ScriptedEngine(JSON_WORDS)
    with client_for(demo_root, engine) as client:
        candidate = two_versions(client, demo_root, engine, "ev-fail")
        engine.words_for[candidate] = ["Sure", ", order", " seven", " is", " on", " its", " way"]
        report = harness(client, "ev-fail@2", baseline="ev-fail@1")
        assert not report.passed
        # The report's own verdict is not taken: one that says "passed" is judged again.
        lying = report.model_dump(mode="json", by_alias=True)
        lying["passed"] = True
        lying["gates"] = []
        refused = evaluate(client, "ev-fail", 2, lying)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["code"] == "eval_gate_failed"
        found = problems(refused)
        assert {code for code, _ in found} == {"eval_gate_failed"}
        failed = {message.split()[1] for _, message in found}
        assert failed == {"task_success", "format_adherence", "regression", "slice:chat"}
        assert state(client, "ev-fail", 2) == "compatible"


def test_answers_served_by_another_version_or_tenant_are_not_evidence(demo_root):
    engine = ScriptedEngine(JSON_WORDS)
    with client_for(demo_root, engine) as client:
        two_versions(client, demo_root, engine, "ev-who")
        report = harness(client, "ev-who@2", baseline="ev-who@1")
        assert report.passed

        # v2's report handed in for v1: another candidate, served by another version.
        other_version = evaluate(client, "ev-who", 1, report)
        assert other_version.status_code == 422
        assert other_version.json()["error"]["code"] == "eval_evidence_invalid"
        messages = " | ".join(m for _, m in problems(other_version))
        assert messages == (
            "the report's candidate is 'ev-who@2', not 'ev-who@1' "
            "(run the suite against the exact version)"
        )
        # The same answers claimed under v1's name: served by v2, and the baseline by v1.
        claimed = report.model_copy(
            update={"candidate": report.candidate.model_copy(update={"model": "ev-who@1"})}
        )
        as_v1 = " | ".join(m for _, m in problems(evaluate(client, "ev-who", 1, claimed)))
        assert "ev-who@1: 4 answer(s) that are not the gateway's answer" in as_v1  # other bytes

        # The same answers claimed for another tenant: its ids were not issued to it.
        assert client.post("/admin/v1/tenants", json={"name": "ev-other"}, headers=ADMIN).is_success
        as_other = evaluate(client, "ev-who", 2, report.model_copy(update={"tenant": "ev-other"}))
        assert as_other.status_code == 422
        assert "ev-who@2: 4 response id(s) this gateway did not issue" in as_other.text

        # A dropped answer (a failure hidden) and one answer given twice.
        answers = list(report.candidate.generations)
        dropped = report.candidate.model_copy(update={"generations": answers[1:]})
        twice = report.candidate.model_copy(
            update={"generations": [answers[0], answers[0], *answers[2:]]}
        )
        gone = evaluate(client, "ev-who", 2, report.model_copy(update={"candidate": dropped}))
        assert gone.status_code == 422
        assert "without exactly 2 answer(s)" in gone.text
        repeated = evaluate(client, "ev-who", 2, report.model_copy(update={"candidate": twice}))
        assert repeated.status_code == 422
        assert "1 response id(s) given twice" in repeated.text

        # An edited id and an answer without one.
        first = answers[0]
        forged_id = first.response_id[:-4] + (
            "AAAA" if not first.response_id.endswith("AAAA") else "BBBB"
        )
        forged = [first.model_copy(update={"response_id": forged_id}), *answers[1:]]
        no_id = [first.model_copy(update={"response_id": None}), *answers[1:]]
        for generations, says in (
            (forged, "1 response id(s) this gateway"),
            (no_id, "1 answer(s) without"),
        ):
            run = report.candidate.model_copy(update={"generations": generations})
            refused = evaluate(client, "ev-who", 2, report.model_copy(update={"candidate": run}))
            assert refused.status_code == 422 and says in refused.text
        assert state(client, "ev-who", 2) == "compatible"

        # Unknown tenant and malformed reports are the usual 404 / 400.
        unknown = evaluate(client, "ev-who", 2, report.model_copy(update={"tenant": "nobody"}))
        assert unknown.status_code == 404
        malformed = evaluate(client, "ev-who", 2, {"suite": {}, "repeat": 0})
        assert malformed.status_code == 400
        nul = report.model_dump(mode="json", by_alias=True)
        nul["tenant"] = "ev\u0000other"  # PostgreSQL stores no NUL: refused before a query
        assert evaluate(client, "ev-who", 2, nul).status_code == 400
        nul["tenant"], nul["baseline"]["model"] = None, "ev-who@1\u0000"
        assert evaluate(client, "ev-who", 2, nul).status_code == 400
        assert evaluate(client, "ev-who", 2, report).status_code == 200


def test_a_gateway_that_requires_a_report_refuses_an_evaluation_without_one(demo_root):
    engine = ScriptedEngine(JSON_WORDS)
    with client_for(demo_root, engine, evaluate_requires_report=True) as client:
        two_versions(client, demo_root, engine, "ev-req")
        bare = evaluate(client, "ev-req", 2, None)
        assert bare.status_code == 422, bare.text
        assert bare.json()["error"]["code"] == "eval_report_required"
        assert state(client, "ev-req", 2) == "compatible"
        # v1 serves the name: the base is no baseline for v2, and no baseline is none either.
        against_base = evaluate(client, "ev-req", 2, harness(client, "ev-req@2", baseline=BASE))
        assert against_base.status_code == 422
        assert "ev-req@1 (serving)" in against_base.text
        alone = evaluate(client, "ev-req", 2, harness(client, "ev-req@2"))
        assert alone.status_code == 422 and "--baseline ev-req@1" in alone.text
        report = harness(client, "ev-req@2", baseline="ev-req@1")
        accepted = evaluate(client, "ev-req", 2, report)
        assert accepted.status_code == 200, accepted.text


RUN_ID = "0" * 32


def evidence_world(*answers: tuple[int, float, str], model: str = "n@1"):
    """A one-case report for `model` whose answers (version id, signed at, text) carry real
    receipts from `ids` for the run's requests."""
    ids = ResponseIds(b"s" * 32)
    case = {"id": "a", "prompt": "x", "checks": [{"type": "max_words", "limit": 5}]}
    suite = Suite.model_validate({"min_success": 0.5, "cases": [case]})
    generations = []
    for i, (version_id, signed_at, text) in enumerate(answers):
        request = encode_request(request_body(model, suite.cases[0], run_seed(RUN_ID, "a", i)))
        response_id = ids.sign(
            f"cmpl-{i:032x}", version_id=version_id, judged=False, tenant_id=3, now=signed_at
        )
        receipt = ids.answer_receipt(response_id, request, text)
        generations.append(
            Generation(case="a", text=text, response_id=response_id, receipt=receipt)
        )
    now = datetime.now(UTC)
    report = EvalReport(
        suite=suite,
        run_id=RUN_ID,
        repeat=len(answers),
        candidate=Run(model=model, generations=generations),
        started_at=now,
        finished_at=now,
        gates=[],
        passed=True,
    )
    return ids, report


def checker(ids: ResponseIds, now: float, max_age_s: float = 60) -> EvalEvidence:
    return EvalEvidence(ids, registry=None, max_age_s=max_age_s, clock=lambda: now)  # type: ignore[arg-type]


def test_answers_older_than_the_feedback_window_are_stale():
    ids, report = evidence_world((7, 1_000_000.0, "x"))
    found, gates, issued = checker(ids, 1_000_060.0).problems(report, "n@1", 7, tenant_id=3)
    assert found == [] and {g.name for g in gates} == {"answered", "task_success"}
    assert issued == [1_000_000]
    found, gates, _ = checker(ids, 1_000_061.0).problems(report, "n@1", 7, tenant_id=3)
    assert found == [("eval_evidence_invalid", "n@1: 1 answer(s) older than 60 s")]
    assert gates == []


def test_an_edited_text_or_an_answer_to_another_request_is_not_the_gateways_answer():
    ids, report = evidence_world((7, 1_000_000.0, "x"), (7, 1_000_000.0, "x"))
    first, second = report.candidate.generations
    says = "n@1: 1 answer(s) that are not the gateway's answer to the run's request"

    def found_with(generation):
        run = report.candidate.model_copy(update={"generations": [generation, second]})
        found, _, _ = checker(ids, 1_000_001.0).problems(
            report.model_copy(update={"candidate": run}), "n@1", 7, tenant_id=3
        )
        return found

    assert found_with(first) == []
    assert found_with(first.model_copy(update={"text": "y"}))[0][1].startswith(says)
    # The answer to a friendlier prompt, or to another seed, has its receipt bound to that.
    case = report.suite.cases[0]
    for other in (
        request_body("n@1", case.model_copy(update={"prompt": "say x"}), run_seed(RUN_ID, "a", 0)),
        request_body("n@1", case, run_seed(RUN_ID, "a", 1)),
    ):
        receipt = ids.answer_receipt(first.response_id, encode_request(other), "x")
        assert found_with(first.model_copy(update={"receipt": receipt}))[0][1].startswith(says)
    missing = found_with(first.model_copy(update={"receipt": None}))
    assert missing == [
        ("eval_evidence_invalid", "n@1: 1 answer(s) without a response id or answer receipt")
    ]


def test_a_baseline_answered_by_several_versions_is_no_baseline():
    ids, report = evidence_world((7, 1_000_000.0, "x"), (7, 1_000_000.0, "x"))
    _, other = evidence_world((8, 1_000_000.0, "x"), (9, 1_000_000.0, "x"), model="n")
    two = report.model_copy(update={"baseline": other.candidate})
    found, _, _ = checker(ids, 1_000_001.0).problems(two, "n@1", 7, tenant_id=3)
    assert found == [("eval_evidence_invalid", "n: answered by 2 different versions")]
    serving = Serving(8, "n@2")
    found, _, _ = checker(ids, 1_000_001.0).problems(two, "n@1", 7, 3, serving)
    assert ("eval_evidence_invalid", "n: 1 answer(s) not served by n@2 (serving)") in found


def test_a_suite_whose_pattern_does_not_compile_is_invalid_evidence():
    ids, report = evidence_world((7, 1_000_000.0, "x"))
    case = report.suite.cases[0]
    broken = case.model_validate(
        {**case.model_dump(by_alias=True), "checks": [{"type": "regex", "pattern": "("}]}
    )
    suite = report.suite.model_copy(update={"cases": [broken]})
    found, _, _ = checker(ids, 1_000_001.0).problems(
        report.model_copy(update={"suite": suite}), "n@1", 7, tenant_id=3
    )
    assert len(found) == 1 and found[0][0] == "eval_evidence_invalid"
    assert found[0][1].startswith("case a: not a regular expression")
