from __future__ import annotations

import pytest

from registry.errors import InvalidName
from registry.naming import (
    AdapterAddress,
    base_name_problem,
    name_problem,
    parse_address,
    parse_seed_id,
    seed_id,
)

GOOD = ["a", "support-bot", "extractor.v2", "a_b-c.d", "0day", "x" * 63]
BAD = [
    "", "base", "../x", "..", "a..b", "a/b", "a\\b", "/abs", "C:x", "Upper", "-lead", ".hidden",
    "_x", "a b", "a@1", "x" * 64, "tab\t", "é",
]  # fmt: skip


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name: str):
    assert name_problem(name) is None


@pytest.mark.parametrize("name", BAD)
def test_bad_names(name: str):
    assert name_problem(name) is not None


def test_base_names_allow_checkpoint_folder_style():
    assert base_name_problem("Llama-3.1-8B-Instruct") is None
    assert base_name_problem("../Llama") is not None
    assert base_name_problem("a..b") is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("support", AdapterAddress("support")),
        ("support@3", AdapterAddress("support", 3)),
        ("a.b-c@12", AdapterAddress("a.b-c", 12)),
    ],
)
def test_addresses(text: str, expected: AdapterAddress):
    assert parse_address(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["support@0", "support@", "support@-1", "@3", "a@1@2", "../x@1"])
def test_bad_addresses(text: str):
    with pytest.raises(InvalidName):
        parse_address(text)


def test_seed_ids_round_trip_with_hyphenated_base_names():
    sid = seed_id("Llama-3-8B", "code-extractor", 2)
    assert sid == "Llama-3-8B-code-extractor-v2"
    assert parse_seed_id(sid, base_name="Llama-3-8B") == AdapterAddress("code-extractor", 2)
    assert parse_seed_id("b-x-v2-v3", base_name="b") == AdapterAddress("x-v2", 3)
    with pytest.raises(InvalidName):
        parse_seed_id("Other-Base-x-v1", base_name="Llama-3-8B")
