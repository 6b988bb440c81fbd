"""The shipped tokenizer against the served base's (seed §1: check tokenizer_config.json, refuse
missing special tokens): special tokens and their roles are always compared, also when the
adapter ships only tokenizer_config.json, and no file the gate flagged unsafe is ever read."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from registry.compat import (
    BaseModelFingerprint,
    EngineLimits,
    ProblemCode,
    inspect_adapter,
    run_gate,
)
from registry.compat.problems import Problem
from tests.registry.helpers import save_tokenizer

LIMITS = EngineLimits(max_lora_rank=16)
C = ProblemCode


def gate(folder: Path, base: BaseModelFingerprint) -> list[Problem]:
    return run_gate(inspect_adapter(folder), base, LIMITS)


def messages(problems: list[Problem]) -> list[tuple[ProblemCode, str]]:
    return sorted((p.code, p.message) for p in problems)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data))


def test_the_base_roles_are_fingerprinted(base_fp: BaseModelFingerprint):
    assert base_fp.roles == {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }


def test_a_tokenizer_config_alone_is_checked(good_adapter, copy_adapter, base_fp):
    """No tokenizer.json or vocab.json: its special tokens and roles are still judged."""
    folder = copy_adapter(good_adapter)
    write_json(
        folder / "tokenizer_config.json",
        {
            "eos_token": "<|im_end|>",
            "bos_token": "<s>",
            "additional_special_tokens": ["<|tool_call|>", "</s>"],
        },
    )
    assert messages(gate(folder, base_fp)) == [
        (
            C.TOKENIZER_MISMATCH,
            "eos_token is '<|im_end|>' in the adapter's tokenizer but '</s>' in the served "
            "base's; generation uses the base's",
        ),
        (
            C.TOKENS_MISSING,
            "the adapter's tokenizer needs 2 token(s) the base lacks: <|im_end|>, <|tool_call|>",
        ),
    ]


def test_the_base_tokenizer_config_alone_passes(good_adapter, copy_adapter, tiny_base, base_fp):
    folder = copy_adapter(good_adapter)
    shutil.copy(tiny_base / "tokenizer_config.json", folder / "tokenizer_config.json")
    artifact = inspect_adapter(folder)
    assert artifact.tokenizer is not None and artifact.tokenizer.vocab == {}
    assert run_gate(artifact, base_fp, LIMITS) == []


@pytest.mark.parametrize(
    ("role", "token"),
    [("eos_token", "w7"), ("bos_token", "</s>"), ("pad_token", "</s>"), ("unk_token", "w0")],
)
def test_a_role_pointed_at_another_base_token_is_refused(
    good_adapter, copy_adapter, base_fp, role: str, token: str
):
    """The base's own tokenizer with one role moved: every token exists, the ids match, and
    only the role differs (the sha differs too, but nothing else compared it)."""
    folder = copy_adapter(good_adapter)
    save_tokenizer(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    served = config[role]
    config[role] = token
    write_json(folder / "tokenizer_config.json", config)
    assert messages(gate(folder, base_fp)) == [
        (
            C.TOKENIZER_MISMATCH,
            f"{role} is {token!r} in the adapter's tokenizer but {served!r} in the served "
            "base's; generation uses the base's",
        )
    ]


def test_special_tokens_map_roles_count_too(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    write_json(folder / "special_tokens_map.json", {"eos_token": {"content": "w3"}})
    assert [p.code for p in gate(folder, base_fp)] == [C.TOKENIZER_MISMATCH]


def test_roles_the_base_leaves_unset(good_adapter, copy_adapter, base_fp):
    """A pad token the base lacks (the usual pad = eos of fine-tuning) only has to exist; an
    eos or bos the base does not set is a difference in how generation stops or starts."""
    no_pad_no_eos = replace(
        base_fp,
        roles={k: v for k, v in base_fp.roles.items() if k not in ("pad_token", "eos_token")},
    )
    folder = copy_adapter(good_adapter)
    write_json(folder / "tokenizer_config.json", {"pad_token": "</s>", "bos_token": "<s>"})
    assert gate(folder, no_pad_no_eos) == []
    write_json(folder / "tokenizer_config.json", {"eos_token": "</s>"})
    assert messages(gate(folder, no_pad_no_eos)) == [
        (
            C.TOKENIZER_MISMATCH,
            "eos_token is '</s>' in the adapter's tokenizer but not set in the served base's; "
            "generation uses the base's",
        )
    ]


def test_a_linked_tokenizer_file_is_never_read(good_adapter, copy_adapter, base_fp, tmp_path: Path):
    """tokenizer.json as a link to a file outside the upload: refused as unsafe, and its
    contents (a token only it has) appear nowhere, because it was not opened."""
    outside = tmp_path / "outside"
    save_tokenizer(outside, extra_tokens=["<only-outside>"])
    folder = copy_adapter(good_adapter)
    shutil.copy(outside / "tokenizer_config.json", folder / "tokenizer_config.json")
    (folder / "tokenizer.json").symlink_to(outside / "tokenizer.json")
    artifact = inspect_adapter(folder)
    assert artifact.unsafe_files == ("tokenizer.json",)
    assert artifact.tokenizer is not None and "<only-outside>" not in artifact.tokenizer.vocab
    problems = run_gate(artifact, base_fp, LIMITS)
    assert [p.code for p in problems] == [C.UNSAFE_FILE]
    assert all("<only-outside>" not in p.message for p in problems)
