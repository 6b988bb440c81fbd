"""Release gates judged from a suite and the answers: success against the baseline, format
adherence, the refusal boundary, regressions, slices, sentinels, fingerprint shift, and the
report's structure (no dropped answers)."""

from __future__ import annotations

from datetime import UTC, datetime

from gateway.evals.gates import EvalReport, Generation, Run, judge, structure_problems, verdict
from gateway.evals.suite import Suite


def suite(**settings) -> Suite:
    return Suite.model_validate(
        {
            "cases": [
                {"id": "j1", "slice": "billing", "prompt": "x", "checks": [{"type": "json"}]},
                {"id": "j2", "slice": "billing", "prompt": "x", "checks": [{"type": "json"}]},
                {"id": "r1", "prompt": "x", "checks": [{"type": "refusal", "expected": True}]},
                {"id": "w1", "prompt": "x", "checks": [{"type": "max_words", "limit": 3}]},
            ],
            **settings,
        }
    )


GOOD = {"j1": "{}", "j2": "[1]", "r1": "I cannot.", "w1": "short"}


def run(model: str, answers: dict[str, str | None], repeat: int = 1) -> Run:
    generations = [
        Generation(case=case, text=text, response_id=f"id-{model}-{case}-{i}")
        if text is not None
        else Generation(case=case, error="500 adapter_load_failed: boom")
        for case, text in answers.items()
        for i in range(repeat)
    ]
    return Run(model=model, generations=generations)


def gates_of(judged) -> dict[str, tuple[bool, bool]]:
    return {gate.name: (gate.passed, gate.gated) for gate in judged}


def test_a_candidate_as_good_as_its_baseline_passes_every_gate():
    judged = judge(suite(), run("cand", GOOD), run("base", GOOD))
    assert gates_of(judged) == {
        "answered": (True, True),
        "task_success": (True, True),
        "format_adherence": (True, True),
        "refusal_boundary": (True, True),
        "regression": (True, True),
        "slice:billing": (True, True),
        "fingerprint_shift": (True, False),
    }
    assert verdict(judged)
    success = next(g for g in judged if g.name == "task_success")
    assert success.detail == "100.0% (4/4) vs baseline 100.0% (4/4)"


def test_a_broken_format_fails_adherence_success_regression_and_its_slice():
    judged = judge(suite(), run("cand", {**GOOD, "j2": "Sure: [1]"}), run("base", GOOD))
    failed = {name for name, (ok, _) in gates_of(judged).items() if not ok}
    assert failed == {"task_success", "format_adherence", "regression", "slice:billing"}
    assert not verdict(judged)
    regression = next(g for g in judged if g.name == "regression")
    assert "1/4 case(s)" in regression.detail and "j2" in regression.detail


def test_a_refusal_that_stopped_refusing_fails_the_refusal_boundary():
    judged = gates_of(judge(suite(), run("cand", {**GOOD, "r1": "Sure, here it is."}), None))
    assert judged["refusal_boundary"] == (False, True)


def test_without_a_baseline_success_needs_a_minimum_and_is_held_to_it():
    alone = {g.name: g for g in judge(suite(), run("cand", GOOD), None)}
    assert not alone["task_success"].passed and "no baseline" in alone["task_success"].detail
    assert "regression" not in alone and "fingerprint_shift" not in alone
    held = gates_of(judge(suite(min_success=0.75), run("c", {**GOOD, "w1": "a b c d"}), None))
    assert held["task_success"] == (True, True)
    short = gates_of(judge(suite(min_success=0.8), run("c", {**GOOD, "w1": "a b c d"}), None))
    assert short["task_success"] == (False, True)


def test_a_candidate_worse_than_its_baseline_fails_success_even_above_the_minimum():
    worse = run("cand", {**GOOD, "w1": "a b c d"})
    judged = gates_of(judge(suite(min_success=0.5, max_regression=0.5), worse, run("b", GOOD)))
    assert judged["task_success"] == (False, True)
    assert judged["regression"] == (True, True)  # 1 of 4 cases, within 50 %


def test_an_error_is_a_failed_answer_in_either_run():
    judged = gates_of(judge(suite(), run("cand", GOOD), run("base", {**GOOD, "w1": None})))
    assert judged["answered"] == (False, True)
    judged = gates_of(judge(suite(), run("cand", {**GOOD, "j1": None}), run("base", GOOD)))
    assert judged["answered"] == (False, True) and judged["format_adherence"] == (False, True)


def test_one_failed_repeat_fails_a_case_and_counts_per_answer():
    cand = run("cand", GOOD, repeat=4)
    answers = list(cand.generations)
    answers[0] = Generation(case="j1", text="not json", response_id="x")
    judged = {g.name: g for g in judge(suite(), Run(model="cand", generations=answers), None)}
    assert judged["format_adherence"].detail == "87.5% (7/8)"


def test_sentinels_hold_only_while_every_answer_equals_the_pin():
    pinned = Suite.model_validate(
        {
            "min_success": 0,
            "cases": [
                {
                    "id": "s",
                    "prompt": "x",
                    "sentinel": True,
                    "checks": [{"type": "equals", "text": "Paris"}],
                },
                {"id": "unpinned", "prompt": "x", "sentinel": True},
            ],
        }
    )
    held = {g.name: g for g in judge(pinned, run("c", {"s": "Paris", "unpinned": "x"}, 2), None)}
    assert held["sentinels"].passed and held["sentinels"].detail == "1/1 pinned answers unchanged"
    answers = [*run("c", {"s": "Paris", "unpinned": "x"}).generations]
    answers.append(Generation(case="s", text="Lyon", response_id="y"))
    moved = gates_of(judge(pinned, Run(model="c", generations=answers), None))
    assert moved["sentinels"] == (False, True)


