"""An eval suite checked against the datasets a version was trained on (seed §9: firewall eval
data): each case's prompt, each of its user and assistant messages (a system prompt is the
deployment's, shared with training by design, and no eval item) and its reference answers
(`equals` and `contains` texts) are looked up in each dataset's registered n-gram filter
(registry/ngram_filter.py), each part on its own, as training texts are hashed per string: a
case is contaminated when any part is (70 % of its 8-word sequences found, parts of 10 words or
more). A version evaluated on cases its data held would show recall, not skill."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.evals.suite import Case, ContainsCheck, EqualsCheck, Suite
from registry.ngram_filter import NgramFilter, Overlap, hashed, overlaps

MAX_NAMED = 20  # contaminated cases named in a message; the rest counted
HashedItems = list[tuple[str, np.ndarray]]


def case_parts(case: Case) -> list[tuple[str, str]]:
    """(`<case id>:<part>`, text) of the case's prompt or messages and its reference answers."""
    if case.prompt is not None:
        parts = [(f"{case.id}:prompt", case.prompt)]
    else:
        parts = [
            (f"{case.id}:message{i}", message.content)
            for i, message in enumerate(case.messages or [])
            if message.role != "system"
        ]
    references = (
        check.text
        for check in case.checks
        if isinstance(check, EqualsCheck)
        or (isinstance(check, ContainsCheck) and check.type == "contains")
    )
    parts += [(f"{case.id}:answer{i}", text) for i, text in enumerate(references)]
    return parts or [(f"{case.id}:none", "")]  # nothing to judge: counted as unjudged


def hash_suite(suite: Suite) -> HashedItems:
    """Every part of every case with its n-gram hashes (once, whatever the datasets)."""
    return hashed(part for case in suite.cases for part in case_parts(case))


@dataclass(frozen=True)
class Contamination:
    """One dataset's verdict on one suite."""

    dataset_sha256: str
    false_positive_rate: float
    ngram_words: int
    parts: list[Overlap]

    @property
    def contaminated_cases(self) -> list[str]:
        cases = (part.item.rpartition(":")[0] for part in self.parts if part.contaminated)
        return list(dict.fromkeys(cases))

    @property
    def unjudged_cases(self) -> list[str]:
        """Cases none of whose parts is long enough to judge."""
        judged: dict[str, bool] = {}
        for part in self.parts:
            case = part.item.rpartition(":")[0]
            judged[case] = judged.get(case, False) or part.judged
        return [case for case, yes in judged.items() if not yes]

    def problem(self) -> str | None:
        cases = self.contaminated_cases
        if not cases:
            return None
        named = ", ".join(cases[:MAX_NAMED])
        more = f" and {len(cases) - MAX_NAMED} more" if len(cases) > MAX_NAMED else ""
        return (
            f"dataset sha256:{self.dataset_sha256} holds {len(cases)} of the suite's cases "
            f"(>= 70 % of the {self.ngram_words}-word sequences of a prompt, message or answer; "
            "the filter's false-positive "
            f"rate is {self.false_positive_rate:.3%}): {named}{more}"
        )

    def summary(self) -> dict[str, object]:
        return {
            "contaminated": self.contaminated_cases,
            "unjudged": len(self.unjudged_cases),
            "false_positive_rate": self.false_positive_rate,
        }


def check_suite(
    dataset_sha256: str,
    ngram_filter: NgramFilter,
    false_positive_rate: float,
    suite: Suite | HashedItems,
) -> Contamination:
    items = hash_suite(suite) if isinstance(suite, Suite) else suite
    return Contamination(
        dataset_sha256, false_positive_rate, ngram_filter.ngram_words, overlaps(ngram_filter, items)
    )
