"""The Adaptation Card (seed §2): an optional, schema-validated JSON document per version.

Stored verbatim (as validated and normalised JSON) with the immutable version it describes.
Unknown fields are refused everywhere except `training`, a free-form record of how the adapter
was made. Thresholds here override the gateway's rollback defaults for this adapter; the
rollback target is checked by the service against the registry (exists, same base, visible to
the same tenant, no cycle). Signatures are not verified yet (a later issue).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from registry.compat.problems import Problem, ProblemCode
from registry.naming import name_problem
from registry.text_checks import nul_path

MAX_CARD_BYTES = 256 * 1024
MAX_TRAINING_FIELDS = 64


def _strip_sha_prefix(value: str) -> str:
    return value.removeprefix("sha256:")


def _valid_target(value: str) -> str:
    if value == "base":
        return value
    name, _, version = value.partition("@")
    problem = name_problem(name)
    if problem or (version and not (version.isdigit() and int(version) > 0)):
        raise ValueError("must be 'base', an adapter name or name@version")
    return value


Sha256 = Annotated[
    str,
    StringConstraints(pattern=r"^(sha256:)?[0-9a-f]{64}$"),
    AfterValidator(_strip_sha_prefix),
]
Text = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
Tag = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
RollbackTarget = Annotated[str, AfterValidator(_valid_target)]
Scalar = str | int | float | bool | None


class TrainingObjective(StrEnum):
    SFT = "sft"
    DPO = "dpo"
    KTO = "kto"
    ORPO = "orpo"
    DISTILLATION = "distillation"
    CONTINUED_PRETRAINING = "continued_pretraining"
    SAFETY_GUARDRAIL = "safety_guardrail"
    OTHER = "other"


class MergePolicy(StrEnum):
    DYNAMIC = "dynamic"
    STATIC_TIES = "static_ties"


class LicenseTag(StrEnum):
    COMMERCIAL_OK = "COMMERCIAL_OK"
    SHAREALIKE = "SHAREALIKE"
    PARTNER_ONLY = "PARTNER_ONLY"
    ATTRIBUTION_REQUIRED = "ATTRIBUTION_REQUIRED"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class StackingPolicy(_Strict):
    """Which adapters may share a token segment with this one; exclusive by default."""

    mode: Literal["exclusive", "allow_listed"] = "exclusive"
    with_objectives: list[TrainingObjective] = Field(default_factory=list, max_length=16)
    with_adapters: list[Tag] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _lists_match_mode(self) -> StackingPolicy:
        listed = bool(self.with_objectives or self.with_adapters)
        if self.mode == "exclusive" and listed:
            raise ValueError("an exclusive policy lists no objectives or adapters")
        if self.mode == "allow_listed" and not listed:
            raise ValueError("allow_listed needs with_objectives or with_adapters")
        return self


class ServingSLA(_Strict):
    p95_ttft_ms: float | None = Field(None, gt=0, le=600_000)
    p95_e2e_ms: float | None = Field(None, gt=0, le=3_600_000)
    concurrency: int | None = Field(None, ge=1, le=100_000)


class RollbackTriggers(_Strict):
    """Either absolute p95 limits or SLA + margin (the seeds give both; the planner chooses)."""

    p95_ttft_abs_ms: float | None = Field(None, gt=0, le=600_000)
    p95_e2e_abs_ms: float | None = Field(None, gt=0, le=3_600_000)
    margin_ms: float | None = Field(None, ge=0, le=600_000)
    error_rate: float | None = Field(None, gt=0, le=1)
    window_requests: int = Field(100, ge=10, le=100_000)
    # Rolls back when the share of successful feedback verdicts over a window falls below it.
    task_success_min: float | None = Field(None, ge=0, le=1)
    # Rolls back when the share of valid tool calls (tool_choice "auto") over a window falls
    # below it.
    tool_call_validity_min: float | None = Field(None, ge=0, le=1)


class DriftReference(_Strict):
    """Prompt drift (gateway/prompt_drift.py): the dev set's prompt perplexity under this
    adapter on its base, and the ratio above which live traffic has drifted from it."""

    dev_perplexity: float | None = Field(None, ge=1, le=1e9)
    max_ratio: float = Field(1.5, gt=1, le=1000)


class DatasetRef(_Strict):
    name: Text
    sha256: Sha256
    rows: int | None = Field(None, ge=0)
    license: LicenseTag | None = None


class EvalResult(_Strict):
    name: Text
    metric: Text
    value: float
    baseline: float | None = None
    passed: bool | None = None


class AdaptationCard(_Strict):
    schema_version: Literal[1] = 1
    owner: Text
    alert_id: Text | None = None
    objective: TrainingObjective
    description: str | None = Field(None, max_length=4000)
    base_sha256: Sha256 | None = None
    tokenizer_sha256: Sha256 | None = None
    merge_policy: MergePolicy = MergePolicy.DYNAMIC
    stacking: StackingPolicy = Field(default_factory=StackingPolicy)
    rollback_path: RollbackTarget = "base"
    sla: ServingSLA | None = None
    rollback: RollbackTriggers | None = None
    drift: DriftReference | None = None
    datasets: list[DatasetRef] = Field(default_factory=list, max_length=100)
    evals: list[EvalResult] = Field(default_factory=list, max_length=200)
    licenses: list[LicenseTag] = Field(default_factory=list, max_length=8)
    tags: list[Tag] = Field(default_factory=list, max_length=32)
    training: dict[Annotated[str, StringConstraints(max_length=64)], Scalar] = Field(
        default_factory=dict, max_length=MAX_TRAINING_FIELDS
    )
    chat_template: str | None = Field(None, max_length=65_536)

    @model_validator(mode="after")
    def _margin_needs_sla(self) -> AdaptationCard:
        has_sla = self.sla is not None and (
            self.sla.p95_ttft_ms is not None or self.sla.p95_e2e_ms is not None
        )
        if self.rollback is not None and self.rollback.margin_ms is not None and not has_sla:
            raise ValueError("rollback.margin_ms is relative to an SLA: set sla.p95_*_ms")
        return self


def parse_card(
    data: Mapping[str, Any] | str | bytes | None,
) -> tuple[AdaptationCard | None, list[Problem]]:
    """Validate a card; returns (card, []) or (None, one Problem per schema error)."""
    if data is None:
        return None, []
    if isinstance(data, str | bytes):
        if len(data) > MAX_CARD_BYTES:
            return None, [Problem(ProblemCode.CARD_INVALID, f"card exceeds {MAX_CARD_BYTES} bytes")]
        try:
            data = json.loads(data, parse_constant=_NonFinite)
        except ValueError as exc:
            return None, [Problem(ProblemCode.CARD_INVALID, f"card is not valid JSON: {exc}")]
        except RecursionError:
            return None, [Problem(ProblemCode.CARD_INVALID, "card JSON is nested too deeply")]
        if constants := _non_finite(data):
            return None, [
                Problem(
                    ProblemCode.CARD_INVALID,
                    f"{where}: {value} is not allowed (JSON has no NaN or Infinity)",
                )
                for where, value in constants
            ]
    if (where := nul_path(data)) is not None:
        shown = f"card.{where}" if where else "card"
        return None, [Problem(ProblemCode.CARD_INVALID, f"{shown}: NUL characters are not allowed")]
    try:
        return AdaptationCard.model_validate(data), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            where = ".".join(str(part) for part in error["loc"]) or "card"
            problems.append(Problem(ProblemCode.CARD_INVALID, f"card.{where}: {error['msg']}"))
        return None, problems


class _NonFinite(str):
    """NaN, Infinity or -Infinity where the card text has one: held as a marker so the error
    can name the field (Python's json would make it a float, which JSON does not have)."""


def _non_finite(data: Any) -> list[tuple[str, str]]:
    """(dotted path, literal) of every NaN/Infinity marker in parsed card JSON."""
    found: list[tuple[str, str]] = []
    pending: list[tuple[str, Any]] = [("card", data)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, _NonFinite):
            found.append((where, str(item)))
        elif isinstance(item, dict):
            pending.extend((f"{where}.{key}", value) for key, value in item.items())
        elif isinstance(item, list):
            pending.extend((f"{where}.{i}", value) for i, value in enumerate(item))
    return sorted(found)


def card_json(card: AdaptationCard) -> dict[str, Any]:
    """The normalised JSON stored with the version (defaults filled in, enums as strings)."""
    return card.model_dump(mode="json")


def derived_card(
    card: Mapping[str, Any] | None, *, owner: str, **training: Scalar
) -> dict[str, Any]:
    """The card of a version made from another's weights (e.g. truncated to a lower rank):
    the same record with no evaluations, since it is a new behaviour to be evaluated as itself,
    and `training` added to how it was made. A source without a card gets a minimal one
    (`owner`, objective "other"), so the derivation is on record for lineage all the same.
    Raises ValueError when the record would exceed MAX_TRAINING_FIELDS."""
    if card is None:
        return {"owner": owner, "objective": TrainingObjective.OTHER.value, "training": training}
    joined = {**(card.get("training") or {}), **training}
    if len(joined) > MAX_TRAINING_FIELDS:
        raise ValueError(
            f"its card's training record has {len(joined) - len(training)} fields; with the "
            f"{len(training)} this adds it would pass the card's limit of {MAX_TRAINING_FIELDS}"
        )
    return {**card, "evals": [], "training": joined}
