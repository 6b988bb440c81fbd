"""An eval report as the evidence that moves a version compatible → evaluated (seed §9: no
promotion past `evaluated` without gate results).

The gateway takes nothing in the report on its word:
- every answer's request is rebuilt from the suite, the run's model and the seed the run's id
  fixes for its case and repeat (gateway/evals/runner.py), so an answer to a friendlier prompt
  or to a re-rolled seed is no evidence, and asking again gets the same answer;
- every answer carries its response id, the gateway's signed receipt of the version that
  served it and the tenant it went to (gateway/feedback_ids.py), and its answer receipt, which
  binds its text to that id and to the request's bytes (gateway/answer_receipts.py): each
  candidate answer was served by exactly this version; the baseline's by the version the
  adapter's name serves now when that is another one (required then), else by one version
  other than the candidate or the base; all to the report's tenant (the adapter's owner when it
  names none), each at most LORAPLEX_FEEDBACK_MAX_AGE_S ago, no id twice, no text edited;
- each case has exactly `repeat` answers in each run, so a failure cannot be dropped;
- the gates are judged again here (gateway/evals/gates.py); the report's verdict is ignored;
- the suite is checked against every dataset the version's card lists that has a registered
  n-gram filter (gateway/evals/contamination.py): a case its training data held refuses the
  evidence (`eval_contaminated`); with LORAPLEX_EVALUATE_REQUIRES_NGRAM_FILTERS a listed
  dataset without a filter does too (`eval_dataset_unchecked`).
What it cannot rule out: a whole suite run again under new run ids until a run at a
temperature above 0 passed. A refusal lists every problem (422); what passed is recorded in the
version's audit row, with the answers' own time range.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.errors import LoraplexError
from gateway.evals.contamination import HashedItems, check_suite, hash_suite
from gateway.evals.gates import EvalReport, Gate, Run, judge, structure_problems, verdict
from gateway.evals.runner import encode_request, request_body, run_seed
from gateway.evals.suite import Suite, pattern_problems
from gateway.feedback_ids import ResponseIds
from gateway.registry_runtime import RegistryRuntime
from registry import service
from registry.models import AdapterVersion
from registry.service.queries import current_version

MAX_LISTED = 20  # problems named in a refusal; the rest counted


# The refusal's code: the first of these among its problems.
CODES = ("eval_evidence_invalid", "eval_contaminated", "eval_dataset_unchecked", "eval_gate_failed")


class EvidenceRefused(LoraplexError):
    status_code = 422
    error_type = "invalid_request_error"

    def __init__(self, problems: list[tuple[str, str]]):
        found = {code for code, _ in problems}
        super().__init__(
            "The eval report does not show this version passing its gates: "
            + "; ".join(message for _, message in problems[:3]),
            param="report",
            code=next((code for code in CODES if code in found), CODES[-1]),
        )
        shown = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            shown.append((self.code or "", f"... and {len(problems) - MAX_LISTED} more"))
        self.problems = shown


class ReportRequired(LoraplexError):
    status_code = 422
    error_type = "invalid_request_error"
    code = "eval_report_required"

    def __init__(self) -> None:
        super().__init__(
            "This gateway marks a version evaluated only on an eval report whose gates pass "
            "(LORAPLEX_EVALUATE_REQUIRES_REPORT, or LORAPLEX_EVALUATE_REQUIRES_NGRAM_FILTERS: "
            "the suite is checked against the training data): run `loraplex eval run` against "
            "it.",
            param="report",
        )


@dataclass(frozen=True)
class Serving:
    """The version an adapter's name serves now (its stable, else its newest servable)."""

    version_id: int
    address: str


