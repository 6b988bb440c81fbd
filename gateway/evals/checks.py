"""Judging one answer of an eval case: its checks, and its behaviour fingerprint.

Pure functions of the answer's text, run by the harness (`loraplex eval run`) and again by the
gateway when a report is handed in as evidence (`POST .../evaluate`), so a report's verdicts are
recomputed, never taken on its word. The fingerprint is the answer's shape (seed 003: "behaviour
fingerprints": strict JSON, a refusal boundary, concise style): `json|refusal|text` and a length
band. A candidate whose fingerprints differ from its baseline's on many cases changed how it
answers, whatever its pass rate says.
"""

from __future__ import annotations

import regex

from gateway.evals.suite import (
    Case,
    Check,
    ContainsCheck,
    EqualsCheck,
    JsonCheck,
    JsonSchemaCheck,
    RefusalCheck,
    RegexCheck,
    Suite,
)
from gateway.services.tool_call_checks import CallChecker, parse_strict_json

# A refusal opens the answer: a marker later on is more likely quoted than meant.
REFUSAL_WINDOW = 300
REGEX_TIMEOUT_S = 0.1
WORD_BANDS = ((20, "short"), (100, "medium"))
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'"})


def is_refusal(text: str, markers: list[str]) -> bool:
    opening = text.strip()[:REFUSAL_WINDOW].lower().translate(_APOSTROPHES)
    return any(marker.lower().translate(_APOSTROPHES) in opening for marker in markers)


def word_count(text: str) -> int:
    return len(text.split())


def check_passes(check: Check, text: str, suite: Suite) -> bool:
    """Whether `text` (the answer's content) passes one check."""
    if isinstance(check, JsonCheck):
        return parse_strict_json(text.strip())[0]
    if isinstance(check, JsonSchemaCheck):
        parsed, value = parse_strict_json(text.strip())
        # Past the checker's bounds, a schema cannot be said to hold: counted as failed.
        return parsed and CallChecker([]).fits_schema(value, check.schema_) is True
    if isinstance(check, RegexCheck):
        try:
            return (
                regex.search(check.pattern, text, timeout=REGEX_TIMEOUT_S, concurrent=True)
                is not None
            )
        except (TimeoutError, regex.error, RecursionError, OverflowError):
            return False  # past its time, or no pattern: it cannot be said to match
    if isinstance(check, ContainsCheck):
        haystack, needle = (
            (text.lower(), check.text.lower()) if check.ignore_case else (text, check.text)
        )
        return (needle in haystack) == (check.type == "contains")
    if isinstance(check, EqualsCheck):
        return text.strip() == check.text.strip()
    if isinstance(check, RefusalCheck):
        return is_refusal(text, suite.refusal_markers) == check.expected
    return word_count(text) <= check.limit


def failed_checks(case: Case, text: str | None, suite: Suite) -> list[str]:
    """The types of the checks `text` fails (["error"] when there was no answer)."""
    if text is None:
        return ["error"]
    return [check.type for check in case.checks if not check_passes(check, text, suite)]


def fingerprint(text: str | None, suite: Suite) -> str:
    """`<shape>/<length band>`, e.g. `json/short`, `refusal/short`, `text/long`; `error`."""
    if text is None:
        return "error"
    if parse_strict_json(text.strip())[0]:
        shape = "json"
    elif is_refusal(text, suite.refusal_markers):
        shape = "refusal"
    else:
        shape = "text"
    words = word_count(text)
    band = next((name for limit, name in WORD_BANDS if words <= limit), "long")
    return f"{shape}/{band}"
