"""An eval report and its release gates (seed §9: success ≥ baseline, 100 % format adherence,
regression ≤ 2 %, slice evaluation, refusal criteria; sentinels; behaviour fingerprints).

`judge` recomputes every gate from the suite and the answers, so the harness and the gateway
(which re-judges a report handed in as evidence) reach the same verdict from the same report.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from gateway.evals.checks import failed_checks, fingerprint
from gateway.evals.suite import FORMAT_CHECKS, CaseId, Label, Suite

MAX_GENERATIONS = 200_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Generation(_Strict):
    """One answer: its content, or the error that came instead. `receipt`: the gateway's
    answer receipt (gateway/answer_receipts.py) binding the text to the run's request."""

    case: CaseId
    text: str | None = Field(default=None, max_length=1_000_000)
    finish_reason: str | None = Field(default=None, max_length=64)
    response_id: str | None = Field(default=None, max_length=256)
    receipt: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, max_length=2000)

    @property
    def answer(self) -> str | None:
        """The text judged; None for no answer (an error, or nothing at all)."""
        return self.text if self.error is None else None


class Run(_Strict):
    model: Label
    # In the suite's case order, each case's answers in repeat order: the k-th answer of a
    # case was asked with the run's k-th seed for it (gateway/evals/runner.run_seed).
    generations: list[Generation] = Field(max_length=MAX_GENERATIONS)


class Gate(_Strict):
    name: str
    passed: bool
    detail: str
    gated: bool = True  # False: shown, never fails the report


class EvalReport(_Strict):
    schema_version: Literal[1] = 1
    suite: Suite
    run_id: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]
    tenant: Label | None = None
    repeat: int = Field(ge=1, le=100_000)
    candidate: Run
    baseline: Run | None = None
    started_at: datetime
    finished_at: datetime
    gates: list[Gate]
    passed: bool


@dataclass
class _CaseTally:
    checked: bool = False  # the case has checks: it counts for success and regressions
    passed: int = 0
    total: int = 0
    format_total: int = 0
    format_passed: int = 0
    refusal_total: int = 0
    refusal_passed: int = 0
    pin_held: int = 0
    prints: Counter[str] = field(default_factory=Counter)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def structure_problems(report: EvalReport) -> list[str]:
    """What makes a report unfit to judge: answers for cases the suite does not have, or a case
    without exactly `repeat` answers (a dropped failure would read as a pass)."""
    problems: list[str] = []
    ids = {case.id for case in report.suite.cases}
    for run in (report.candidate, report.baseline):
        if run is None:
            continue
        counts = Counter(generation.case for generation in run.generations)
        unknown = sorted(set(counts) - ids)
        if unknown:
            problems.append(f"{run.model}: answers for cases not in the suite: {unknown[:5]}")
        wrong = sorted(case for case in ids if counts.get(case, 0) != report.repeat)
        if wrong:
            problems.append(
                f"{run.model}: {len(wrong)} case(s) without exactly {report.repeat} answer(s), "
                f"e.g. {wrong[:5]}"
            )
    return problems


def _tally(run: Run, suite: Suite) -> dict[str, _CaseTally]:
    cases = suite.by_id()
    tallies = {case.id: _CaseTally(checked=bool(case.checks)) for case in suite.cases}
    for generation in run.generations:
        case = cases.get(generation.case)
        if case is None:
            continue
        tally = tallies[case.id]
        text = generation.answer
        failed = failed_checks(case, text, suite)
        tally.total += 1
        tally.passed += not failed
        tally.prints[fingerprint(text, suite)] += 1
        if case.pinned is not None:
            tally.pin_held += text is not None and text.strip() == case.pinned.strip()
        if any(check.type in FORMAT_CHECKS for check in case.checks):
            tally.format_total += 1
            tally.format_passed += not (set(failed) & {"error", *FORMAT_CHECKS})
        if any(check.type == "refusal" for check in case.checks):
            tally.refusal_total += 1
            tally.refusal_passed += not (set(failed) & {"error", "refusal"})
    return tallies


def _rate(passed: int, total: int) -> Fraction:
    """Exact: a gate at its limit (7/50 against 6/50 with 2 % allowed) passes."""
    return Fraction(passed, total) if total else Fraction(0)


def _limit(value: float) -> Fraction:
    return Fraction(value).limit_denominator(1_000_000)  # 0.29 is 29/100, not 0.28999...


def _share(passed: int, total: int) -> str:
    return f"{float(100 * _rate(passed, total)):.1f}% ({passed}/{total})"


