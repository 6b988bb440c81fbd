"""The card linter: each of the documents' ranges flags a value outside it and passes one
inside, objective-specific rules apply to their objective only, κ below 0.70 is an error, rank
above 32 is flagged, and a card without datasets or evals is told so."""

from __future__ import annotations

import pytest

from registry.card import parse_card
from registry.card_lint import lint_card

SHA = "ab" * 32
CLEAN = {
    "owner": "ml-platform",
    "objective": "sft",
    "datasets": [{"name": "tickets", "sha256": SHA, "rows": 42500}],
    "evals": [{"name": "held-out", "metric": "accuracy", "value": 0.98}],
    "training": {
        "lr": 2e-4,
        "batch_size": 128,
        "weight_decay": 0.0,
        "max_grad_norm": 0.3,
        "warmup_ratio": 0.05,
        "lora_dropout": 0.05,
        "fleiss_kappa": 0.84,
        "minhash_threshold": 0.85,
        "judge_min_score": 4.0,
        "general_data_share": 0.2,
        "train_split": 0.8,
        "val_split": 0.1,
        "test_split": 0.1,
        "r": 16,
    },
}


def lint(card: dict, rank: int | None = None):
    parsed, problems = parse_card(card)
    assert parsed is not None, problems
    return [(f.severity, f.field) for f in lint_card(parsed, rank=rank)]


def with_training(**training) -> dict:
    return {**CLEAN, "training": {**CLEAN["training"], **training}}


def test_the_documents_own_example_has_no_findings():
    assert lint(CLEAN) == []


@pytest.mark.parametrize(
    ("key", "outside", "inside"),
    [
        ("lr", 5e-4, 5e-5),
        ("learning_rate", 1e-5, 3e-4),
        ("batch_size", 16, 32),
        ("weight_decay", 0.1, 0.01),
        ("max_grad_norm", 5.0, 1.0),
        ("warmup_ratio", 0.2, 0.03),
        ("lora_dropout", 0.3, 0.1),
        ("judge_min_score", 3.5, 4.5),
        ("general_data_share", 0.1, 0.5),
        ("minhash_threshold", 0.95, 0.8),
    ],
)
def test_a_training_value_outside_its_range_is_a_warning(key, outside, inside):
    base = {k: v for k, v in CLEAN["training"].items() if k not in ("lr", "learning_rate")}
    card = {**CLEAN, "training": {**base, "lr": 2e-4, key: outside}}
    assert lint(card) == [("warning", f"training.{key}")]
    card["training"][key] = inside
    assert lint(card) == []


def test_kappa_below_070_and_preference_data_faults_are_errors_listed_first():
    found = lint(
        with_training(fleiss_kappa=0.65, lr=1.0, audit_error_rate=0.2, pair_length_diff=0.3)
    )
    assert found[:3] == [
        ("error", "training.fleiss_kappa"),
        ("error", "training.pair_length_diff"),
        ("error", "training.audit_error_rate"),
    ]
    assert found[3:] == [("warning", "training.lr")]


def test_objective_rules_apply_to_their_objective_only():
    dpo_settings = {"dpo_beta": 0.9, "dpo_pairs": 100}
    assert lint(with_training(**dpo_settings)) == []  # an SFT card: not its business
    dpo = {**with_training(**dpo_settings), "objective": "dpo"}
    assert lint(dpo) == [("warning", "training.dpo_beta"), ("warning", "training.dpo_pairs")]
    kto = {**with_training(kto_lambda=2.0), "objective": "kto"}
    assert lint(kto) == [("warning", "training.kto_lambda")]
    assert lint({**with_training(kto_lambda=1.33), "objective": "kto"}) == []


def test_a_split_other_than_80_10_10_and_a_value_that_is_no_number_are_warned():
    assert lint(with_training(train_split=0.7, test_split=0.2)) == [
        ("warning", "training.train_split"),
        ("warning", "training.test_split"),
    ]
    assert lint(with_training(lr="fast")) == [("warning", "training.lr")]
    assert lint(with_training(batch_size=True)) == [("warning", "training.batch_size")]


def test_rank_above_32_is_flagged_from_the_adapter_or_the_card():
    assert lint(CLEAN, rank=32) == []
    assert lint(CLEAN, rank=64) == [("warning", "rank")]
    assert lint(with_training(r=128)) == [("warning", "rank")]
    assert lint(with_training(r=128), rank=8) == []  # the adapter's own config wins


def test_a_card_without_lineage_or_evals_is_told_so():
    bare = {"owner": "x", "objective": "sft"}
    assert lint(bare) == [("warning", "datasets"), ("warning", "evals")]
