"""The Adaptation Card linter (seed (c) bonus: §11's training ranges, κ ≥ 0.70, MinHash 0.85, a
flag on rank > 32): what a card says about how its adapter was made, held to the numbers the
design documents give. Advice, not a gate: the registry stores any valid card; `loraplex card
lint` exits 1 on an error (a rule the documents say halts training) and, with --strict, on a
warning too.

The card's `training` record is free-form, so each rule reads the first of its usual key
spellings that the record has (`learning_rate` or `lr`, ...); a key it does not know is left
alone. Citations name the design documents by file:line, as ../shared/reference/seed-rules.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from registry.card import AdaptationCard, TrainingObjective

Severity = Literal["error", "warning"]
# Seed §4: above rank 32 LoRA is likely the wrong tool (004:798).
RANK_FLAG = 32
SPLIT_TOLERANCE = 0.02


@dataclass(frozen=True)
class Finding:
    severity: Severity
    field: str
    message: str
    source: str  # the design documents' file:line

    def as_dict(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "field": self.field,
            "message": self.message,
            "source": self.source,
        }


@dataclass(frozen=True)
class RangeRule:
    what: str
    keys: tuple[str, ...]
    low: float
    high: float
    severity: Severity
    source: str
    objectives: tuple[TrainingObjective, ...] = ()  # empty: every objective


RULES = (
    RangeRule("learning rate", ("learning_rate", "lr"), 5e-5, 3e-4, "warning", "001:56-59"),
    RangeRule(
        "batch size",
        ("effective_batch_size", "global_batch_size", "batch_size"),
        32,
        128,
        "warning",
        "001:60",
    ),
    RangeRule("weight decay", ("weight_decay",), 0, 0.01, "warning", "001:61"),
    RangeRule(
        "gradient clipping",
        ("max_grad_norm", "grad_clip", "gradient_clipping"),
        0.3,
        1.0,
        "warning",
        "001:62",
    ),
    RangeRule("warmup ratio", ("warmup_ratio",), 0.03, 0.10, "warning", "001:56, 004:403"),
    RangeRule("LoRA dropout", ("lora_dropout", "dropout"), 0.05, 0.1, "warning", "004:401"),
    RangeRule(
        "DPO beta",
        ("dpo_beta", "beta"),
        0.01,
        0.5,
        "warning",
        "004:284, 004:472",
        (TrainingObjective.DPO,),
    ),
    RangeRule(
        "KTO lambda",
        ("kto_lambda", "desirable_weight"),
        1.0,
        1.33,
        "warning",
        "000:128",
        (TrainingObjective.KTO,),
    ),
    RangeRule(
        "DPO pairs",
        ("dpo_pairs", "preference_pairs"),
        500,
        20_000,
        "warning",
        "004:817-818",
        (TrainingObjective.DPO,),
    ),
    # Annotation quality: training halts below κ 0.70.
    RangeRule(
        "annotator agreement (Fleiss κ)", ("fleiss_kappa", "kappa"), 0.70, 1, "error", "000:140"
    ),
    RangeRule("judge acceptance score (of 5)", ("judge_min_score",), 4.0, 5, "warning", "000:147"),
    RangeRule(
        "general or organic data share",
        ("general_data_share", "organic_data_share"),
        0.20,
        1,
        "warning",
        "000:513, 000:545",
    ),
    # Near-duplicates more similar than 0.85 must go: a looser threshold keeps them.
    RangeRule(
        "MinHash dedup threshold",
        ("minhash_threshold", "dedup_threshold"),
        0,
        0.85,
        "warning",
        "000:206-209",
    ),
    RangeRule(
        "preference pair length difference",
        ("pair_length_diff", "dpo_length_diff"),
        0,
        0.20,
        "error",
        "004:819-822",
    ),
    RangeRule(
        "preference audit error rate", ("audit_error_rate",), 0, 0.15, "error", "004:819-822"
    ),
)
SPLITS = (("train_split", 0.8), ("val_split", 0.1), ("test_split", 0.1))


def lint_card(card: AdaptationCard, rank: int | None = None) -> list[Finding]:
    """Every finding, errors first. `rank`: the adapter's (its adapter_config.json `r`), else
    the card's `training.r` / `training.rank` when it records one."""
    findings = [finding for rule in RULES if (finding := _range(card, rule)) is not None]
    findings += _splits(card)
    rank = rank if rank is not None else _rank_recorded(card)
    if rank is not None and rank > RANK_FLAG:
        findings.append(
            Finding(
                "warning",
                "rank",
                f"rank {rank} is above {RANK_FLAG}: a sign LoRA is the wrong tool, and it "
                "costs its rank in host memory and pool pages (`loraplex adapters spectrum` "
                "shows how much of it is used)",
                "004:798",
            )
        )
    if not card.datasets:
        findings.append(
            Finding(
                "warning",
                "datasets",
                "no dataset listed: a dataset revocation cannot find this adapter",
                "000:206-209",
            )
        )
    if not card.evals:
        findings.append(
            Finding(
                "warning",
                "evals",
                "no evaluation results: no promotion past evaluated without them",
                "000:220-226, 000:402-407",
            )
        )
    return sorted(findings, key=lambda f: f.severity != "error")


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _range(card: AdaptationCard, rule: RangeRule) -> Finding | None:
    if rule.objectives and card.objective not in rule.objectives:
        return None
    key = next((k for k in rule.keys if k in card.training), None)
    if key is None:
        return None
    field = f"training.{key}"
    value = _number(card.training[key])
    if value is None:
        return Finding(
            "warning", field, f"{rule.what}: {card.training[key]!r} is not a number", rule.source
        )
    if rule.low <= value <= rule.high:
        return None
    return Finding(
        rule.severity,
        field,
        f"{rule.what} {value:g} is outside {rule.low:g}..{rule.high:g}",
        rule.source,
    )


def _splits(card: AdaptationCard) -> list[Finding]:
    findings = []
    for key, expected in SPLITS:
        if key not in card.training:
            continue
        value = _number(card.training[key])
        if value is None or abs(value - expected) > SPLIT_TOLERANCE:
            findings.append(
                Finding(
                    "warning",
                    f"training.{key}",
                    f"{key} {card.training[key]!r}: the documents split data 80/10/10",
                    "000:133-135",
                )
            )
    return findings


def _rank_recorded(card: AdaptationCard) -> int | None:
    for key in ("r", "rank", "lora_r"):
        value = _number(card.training.get(key))
        if value is not None and value.is_integer():
            return int(value)
    return None
