"""The DPO dataset checker on real files: a balanced, audited set of the right size passes with
its figures measured; answers 20 % apart in length pass and 21 % apart fail (either side
longer); an audit with 16 % wrong fails and 15 % passes; conversational pairs are measured on
their last assistant message; empty, identical, duplicate and broken lines are named; the pair
count is held to its scope; a lone audit or one naming no pair is flagged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from registry.dpo_check import check_pairs


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def pairs(count: int, chosen: int, rejected: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"question {i}", "chosen": words(chosen, f"c{i}_"), "rejected": words(rejected)}
        for i in range(count)
    ]


def audit(path: Path, wrong: int, total: int) -> Path:
    rows = [{"pair": i, "verdict": "wrong" if i < wrong else "correct"} for i in range(total)]
    return write(path, rows)


def codes(report) -> list[tuple[str, str]]:
    return [(f.severity, f.field) for f in report.findings]


def test_a_balanced_audited_set_of_its_scopes_size_passes_with_its_figures(tmp_path) -> None:
    data = write(tmp_path / "p.jsonl", [*pairs(600, 12, 10), ""])
    report = check_pairs(data, "narrow", audit(tmp_path / "a.jsonl", wrong=9, total=60))
    assert codes(report) == []
    assert report.figures() == {
        "dpo_pairs": 600,
        "chosen_mean_words": 12.0,
        "rejected_mean_words": 10.0,
        "pair_length_diff": 0.2,
        "chosen_longer_share": 1.0,
        "audited": 60,
        "audit_error_rate": 0.15,
        "identical_pairs": 0,
        "empty_answers": 0,
        "duplicate_pairs": 0,
        "invalid_lines": 0,
    }


@pytest.mark.parametrize(
    ("chosen", "rejected", "fails"), [(121, 100, True), (100, 121, True), (120, 100, False)]
)
def test_answers_more_than_20_percent_apart_fail(tmp_path, chosen, rejected, fails) -> None:
    report = check_pairs(write(tmp_path / "p.jsonl", pairs(500, chosen, rejected)))
    assert (("error", "pair_length_diff") in codes(report)) is fails
    if fails:
        longer = "chosen" if chosen > rejected else "rejected"
        assert f"the {longer} answers are 21% longer" in report.findings[0].message


def test_an_audit_with_more_than_15_percent_wrong_fails(tmp_path) -> None:
    data = write(tmp_path / "p.jsonl", pairs(500, 10, 10))
    failed = check_pairs(data, audit=audit(tmp_path / "a.jsonl", wrong=16, total=100))
    assert codes(failed) == [("error", "audit_error_rate")]
    assert failed.findings[0].message.startswith("16 of 100 audited pairs are wrong (16.0%")
    few = check_pairs(data, audit=audit(tmp_path / "b.jsonl", wrong=0, total=10))
    assert codes(few) == [("warning", "audit_error_rate")]
    unaudited = check_pairs(data)
    assert codes(unaudited) == [("warning", "audit_error_rate")]
    assert unaudited.figures()["audit_error_rate"] is None


def test_conversations_are_measured_on_their_last_assistant_message(tmp_path) -> None:
    def conversation(answer: str) -> list[dict[str, str]]:
        return [
            {"role": "user", "content": words(50, "long-question")},
            {"role": "assistant", "content": answer},
        ]

    rows = [
        {"chosen": conversation(words(10, f"a{i}")), "rejected": conversation(words(10))}
        for i in range(500)
    ]
    report = check_pairs(write(tmp_path / "p.jsonl", rows))
    assert report.figures()["chosen_mean_words"] == 10.0
    assert report.figures()["pair_length_diff"] == 0.0


def test_empty_identical_duplicate_and_broken_lines_are_named(tmp_path) -> None:
    rows: list[Any] = pairs(500, 10, 10)
    rows[3] = {"prompt": "p", "chosen": "same answer", "rejected": " same answer "}
    rows[7] = {"prompt": "p", "chosen": "", "rejected": words(10)}
    rows.append(dict(rows[0]))
    rows += ["{not json", {"prompt": "p", "chosen": "only one side"}, [1, 2]]
    report = check_pairs(write(tmp_path / "p.jsonl", rows), audit=None)
    messages = {f.message.split(":")[0]: f for f in report.findings}
    assert messages["3 line(s) are not pairs (first"].severity == "error"
    assert report.findings[0].message.endswith("lines 502, 503, 504")
    assert messages["1 pair(s) with an empty answer"].message.endswith("lines 8")
    assert messages["1 pair(s) with identical answers"].message.endswith("lines 4")
    assert messages["1 duplicate pair(s)"].severity == "warning"


@pytest.mark.parametrize(
    ("count", "scope", "warned"),
    [(499, None, True), (500, None, False), (1_500, "narrow", True), (1_500, "broad", True)],
)
def test_the_pair_count_is_held_to_its_scope(tmp_path, count, scope, warned) -> None:
    report = check_pairs(write(tmp_path / "p.jsonl", pairs(count, 10, 10)), scope)
    assert (("warning", "pairs") in codes(report)) is warned


def test_an_audit_naming_no_pair_or_one_twice_is_refused_and_no_pairs_is_an_error(tmp_path):
    data = write(tmp_path / "p.jsonl", pairs(500, 10, 10))
    bad = write(
        tmp_path / "a.jsonl",
        [
            {"pair": 0, "verdict": "correct"},
            {"pair": 0, "verdict": "wrong"},
            {"pair": 9999, "verdict": "correct"},
            {"pair": True, "verdict": "correct"},
            {"pair": 1, "verdict": "maybe"},
        ],
    )
    report = check_pairs(data, audit=bad)
    assert report.audited == 1 and len(report.invalid) == 4
    assert ("error", "lines") in codes(report)
    empty = check_pairs(write(tmp_path / "none.jsonl", ["", "  "]))
    assert ("error", "pairs") in codes(empty) and empty.figures()["dpo_pairs"] == 0


def test_exactly_20_percent_passes_whatever_floating_point_makes_of_the_means(tmp_path) -> None:
    # Means of 3.6 and 3.0 words: 0.6 / 3.0 is 0.20000000000000004 in floating point.
    rows = pairs(250, 4, 3) + pairs(250, 3, 3)
    report = check_pairs(write(tmp_path / "p.jsonl", rows))
    assert report.figures()["chosen_mean_words"] == 3.5
    rows = pairs(300, 4, 3) + pairs(200, 3, 3)
    report = check_pairs(write(tmp_path / "q.jsonl", rows))
    assert report.figures()["chosen_mean_words"] == 3.6
    assert report.figures()["pair_length_diff"] == 0.2
    assert ("error", "pair_length_diff") not in codes(report)


def test_an_implicit_prompt_is_not_counted_in_the_answers_lengths(tmp_path) -> None:
    """TRL's implicit-prompt format: chosen and rejected both start with the prompt."""
    prompt = words(100, "p")
    rows = [
        {"chosen": f"{prompt} {words(30, f'c{i}_')}", "rejected": f"{prompt} {words(10)}"}
        for i in range(500)
    ]
    report = check_pairs(write(tmp_path / "p.jsonl", rows))
    assert report.figures()["chosen_mean_words"] == 30.0
    assert report.figures()["pair_length_diff"] == 2.0
    assert ("error", "pair_length_diff") in codes(report)
    assert report.figures()["duplicate_pairs"] == 0


def test_conversations_with_the_same_last_answers_are_no_duplicates(tmp_path) -> None:
    def chat(question: str, answer: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    rows = [
        {"chosen": chat(f"question {i}", "yes indeed"), "rejected": chat(f"question {i}", "no")}
        for i in range(500)
    ]
    report = check_pairs(write(tmp_path / "p.jsonl", rows))
    assert report.figures()["duplicate_pairs"] == 0
    assert (
        check_pairs(write(tmp_path / "q.jsonl", rows + rows[:3])).figures()["duplicate_pairs"] == 3
    )
