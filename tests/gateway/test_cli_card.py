"""`loraplex card lint` and `loraplex break-even` as an operator runs them: findings printed,
exit codes, bad input as usage errors; the break-even of the documents' worked example."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.cli_costs import break_even_tokens

RUN = CliRunner()
CARD = {"owner": "ml", "objective": "sft", "training": {"lr": 2e-4, "fleiss_kappa": 0.84}}


def test_lint_prints_findings_and_fails_on_an_error_or_with_strict_on_a_warning(tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD))
    warned = RUN.invoke(app, ["card", "lint", str(card)])
    assert warned.exit_code == 0, warned.output
    assert (
        "warning  datasets: no dataset listed" in warned.output and "2 finding(s)" in warned.output
    )
    assert RUN.invoke(app, ["card", "lint", str(card), "--strict"]).exit_code == 1
    card.write_text(json.dumps({**CARD, "training": {"fleiss_kappa": 0.6}}))
    failed = RUN.invoke(app, ["card", "lint", str(card), "--json"])
    assert failed.exit_code == 1
    first = json.loads(failed.output)[0]
    assert first == {
        "severity": "error",
        "field": "training.fleiss_kappa",
        "message": "annotator agreement (Fleiss κ) 0.6 is outside 0.7..1",
        "source": "000:140",
    }


def test_lint_reads_the_rank_from_the_adapter_folder(tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps(CARD))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 64}))
    flagged = RUN.invoke(app, ["card", "lint", str(card), "--adapter", str(adapter)])
    assert "rank 64 is above 32" in flagged.output
    (adapter / "adapter_config.json").write_text(json.dumps({"r": "big"}))
    bad = RUN.invoke(app, ["card", "lint", str(card), "--adapter", str(adapter)])
    assert bad.exit_code == 2 and "not a positive integer" in bad.output


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "not valid JSON"),
        (json.dumps({"owner": "x"}), "objective"),
        ("[]", "card"),
    ],
)
def test_a_card_that_does_not_validate_is_a_usage_error(tmp_path, text, says):
    card = tmp_path / "card.json"
    card.write_text(text)
    result = RUN.invoke(app, ["card", "lint", str(card)])
    assert result.exit_code == 2 and says in result.output
    assert RUN.invoke(app, ["card", "lint", str(tmp_path / "none.json")]).exit_code == 2


def test_the_documents_worked_example_breaks_even_at_384_million_tokens():
    tokens = break_even_tokens(5700, 15, 0.15)
    assert tokens == pytest.approx(383_838_383.8, rel=1e-9)  # not the 23.1 M the seed prints
    assert break_even_tokens(5700, 1, 1) == math.inf
    shown = RUN.invoke(
        app,
        [
            "break-even",
            *("--fixed-cost", "5700", "--teacher-price", "15", "--student-price", "0.15"),
            *("--tokens-per-request", "1000", "--tokens-per-day", "10000000"),
        ],
    )
    assert shown.exit_code == 0, shown.output
    assert "break-even after 383,838,384 tokens (383.8 M)" in shown.output
    assert "= 383,838 requests of 1000 tokens" in shown.output
    assert "= 38.4 days at 10,000,000 tokens a day" in shown.output
    never = RUN.invoke(
        app, ["break-even", "--fixed-cost", "1", "--teacher-price", "1", "--student-price", "2"]
    )
    assert never.exit_code == 1 and "never" in never.output
    for bad in (["--fixed-cost", "nan"], ["--fixed-cost", "-1"]):
        args = ["break-even", "--teacher-price", "1", "--student-price", "0", *bad]
        assert RUN.invoke(app, args).exit_code == 2
    zero = ["break-even", "--fixed-cost", "1", "--teacher-price", "2", "--student-price", "1"]
    assert RUN.invoke(app, [*zero, "--tokens-per-day", "0"]).exit_code == 2


def test_dpo_check_prints_the_figures_and_fails_on_a_length_bias(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"q{i}", "chosen": "a b c d e f", "rejected": "a b c d e"} for i in range(600)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    passed = RUN.invoke(app, ["card", "dpo-check", str(data), "--scope", "narrow"])
    assert passed.exit_code == 0, passed.output
    assert "pair_length_diff       0.2" in passed.output
    assert "warning  audit_error_rate: 0 pairs audited" in passed.output
    assert RUN.invoke(app, ["card", "dpo-check", str(data), "--strict"]).exit_code == 1
    rows = [
        {"prompt": f"q{i}", "chosen": "a b c d e f g", "rejected": "a b c d e"} for i in range(600)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    failed = RUN.invoke(app, ["card", "dpo-check", str(data), "--json"])
    assert failed.exit_code == 1, failed.output
    body = json.loads(failed.output)
    assert body["figures"]["pair_length_diff"] == 0.4
    assert body["findings"][0]["field"] == "pair_length_diff"


def test_dpo_check_bad_input_is_a_usage_error(tmp_path):
    missing = RUN.invoke(app, ["card", "dpo-check", str(tmp_path / "none.jsonl")])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    data = tmp_path / "pairs.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    scope = RUN.invoke(app, ["card", "dpo-check", str(data), "--scope", "wide"])
    assert scope.exit_code == 2 and "--scope is narrow or broad" in scope.output
    folder = RUN.invoke(app, ["card", "dpo-check", str(tmp_path)])
    assert folder.exit_code == 2 and "cannot read" in folder.output
