"""The DPO dataset checker (seed (c) bonus; 004:817-822): a preference dataset measured, not
described. Pairs: 500-1k for a narrow behaviour, 5k-20k for a broad one. It fails when the
chosen and rejected answers' lengths differ by more than 20 % (the policy learns "longer wins",
not the preference) or when more than 15 % of the audited pairs are wrong.

Input: JSON lines, one pair each, in TRL's preference formats: `prompt` (text or messages),
`chosen` and `rejected` (text, or message lists whose last assistant message is the answer).
Without a `prompt` (TRL's implicit prompt), text answers lose the words both begin with, which
are the prompt. Lengths are in words. An audit (optional)
is JSON lines of `{"pair": <0-based line of the pair>, "verdict": "correct" | "wrong"}`, one per
audited pair. The figures it measures are the card's (`training.dpo_pairs`,
`training.pair_length_diff`, `training.audit_error_rate`), which `loraplex card lint` holds to
the same limits.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from registry.card_lint import Finding

Scope = Literal["narrow", "broad"]
PAIRS = {"narrow": (500, 1_000), "broad": (5_000, 20_000)}  # 004:817-818
MAX_LENGTH_DIFF = 0.20  # 004:819-822
MAX_AUDIT_ERROR_RATE = 0.15  # 004:819-822
MIN_AUDITED = 50  # fewer: the error rate is too uncertain to judge (±14 points at 95 %)
MAX_NAMED = 10  # lines named in a finding; the rest counted
SOURCE = "004:817-822"


@dataclass
class DpoReport:
    pairs: int = 0
    chosen_words: int = 0
    rejected_words: int = 0
    chosen_longer: int = 0
    identical: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    invalid: list[tuple[int, str]] = field(default_factory=list)
    duplicates: int = 0
    audited: int = 0
    audit_errors: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def length_bias(self) -> bool:
        """The mean lengths more than MAX_LENGTH_DIFF apart (exactly: totals, not float means;
        one side's answers all empty is flagged as empty answers instead)."""
        shorter = min(self.chosen_words, self.rejected_words)
        return bool(shorter) and abs(self.chosen_words - self.rejected_words) * 5 > shorter

    @property
    def length_diff(self) -> float | None:
        """|mean chosen - mean rejected| over the shorter mean (0.35: one side 35 % longer);
        None without pairs or when one side's answers are all empty (flagged as such)."""
        if not self.pairs:
            return None
        chosen, rejected = self.chosen_words / self.pairs, self.rejected_words / self.pairs
        shorter = min(chosen, rejected)
        return abs(chosen - rejected) / shorter if shorter else None

    @property
    def audit_error_rate(self) -> float | None:
        return self.audit_errors / self.audited if self.audited else None

    def figures(self) -> dict[str, Any]:
        diff = self.length_diff
        return {
            "dpo_pairs": self.pairs,
            "chosen_mean_words": round(self.chosen_words / self.pairs, 2) if self.pairs else None,
            "rejected_mean_words": (
                round(self.rejected_words / self.pairs, 2) if self.pairs else None
            ),
            "pair_length_diff": None if diff is None else round(diff, 4),
            "chosen_longer_share": round(self.chosen_longer / self.pairs, 4)
            if self.pairs
            else None,
            "audited": self.audited,
            "audit_error_rate": self.audit_error_rate,
            "identical_pairs": len(self.identical),
            "empty_answers": len(self.empty),
            "duplicate_pairs": self.duplicates,
            "invalid_lines": len(self.invalid),
        }


def _answer(value: Any) -> str | None:
    """The answer's text: a string, or the last assistant message of a conversation."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        assistant = [m for m in value if isinstance(m, dict) and m.get("role") == "assistant"]
        last = (assistant or value)[-1]
        if isinstance(last, dict) and isinstance(last.get("content"), str):
            return str(last["content"])
    return None


def _without_shared_start(chosen: str, rejected: str) -> tuple[str, str]:
    """TRL's implicit prompt: the words both texts begin with are the prompt, not the answer."""
    a, b = chosen.split(), rejected.split()
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
        shared += 1
    return " ".join(a[shared:]), " ".join(b[shared:])


def _pairs(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except (ValueError, RecursionError):
                    yield number, None


def _named(lines: list[int]) -> str:
    shown = ", ".join(str(n + 1) for n in lines[:MAX_NAMED])
    return shown + (f" and {len(lines) - MAX_NAMED} more" if len(lines) > MAX_NAMED else "")


def check_pairs(path: Path, scope: Scope | None = None, audit: Path | None = None) -> DpoReport:
    """Measure the dataset (and its audit) and judge it. Raises OSError on an unreadable file."""
    report = DpoReport()
    seen: set[tuple[str, ...]] = set()
    pair_lines: set[int] = set()
    for number, row in _pairs(path):
        chosen = _answer(row.get("chosen")) if isinstance(row, dict) else None
        rejected = _answer(row.get("rejected")) if isinstance(row, dict) else None
        if chosen is None or rejected is None:
            why = "not JSON" if row is None else "no `chosen` and `rejected` answers"
            report.invalid.append((number, why))
            continue
        report.pairs += 1
        pair_lines.add(number)
        if chosen.strip() == rejected.strip():
            report.identical.append(number)
        elif "prompt" not in row and isinstance(row["chosen"], str):
            chosen, rejected = _without_shared_start(chosen, rejected)
        if not chosen.strip() or not rejected.strip():
            report.empty.append(number)
        chosen_words, rejected_words = len(chosen.split()), len(rejected.split())
        report.chosen_words += chosen_words
        report.rejected_words += rejected_words
        report.chosen_longer += chosen_words > rejected_words
        key = tuple(
            json.dumps(row.get(k), sort_keys=True) for k in ("prompt", "chosen", "rejected")
        )
        report.duplicates += key in seen
        seen.add(key)
    if audit is not None:
        _read_audit(audit, pair_lines, report)
    report.findings = _judge(report, scope)
    return report


def _read_audit(audit: Path, pair_lines: set[int], report: DpoReport) -> None:
    judged: set[int] = set()
    for number, row in _pairs(audit):
        pair = row.get("pair") if isinstance(row, dict) else None
        verdict = row.get("verdict") if isinstance(row, dict) else None
        if (
            isinstance(pair, bool)
            or not isinstance(pair, int)
            or pair not in pair_lines
            or verdict not in ("correct", "wrong")
        ):
            report.invalid.append(
                (number, f"audit line {number + 1}: no pair of the dataset or no verdict")
            )
            continue
        if pair in judged:
            report.invalid.append((number, f"audit line {number + 1}: pair {pair} judged twice"))
            continue
        judged.add(pair)
        report.audited += 1
        report.audit_errors += verdict == "wrong"


def _judge(report: DpoReport, scope: Scope | None) -> list[Finding]:
    found: list[Finding] = []
    if report.invalid:
        lines = [n for n, _ in report.invalid]
        found.append(
            Finding(
                "error",
                "lines",
                f"{len(lines)} line(s) are not pairs (first: {report.invalid[0][1]}): "
                f"lines {_named(lines)}",
                SOURCE,
            )
        )
    if not report.pairs:
        found.append(Finding("error", "pairs", "no preference pairs", SOURCE))
        return found
    low, high = PAIRS[scope] if scope is not None else (PAIRS["narrow"][0], PAIRS["broad"][1])
    if not low <= report.pairs <= high:
        what = f"a {scope} behaviour" if scope else "DPO"
        found.append(
            Finding(
                "warning",
                "pairs",
                f"{report.pairs} pairs; {what} takes {low}..{high}",
                "004:817-818",
            )
        )
    diff = report.length_diff
    if diff is not None and report.length_bias:
        longer = "chosen" if report.chosen_words > report.rejected_words else "rejected"
        found.append(
            Finding(
                "error",
                "pair_length_diff",
                f"the {longer} answers are {diff:.0%} longer on average (at most "
                f"{MAX_LENGTH_DIFF:.0%}): the policy would learn length, not the preference",
                SOURCE,
            )
        )
    for lines, what in ((report.empty, "an empty answer"), (report.identical, "identical answers")):
        if lines:
            found.append(
                Finding(
                    "error",
                    "pairs",
                    f"{len(lines)} pair(s) with {what}: lines {_named(lines)}",
                    SOURCE,
                )
            )
    if report.duplicates:
        found.append(Finding("warning", "pairs", f"{report.duplicates} duplicate pair(s)", SOURCE))
    rate = report.audit_error_rate
    if rate is not None and rate > MAX_AUDIT_ERROR_RATE:
        found.append(
            Finding(
                "error",
                "audit_error_rate",
                f"{report.audit_errors} of {report.audited} audited pairs are wrong ({rate:.1%}; "
                f"at most {MAX_AUDIT_ERROR_RATE:.0%})",
                SOURCE,
            )
        )
    if report.audited < MIN_AUDITED:
        found.append(
            Finding(
                "warning",
                "audit_error_rate",
                f"{report.audited} pairs audited: audit at least {MIN_AUDITED} to judge the "
                f"error rate against {MAX_AUDIT_ERROR_RATE:.0%}",
                SOURCE,
            )
        )
    return sorted(found, key=lambda f: f.severity != "error")
