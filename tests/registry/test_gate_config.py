"""adapter_config.json as vLLM reads it: its required fields, and strict UTF-8 without a BOM.

Each refusal here is paired with vLLM's own PEFTHelper failing on the same file, so the gate
refuses what the engine would, and the real peft config still loads in both.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest

from registry.compat import EngineLimits, ProblemCode, inspect_adapter, run_gate
from registry.compat.checks import VLLM_REQUIRED_FIELDS
from registry.compat.problems import Problem

LIMITS = EngineLimits(max_lora_rank=16)
C = ProblemCode
CONFIG = "adapter_config.json"


def vllm_reads(folder: Path) -> Exception | None:
    """None if vLLM's loader accepts the config, else what it raised."""
    from vllm.lora.peft_helper import PEFTHelper

    try:
        PEFTHelper.from_local_dir(str(folder), None)
    except Exception as exc:
        return exc
    return None


def config_problems(folder: Path, base_fp: Any) -> list[Problem]:
    return run_gate(inspect_adapter(folder), base_fp, LIMITS)


def test_required_fields_are_vllms():
    from vllm.lora.peft_helper import PEFTHelper

    required = {
        f.name for f in fields(PEFTHelper) if f.default is MISSING and f.default_factory is MISSING
    }
    assert set(VLLM_REQUIRED_FIELDS) == required


@pytest.mark.parametrize("missing", ["target_modules", "r", "lora_alpha"])
def test_a_missing_required_field_is_refused_like_vllm_does(
    good_adapter, copy_adapter, base_fp, missing: str
):
    folder = copy_adapter(good_adapter)
    config = json.loads((folder / CONFIG).read_text())
    del config[missing]
    (folder / CONFIG).write_text(json.dumps(config))
    problems = config_problems(folder, base_fp)
    assert [p.code for p in problems] == [C.CONFIG_INVALID], problems
    assert problems[0].message == (
        f"{CONFIG} lacks {missing}: vLLM requires r, lora_alpha, target_modules"
    )
    assert "Missing required configuration fields" in str(vllm_reads(folder))


@pytest.mark.parametrize("targets", [None, 5, {"q_proj": 1}, ["q_proj", 7]])
def test_target_modules_must_name_modules(good_adapter, copy_adapter, base_fp, targets):
    folder = copy_adapter(good_adapter)
    config = json.loads((folder / CONFIG).read_text())
    config["target_modules"] = targets
    (folder / CONFIG).write_text(json.dumps(config))
    problems = config_problems(folder, base_fp)
    assert [p.code for p in problems] == [C.CONFIG_INVALID]
    assert "target_modules must be a module name or a list of module names" in problems[0].message


def test_the_real_config_passes_both(good_adapter, base_fp):
    assert config_problems(good_adapter, base_fp) == []
    assert vllm_reads(good_adapter) is None


@pytest.mark.parametrize(
    ("case", "encode", "reason"),
    [
        ("utf-16", lambda text: text.encode("utf-16"), "is not UTF-8 (invalid start byte"),
        ("utf-16-le", lambda text: text.encode("utf-16-le"), "is not valid JSON"),
        ("utf-8 bom", lambda text: b"\xef\xbb\xbf" + text.encode(), "byte-order mark"),
        ("latin-1", lambda text: text.replace("}", ', "x": "\u00e9"}').encode("latin-1"), "UTF-8"),
    ],
)
def test_config_must_be_plain_utf8(good_adapter, copy_adapter, base_fp, case, encode, reason):
    folder = copy_adapter(good_adapter)
    text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_bytes(encode(text))
    problems = config_problems(folder, base_fp)
    assert [p.code for p in problems] == [C.CONFIG_INVALID], case
    assert reason in problems[0].message and problems[0].message.startswith(CONFIG)
    assert vllm_reads(folder) is not None, case  # the engine cannot read it either


def test_non_ascii_utf8_is_fine(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    config = json.loads((folder / CONFIG).read_text())
    config["base_model_name_or_path"] = "café-modèle-ベース"
    (folder / CONFIG).write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    assert config_problems(folder, base_fp) == []
    assert vllm_reads(folder) is None


def test_an_oversized_config_is_refused_after_a_bounded_read(good_adapter, copy_adapter, base_fp):
    from registry.compat.artifact import MAX_CONFIG_BYTES

    folder = copy_adapter(good_adapter)
    text = (folder / CONFIG).read_text()
    (folder / CONFIG).write_text(text[:-1] + ', "pad": "' + "x" * MAX_CONFIG_BYTES + '"}')
    problems = config_problems(folder, base_fp)
    assert [p.code for p in problems] == [C.CONFIG_INVALID]
    assert str(MAX_CONFIG_BYTES) in problems[0].message
