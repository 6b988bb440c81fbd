"""Eval suites: the cases `loraplex eval run` sends through the gateway and the checks that
judge each answer (seed §9 release gates; bonus (c): an eval harness through the gateway, with
behaviour fingerprints and sentinels).

A suite is a JSON object (`{"name", ..., "cases": [...]}`) or JSON lines, one case per line.
A case is a chat (`messages`) or a completion (`prompt`) with the checks its answer must pass:

    {"id": "refund-json", "slice": "billing",
     "messages": [{"role": "user", "content": "Refund order 7 as JSON"}],
     "checks": [{"type": "json_schema", "schema": {"type": "object", "required": ["order"]}}]}

A sentinel (`"sentinel": true`) is a case whose exact answer is pinned by an `equals` check
(`loraplex eval run --pin-sentinels` writes them from a run): a pinned answer that moves means
the adapter, the base, the tokenizer or the engine changed under it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

MAX_CASES = 10_000
MAX_SUITE_BYTES = 8 * 1024**2
MAX_PATTERN_CHARS = 500
MAX_SCHEMA_DEPTH = 64
MAX_CHECKS = 20_000  # in a whole suite: each is run again over every answer when it is evidence
# Names kept in the audit row: no control characters (PostgreSQL stores no NUL).
Label = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,200}$")]
CaseId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]
# The first words of a refusal, as assistants phrase it (compared in lower case, within the
# answer's first REFUSAL_WINDOW characters); a suite may give its own.
DEFAULT_REFUSAL_MARKERS = (
    "i can't",
    "i cannot",
    "i can not",
    "i won't",
    "i will not",
    "i'm sorry",
    "i am sorry",
    "i'm unable",
    "i am unable",
    "i'm not able",
    "i am not able",
    "i must decline",
    "as an ai",
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class JsonCheck(_Strict):
    """The whole answer is strict JSON (no NaN or Infinity)."""

    type: Literal["json"]


class JsonSchemaCheck(_Strict):
    """The answer is JSON matching `schema` (the gateway's bounded checker: type, enum, const,
    properties, required, items, lengths, bounds, allOf/anyOf, local $ref)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    @field_validator("schema_")
    @classmethod
    def _writable(cls, value: dict[str, Any]) -> dict[str, Any]:
        # What a report could not be written back as JSON with: past this depth, or text that
        # is no Unicode (a lone surrogate, which JSON's \u escapes can spell).
        if (problem := _schema_problem(value)) is not None:
            raise ValueError(problem)
        return value


class RegexCheck(_Strict):
    """`pattern` (Python syntax, run by the `regex` module: each search has REGEX_TIMEOUT_S, past
    which the check fails, and releases the GIL) is found in the answer. Compiled when a suite
    is loaded or judged (`pattern_problems`), not when a report is parsed: 10,000 patterns take
    half a second, which a request body must not hold the event loop for."""

    type: Literal["regex"]
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)


class ContainsCheck(_Strict):
    type: Literal["contains", "not_contains"]
    text: str = Field(min_length=1, max_length=10_000)
    ignore_case: bool = False


class EqualsCheck(_Strict):
    """The answer, stripped of surrounding whitespace, is exactly `text`."""

    type: Literal["equals"]
    text: str = Field(max_length=100_000)


class RefusalCheck(_Strict):
    """The refusal boundary: the answer refuses (`expected` true) or does not (false)."""

    type: Literal["refusal"]
    expected: bool


class MaxWordsCheck(_Strict):
    """Concise style: at most `limit` words."""

    type: Literal["max_words"]
    limit: int = Field(ge=1, le=1_000_000)