class EvalEvidence:
    def __init__(
        self,
        ids: ResponseIds,
        registry: RegistryRuntime,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        requires_ngram_filters: bool = False,
    ):
        self._ids = ids
        self._registry = registry
        self._max_age_s = max_age_s
        self._clock = clock
        self._requires_filters = requires_ngram_filters

    async def mark_evaluated(
        self, *, name: str, version: int, actor: str, reason: str | None, report: EvalReport
    ) -> AdapterVersion:
        """Check `report` as evidence for name@version, then mark it evaluated; raises
        EvidenceRefused listing every problem."""
        async with self._registry.sessions() as session:
            row = await service.get_version(session, name=name, version=version)
            tenant = (
                await service.get_tenant(session, name=report.tenant)
                if report.tenant is not None
                else row.adapter.tenant
            )
            current = await current_version(session, row.adapter)
            serving = (
                Serving(current.id, f"{name}@{current.version}")
                if current is not None and current.id != row.id
                else None
            )
            version_id, tenant_id = row.id, tenant.id
            datasets = service.card_datasets(row.card)
        # Re-judging runs every check over every answer: off the event loop every stream shares.
        problems, gates, issued = await asyncio.to_thread(
            self.problems, report, f"{name}@{version}", version_id, tenant_id, serving
        )
        checked: dict[str, object] = {}
        if not any(code == "eval_evidence_invalid" for code, _ in problems):
            found, checked = await self.contamination(report.suite, datasets)
            problems = found + problems
        if problems:
            raise EvidenceRefused(problems)
        async with self._registry.sessions() as session:
            return await service.mark_evaluated(
                session,
                name=name,
                version=version,
                actor=actor,
                reason=reason,
                evidence=summary(report, tenant.name, gates, issued) | {"datasets": checked},
            )

    async def contamination(
        self, suite: Suite, datasets: list[str]
    ) -> tuple[list[tuple[str, str]], dict[str, object]]:
        """The suite checked against each listed dataset's filter, one filter in memory at a
        time: problems, and per dataset what the audit row keeps (None: no filter)."""
        problems: list[tuple[str, str]] = []
        checked: dict[str, object] = {}
        if not datasets and self._requires_filters:
            problems.append(
                (
                    "eval_dataset_unchecked",
                    "the version's card lists no training dataset "
                    "(LORAPLEX_EVALUATE_REQUIRES_NGRAM_FILTERS): nothing to check the suite "
                    "against",
                )
            )
        items = await asyncio.to_thread(hash_suite, suite) if datasets else []
        for digest in datasets:
            checked[digest], problem = await self._check_dataset(digest, items)
            if problem is not None:
                problems.append(problem)
        return problems, checked

    async def _check_dataset(
        self, digest: str, items: HashedItems
    ) -> tuple[dict[str, object] | None, tuple[str, str] | None]:
        """One dataset's verdict for the audit row and its problem. Its filter (up to
        LORAPLEX_NGRAM_FILTER_MAX_BYTES) is freed when this returns."""
        async with self._registry.sessions() as session:
            loaded = await service.load_ngram_filters(session, dataset_sha256s=[digest])
        if digest not in loaded:
            if not self._requires_filters:
                return None, None
            return None, (
                "eval_dataset_unchecked",
                f"dataset sha256:{digest} has no registered n-gram filter "
                "(LORAPLEX_EVALUATE_REQUIRES_NGRAM_FILTERS): run `loraplex datasets "
                "build-filter FILE --register`",
            )
        row, ngram_filter = loaded.pop(digest)
        verdict = await asyncio.to_thread(
            check_suite, digest, ngram_filter, row.false_positive_rate, items
        )
        summary = verdict.summary() | {
            "filter_registered_at": row.registered_at.isoformat(),
            "filter_bits": row.bit_count,
        }
        problem = verdict.problem()
        return summary, None if problem is None else ("eval_contaminated", problem)

    def problems(
        self,
        report: EvalReport,
        address: str,
        version_id: int,
        tenant_id: int,
        serving: Serving | None = None,
    ) -> tuple[list[tuple[str, str]], list[Gate], list[int]]:
        """Every problem with `report` as evidence for the version; its gates as judged here
        and the answers' issue times (none when the evidence itself is invalid). `serving`: the
        version the adapter's name serves now, when another one: the baseline must be it."""
        invalid = structure_problems(report) + pattern_problems(report.suite)
        if report.candidate.model != address:
            invalid.append(
                f"the report's candidate is {report.candidate.model!r}, not {address!r} "
                "(run the suite against the exact version)"
            )
        if serving is not None and report.baseline is None:
            invalid.append(
                f"no baseline: the candidate must be compared with what serves now "
                f"(--baseline {serving.address})"
            )
        if invalid:  # a report that does not fit its suite: its receipts would not say more
            return [("eval_evidence_invalid", message) for message in invalid], [], []
        seen: set[str] = set()
        issued: list[int] = []
        invalid += self._run_problems(
            report, report.candidate, tenant_id, seen, issued, {version_id}.__contains__, address
        )
        if report.baseline is not None:
            if serving is not None:
                right, what = {serving.version_id}.__contains__, f"{serving.address} (serving)"
            else:
                right, what = (lambda v: v != version_id), f"a version other than {address}"
            invalid += self._run_problems(
                report, report.baseline, tenant_id, seen, issued, right, what
            )
        if invalid:
            return [("eval_evidence_invalid", message) for message in invalid], [], []
        gates = judge(report.suite, report.candidate, report.baseline)
        failed = [
            ("eval_gate_failed", f"gate {gate.name} failed: {gate.detail}")
            for gate in gates
            if gate.gated and not gate.passed
        ]
        return failed, gates, issued

    def _run_problems(
        self,
        report: EvalReport,
        run: Run,
        tenant_id: int,
        seen: set[str],
        issued: list[int],
        served_right: Callable[[int | None], bool],
        should_be: str,
    ) -> list[str]:
        now = self._clock()
        cases = report.suite.by_id()
        asked: Counter[str] = Counter()  # each case's answers so far: the seed's index
        missing = unknown = wrong = stale = repeated = edited = 0
        versions: set[int | None] = set()
        for generation in run.generations:
            case = cases[generation.case]  # structure_problems: every answer's case exists
            index = asked[case.id]
            asked[case.id] += 1
            text = generation.answer
            if text is None:
                continue  # no answer: the `answered` gate fails it
            response_id, answer_receipt = generation.response_id, generation.receipt
            if response_id is None or answer_receipt is None:
                missing += 1
                continue
            if response_id in seen:
                repeated += 1
                continue
            seen.add(response_id)
            receipt = self._ids.read(response_id, tenant_id=tenant_id)
            if receipt is None:
                unknown += 1
                continue
            seed = run_seed(report.run_id, case.id, index)
            request = encode_request(request_body(run.model, case, seed))
            if not self._ids.answer_matches(answer_receipt, response_id, request, text):
                edited += 1
            elif not served_right(receipt.version_id):
                wrong += 1
            elif now - receipt.issued_at > self._max_age_s:
                stale += 1
            versions.add(receipt.version_id)
            issued.append(receipt.issued_at)
        counts = (
            (missing, "answer(s) without a response id or answer receipt"),
            (
                unknown,
                "response id(s) this gateway did not issue to the report's tenant "
                "(another tenant, a forged id, or another LORAPLEX_FEEDBACK_SECRET)",
            ),
            (
                edited,
                "answer(s) that are not the gateway's answer to the run's request for their "
                "case and repeat (text, prompt, settings or seed changed)",
            ),
            (wrong, f"answer(s) not served by {should_be}"),
            (stale, f"answer(s) older than {self._max_age_s:.0f} s"),
            (repeated, "response id(s) given twice"),
        )
        problems = [f"{run.model}: {count} {what}" for count, what in counts if count]
        if len(versions) > 1:
            problems.append(f"{run.model}: answered by {len(versions)} different versions")
        return problems


def summary(
    report: EvalReport, tenant: str, gates: list[Gate], issued: list[int]
) -> dict[str, object]:
    """What the audit row keeps of the evidence: enough to find and compare it later. The
    times are the answers' own (from their receipts), not the report's word."""
    # ASCII JSON: a lone surrogate in a schema's text has a spelling here too.
    suite_json = json.dumps(report.suite.model_dump(by_alias=True), ensure_ascii=True).encode()
    return {
        "suite": report.suite.name,
        "suite_sha256": hashlib.sha256(suite_json).hexdigest(),
        "cases": len(report.suite.cases),
        "repeat": report.repeat,
        "tenant": tenant,
        "baseline": report.baseline.model if report.baseline is not None else None,
        "answered_from": datetime.fromtimestamp(min(issued), UTC).isoformat() if issued else None,
        "answered_to": datetime.fromtimestamp(max(issued), UTC).isoformat() if issued else None,
        "passed": verdict(gates),
        "gates": {gate.name: gate.detail for gate in gates},
    }