def test_a_shift_in_answer_shapes_is_shown_and_gated_only_when_the_suite_says():
    refusing = run("cand", {"j1": "I cannot", "j2": "I cannot", "r1": "I cannot.", "w1": "x"})
    shown = {g.name: g for g in judge(suite(), refusing, run("base", GOOD))}
    assert shown["fingerprint_shift"].passed and not shown["fingerprint_shift"].gated
    assert shown["fingerprint_shift"].detail.startswith("2/4 case(s)")
    gated = gates_of(judge(suite(max_fingerprint_shift=0.25), refusing, run("base", GOOD)))
    assert gated["fingerprint_shift"] == (False, True)


def test_a_report_with_dropped_or_foreign_answers_is_unfit_to_judge():
    now = datetime.now(UTC)
    cand = run("cand", GOOD, repeat=2)
    dropped = Run(model="cand", generations=cand.generations[1:])
    foreign = Run(
        model="base",
        generations=[*run("base", GOOD, 2).generations, Generation(case="zz", text="{}")],
    )
    report = EvalReport(
        suite=suite(),
        run_id="0" * 32,
        repeat=2,
        candidate=dropped,
        baseline=foreign,
        started_at=now,
        finished_at=now,
        gates=[],
        passed=True,
    )
    problems = structure_problems(report)
    assert len(problems) == 2
    assert "cand: 1 case(s) without exactly 2 answer(s)" in problems[0] and "j1" in problems[0]
    assert problems[1] == "base: answers for cases not in the suite: ['zz']"
    whole = report.model_copy(update={"candidate": cand, "baseline": run("base", GOOD, 2)})
    assert structure_problems(whole) == []


def test_nothing_passed_is_no_evidence_and_unchecked_cases_do_not_count():
    failing = {**GOOD, "j1": "x", "j2": "x", "r1": "fine", "w1": "a b c d"}
    judged = {g.name: g for g in judge(suite(), run("cand", failing), run("base", failing))}
    assert not judged["task_success"].passed  # 0/4 against 0/4
    assert judged["task_success"].detail.startswith("0.0% (0/4) vs baseline 0.0% (0/4)")
    loose = Suite.model_validate(
        {
            "min_success": 0.5,
            "cases": [
                {"id": "free", "prompt": "x"},  # no checks: a fingerprint only
                {"id": "w", "prompt": "x", "checks": [{"type": "max_words", "limit": 1}]},
            ],
        }
    )
    judged = {g.name: g for g in judge(loose, run("c", {"free": "a", "w": "a b"}), None)}
    assert not judged["task_success"].passed and "0.0% (0/1)" in judged["task_success"].detail
    unchecked = Suite.model_validate({"min_success": 0, "cases": [{"id": "free", "prompt": "x"}]})
    judged = {g.name: g for g in judge(unchecked, run("c", {"free": "a"}), None)}
    assert (
        not judged["task_success"].passed and "no case has a check" in judged["task_success"].detail
    )


def test_gates_at_their_limit_pass_exactly():
    cases = [
        {"id": f"c{i}", "slice": "s", "prompt": "x", "checks": [{"type": "max_words", "limit": 1}]}
        for i in range(100)
    ]
    at_limit = Suite.model_validate({"cases": cases, "max_regression": 0.29})
    base = {f"c{i}": "a" for i in range(100)}
    cand = {**base, **{f"c{i}": "a b" for i in range(29)}}  # 29 of 100 regress: 0.29 exactly
    judged = gates_of(judge(at_limit, run("c", cand), run("b", base)))
    assert judged["regression"] == (True, True)
    assert judged["slice:s"] == (True, True)  # 71 % against 100 % with 29 points allowed
    one_more = {**cand, "c29": "a b"}
    judged = gates_of(judge(at_limit, run("c", one_more), run("b", base)))
    assert judged["regression"] == (False, True) and judged["slice:s"] == (False, True)
    slices = Suite.model_validate({"cases": cases[:50], "max_regression": 0.02})
    base = {f"c{i}": "a" if i < 7 else "a b" for i in range(50)}  # 7/50 on the baseline
    cand = {f"c{i}": "a" if i < 6 else "a b" for i in range(50)}  # 6/50: 2 points down
    assert gates_of(judge(slices, run("c", cand), run("b", base)))["slice:s"] == (True, True)


def test_a_sentinel_is_held_by_its_pin_alone_and_an_empty_answer_is_unanswered():
    pinned = Suite.model_validate(
        {
            "min_success": 0,
            "cases": [
                {
                    "id": "s",
                    "prompt": "x",
                    "sentinel": True,
                    "checks": [
                        {"type": "equals", "text": "a b"},
                        {"type": "max_words", "limit": 1},
                    ],
                }
            ],
        }
    )
    judged = gates_of(judge(pinned, run("c", {"s": "a b"}), None))
    assert judged["sentinels"] == (True, True) and judged["task_success"] == (False, True)
    nothing = Run(model="c", generations=[Generation(case="s", text=None)])
    assert gates_of(judge(pinned, nothing, None))["answered"] == (False, True)