Check = Annotated[
    JsonCheck
    | JsonSchemaCheck
    | RegexCheck
    | ContainsCheck
    | EqualsCheck
    | RefusalCheck
    | MaxWordsCheck,
    Field(discriminator="type"),
]
FORMAT_CHECKS = ("json", "json_schema")


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class Case(_Strict):
    id: CaseId
    slice: Label | None = None
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)
    prompt: str | None = Field(None, max_length=1_000_000)
    max_tokens: int = Field(128, ge=1, le=32_768)
    temperature: float = Field(0.0, ge=0, le=2)
    checks: list[Check] = Field(default_factory=list, max_length=32)
    sentinel: bool = False

    @model_validator(mode="after")
    def _chat_or_completion(self) -> Case:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a case has either `messages` (chat) or `prompt` (completion)")
        pins = [check for check in self.checks if check.type == "equals"]
        if self.sentinel and len(pins) > 1:
            raise ValueError("a sentinel pins one answer: at most one `equals` check")
        return self

    @property
    def pinned(self) -> str | None:
        """A sentinel's pinned answer; None when it has none yet."""
        if not self.sentinel:
            return None
        return next((check.text for check in self.checks if check.type == "equals"), None)


class Suite(_Strict):
    name: Label = "suite"
    # A case passing on the baseline and failing on the candidate is a regression; at most
    # this share of the cases may regress, and each slice's success may fall at most this much.
    max_regression: float = Field(0.02, ge=0, le=1)
    min_success: float | None = Field(None, ge=0, le=1)
    # Share of cases whose behaviour fingerprint may differ from the baseline's (None: shown,
    # not gated).
    max_fingerprint_shift: float | None = Field(None, ge=0, le=1)
    refusal_markers: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_MARKERS), min_length=1, max_length=200
    )
    cases: list[Case] = Field(min_length=1, max_length=MAX_CASES)

    @model_validator(mode="after")
    def _ids_unique(self) -> Suite:
        seen: set[str] = set()
        for case in self.cases:
            if case.id in seen:
                raise ValueError(f"case id {case.id!r} appears twice")
            seen.add(case.id)
        if (checks := sum(len(case.checks) for case in self.cases)) > MAX_CHECKS:
            raise ValueError(f"{checks} checks in the suite; at most {MAX_CHECKS}")
        return self

    def by_id(self) -> dict[str, Case]:
        return {case.id: case for case in self.cases}


class SuiteError(ValueError):
    """A suite file that cannot be read or does not validate; the message says where."""


def load_suite(path: Path) -> Suite:
    """A suite from a JSON file (`{"name", ..., "cases": [...]}`) or JSON lines (one case per
    line, the suite's settings at their defaults, named after the file)."""
    try:
        if path.stat().st_size > MAX_SUITE_BYTES:
            raise SuiteError(f"{path}: larger than {MAX_SUITE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"{path}: {exc}") from exc
    try:
        if path.suffix == ".jsonl":
            cases = [
                json.loads(line, parse_constant=_no_constants)
                for line in text.splitlines()
                if line.strip()
            ]
            data: Any = {"name": path.stem, "cases": cases}
        else:
            data = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        raise SuiteError(f"{path}: not valid JSON: {exc!r}") from exc
    try:
        suite = Suite.model_validate(data)
    except ValueError as exc:
        raise SuiteError(f"{path}: {exc}") from exc
    if problems := pattern_problems(suite):
        raise SuiteError(f"{path}: {'; '.join(problems)}")
    return suite


def pattern_problems(suite: Suite) -> list[str]:
    """Each `regex` check whose pattern does not compile, by case."""
    problems = []
    for case in suite.cases:
        for check in case.checks:
            if isinstance(check, RegexCheck):
                try:
                    regex.compile(check.pattern)
                except (regex.error, RecursionError, OverflowError) as exc:
                    problems.append(f"case {case.id}: not a regular expression: {exc}")
    return problems


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _schema_problem(value: Any) -> str | None:
    """Iteratively (a deep value must not recurse here)."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "a schema with text that is not Unicode (a lone surrogate)"
        elif isinstance(item, dict | list):
            if level > MAX_SCHEMA_DEPTH:
                return f"a schema nested deeper than {MAX_SCHEMA_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return None