def _success(tallies: dict[str, _CaseTally]) -> tuple[int, int]:
    checked = [t for t in tallies.values() if t.checked]
    return sum(t.passed for t in checked), sum(t.total for t in checked)


def judge(suite: Suite, candidate: Run, baseline: Run | None) -> list[Gate]:
    """Every gate that applies, in a fixed order."""
    mine = _tally(candidate, suite)
    theirs = _tally(baseline, suite) if baseline is not None else None
    unanswered = sum(g.answer is None for g in candidate.generations)
    unanswered_base = sum(g.answer is None for g in baseline.generations) if baseline else 0
    gates = [
        Gate(
            name="answered",
            passed=unanswered == 0 and unanswered_base == 0,
            detail=f"{unanswered} candidate and {unanswered_base} baseline request(s) failed",
        )
    ]
    passed, total = _success(mine)
    success = _rate(passed, total)
    detail = _share(passed, total)
    # Nothing passed is no evidence, whatever the baseline did.
    ok = passed > 0
    if theirs is not None:
        base_passed, base_total = _success(theirs)
        detail += f" vs baseline {_share(base_passed, base_total)}"
        ok = ok and success >= _rate(base_passed, base_total)
    if suite.min_success is not None:
        detail += f", minimum {100 * suite.min_success:.1f}%"
        ok = ok and success >= _limit(suite.min_success)
    if theirs is None and suite.min_success is None:
        ok = False
        detail += ": no baseline and no min_success to hold it to"
    if total == 0:
        detail += ": no case has a check"
    gates.append(Gate(name="task_success", passed=ok, detail=detail))
    for name, part in (("format_adherence", "format"), ("refusal_boundary", "refusal")):
        checked = sum(getattr(t, f"{part}_total") for t in mine.values())
        held = sum(getattr(t, f"{part}_passed") for t in mine.values())
        if checked:
            gates.append(Gate(name=name, passed=held == checked, detail=_share(held, checked)))
    pinned = [case.id for case in suite.cases if case.pinned is not None]
    if pinned:
        held = sum(0 < mine[c].total == mine[c].pin_held for c in pinned)
        gates.append(
            Gate(
                name="sentinels",
                passed=held == len(pinned),
                detail=f"{held}/{len(pinned)} pinned answers unchanged",
            )
        )
    if theirs is not None:
        gates.extend(_against_baseline(suite, mine, theirs))
    return gates


def _against_baseline(
    suite: Suite, mine: dict[str, _CaseTally], theirs: dict[str, _CaseTally]
) -> list[Gate]:
    allowed = _limit(suite.max_regression)
    checked = [case.id for case in suite.cases if case.checks]
    regressed = [c for c in checked if theirs[c].all_passed and not mine[c].all_passed]
    gates = [
        Gate(
            name="regression",
            passed=len(regressed) <= allowed * len(checked),
            detail=f"{len(regressed)}/{len(checked)} case(s) pass on the baseline and fail on "
            f"the candidate (at most {100 * suite.max_regression:.1f}%)"
            + (f", e.g. {regressed[:5]}" if regressed else ""),
        )
    ]
    slices: dict[str, list[str]] = defaultdict(list)
    for case in suite.cases:
        if case.slice is not None and case.checks:
            slices[case.slice].append(case.id)
    for name, members in sorted(slices.items()):
        rate = _rate(sum(mine[c].passed for c in members), sum(mine[c].total for c in members))
        base = _rate(sum(theirs[c].passed for c in members), sum(theirs[c].total for c in members))
        gates.append(
            Gate(
                name=f"slice:{name}",
                passed=rate >= base - allowed,
                detail=f"{float(100 * rate):.1f}% vs baseline {float(100 * base):.1f}% "
                f"({len(members)} cases)",
            )
        )
    cases = [case.id for case in suite.cases]
    shifted = [c for c in cases if _top(mine[c]) != _top(theirs[c])]
    limit = suite.max_fingerprint_shift
    gates.append(
        Gate(
            name="fingerprint_shift",
            passed=limit is None or len(shifted) <= _limit(limit) * len(cases),
            gated=limit is not None,
            detail=f"{len(shifted)}/{len(cases)} case(s) answer in another shape than the "
            "baseline" + (f", e.g. {shifted[:5]}" if shifted else ""),
        )
    )
    return gates


def _top(tally: _CaseTally) -> str | None:
    """The case's most common fingerprint (ties broken by name, so both runs agree)."""
    if not tally.prints:
        return None
    best = max(tally.prints.values())
    return min(name for name, count in tally.prints.items() if count == best)


def verdict(gates: list[Gate]) -> bool:
    return all(gate.passed for gate in gates if gate.gated)
