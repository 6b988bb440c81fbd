"""LoRA tensor names: the gate accepts exactly the names vLLM applies to a module of the base.

A misnamed tensor is worse than a broken one: vLLM loads it without complaint under a module
name the served model lacks and never applies it, so the adapter silently serves as the base.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.compat import (
    BaseModelFingerprint,
    EngineLimits,
    ProblemCode,
    fingerprint_base_model,
    inspect_adapter,
    run_gate,
)
from registry.compat.lora_keys import LoraKey, parse_lora_key
from registry.compat.problems import Problem
from tests.registry.helpers import WEIGHTS, edit_tensors, read_raw, write_raw

LIMITS = EngineLimits(max_lora_rank=16)
C = ProblemCode
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def renamed(folder: Path, rename: Callable[[str], str], file: str = WEIGHTS) -> Path:
    """folder, with every tensor of its safetensors `file` renamed (bytes untouched)."""
    header, data = read_raw(folder / file)
    metadata = header.pop("__metadata__", None)
    header = {rename(name): spec for name, spec in header.items()}
    if metadata is not None:
        header["__metadata__"] = metadata
    write_raw(folder / file, header, data)
    return folder


def gate(folder: Path, base: BaseModelFingerprint) -> list[Problem]:
    return run_gate(inspect_adapter(folder), base, LIMITS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (Q_A, LoraKey(0, "q_proj", "A", "model.", "self_attn")),
        (
            "base_model.model.model.layers.31.mlp.down_proj.lora_B.weight",
            LoraKey(31, "down_proj", "B", "model.", "mlp"),
        ),
        (
            "base_model.model.model.language_model.layers.7.self_attn.o_proj.lora_A.weight",
            LoraKey(7, "o_proj", "A", "model.language_model.", "self_attn"),
        ),
        ("base_model.model.model.layers.00.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.01.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.+1.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.\u0661.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.\uff11.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.1234567.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers." + "9" * 5000 + ".self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\n", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_C.weight", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("model.layers.0.self_attn.q_proj.lora_A.weight", None),
        ("base_model.model.model.layers.0.self_attn.q_pr\u00f6j.lora_A.weight", None),
    ],
)
def test_parse_keeps_every_part_and_refuses_non_canonical_indices(
    name: str, expected: LoraKey | None
):
    assert parse_lora_key(name) == expected


def test_the_module_path_is_the_base_weight_name_without_weight():
    key = parse_lora_key(Q_A)
    assert key is not None and key.module_path == "model.layers.0.self_attn.q_proj"


def test_module_paths_come_from_the_base_checkpoint(base_fp: BaseModelFingerprint):
    assert base_fp.module_paths == {
        "q_proj": "model.layers.{layer}.self_attn.q_proj",
        "k_proj": "model.layers.{layer}.self_attn.k_proj",
        "v_proj": "model.layers.{layer}.self_attn.v_proj",
        "o_proj": "model.layers.{layer}.self_attn.o_proj",
        "gate_proj": "model.layers.{layer}.mlp.gate_proj",
        "up_proj": "model.layers.{layer}.mlp.up_proj",
        "down_proj": "model.layers.{layer}.mlp.down_proj",
    }
    assert base_fp.module_path("down_proj", 1) == "model.layers.1.mlp.down_proj"


# Each variant renames every tensor of a real peft adapter; vLLM 0.32 would load all of them
# and apply none (/tmp/review-compat/r1_module_names.py showed 0 of 14 modules matched).
MISNAMED: list[tuple[str, Callable[[str], str]]] = [
    ("no model. prefix", lambda n: n.replace("base_model.model.model.", "base_model.model.")),
    (
        "language_model. prefix",
        lambda n: n.replace("base_model.model.model.", "base_model.model.language_model."),
    ),
    (
        "doubled model. prefix",
        lambda n: n.replace("base_model.model.model.", "base_model.model.model.model."),
    ),
    (
        "attention under mlp and mlp under self_attn",
        lambda n: (
            n.replace(".self_attn.", ".TMP.")
            .replace(".mlp.", ".self_attn.")
            .replace(".TMP.", ".mlp.")
        ),
    ),
    ("other parent", lambda n: n.replace(".self_attn.", ".attn.")),
    ("leading zero", lambda n: n.replace(".layers.0.", ".layers.00.").replace(".1.", ".01.")),
    (
        "Arabic-Indic digits",
        lambda n: n.replace(".layers.0.", ".layers.\u0660.").replace(
            ".layers.1.", ".layers.\u0661."
        ),
    ),
]


@pytest.mark.parametrize(("case", "rename"), MISNAMED, ids=[m[0] for m in MISNAMED])
def test_misnamed_tensors_are_unknown(
    good_adapter: Path, copy_adapter, base_fp, case: str, rename: Callable[[str], str]
):
    folder = renamed(copy_adapter(good_adapter), rename)
    problems = gate(folder, base_fp)
    assert C.UNKNOWN_TENSOR in {p.code for p in problems}, case
    assert {p.code for p in problems} <= {C.UNKNOWN_TENSOR, C.NO_LORA_WEIGHTS}, problems
    text = " | ".join(p.message for p in problems if p.code == C.UNKNOWN_TENSOR)
    assert rename(Q_A) in text or "(+" in text  # named, or counted among the rest


def test_a_misplaced_projection_names_the_expected_tensor(good_adapter, copy_adapter, base_fp):
    wrong = Q_A.replace(".self_attn.", ".mlp.")
    folder = renamed(copy_adapter(good_adapter), lambda n: wrong if n == Q_A else n)
    problems = gate(folder, base_fp)
    assert {p.code for p in problems} == {C.UNKNOWN_TENSOR, C.UNPAIRED_TENSOR}
    (unknown,) = [p.message for p in problems if p.code == C.UNKNOWN_TENSOR]
    assert f"e.g. {wrong} should be {Q_A}" in unknown
    assert "never apply" in unknown


def test_a_5000_digit_layer_index_is_refused_not_raised(good_adapter, copy_adapter, base_fp):
    huge = Q_A.replace("layers.0.", "layers." + "9" * 5000 + ".")
    folder = renamed(copy_adapter(good_adapter), lambda n: huge if n == Q_A else n)
    problems = gate(folder, base_fp)  # int() of > 4300 digits used to raise ValueError here
    assert {p.code for p in problems} == {C.UNKNOWN_TENSOR, C.UNPAIRED_TENSOR}
    assert all(len(p.message) < 2000 for p in problems)  # the name is cut, not echoed whole


def test_the_base_checkpoint_decides_the_paths(
    tiny_base: Path, tmp_path: Path, good_adapter: Path, base_fp: BaseModelFingerprint
):
    """A base whose weights live under model.language_model. (as in multimodal checkpoints):
    the same adapter is refused on it, and one named after its paths passes."""

    def nest(name: str) -> str:
        return name.replace("model.layers.", "model.language_model.layers.")

    moved = tmp_path / "base-moved"
    shutil.copytree(tiny_base, moved)
    served = fingerprint_base_model(renamed(moved, nest, file="model.safetensors"))
    assert served.module_path("q_proj", 0) == "model.language_model.layers.0.self_attn.q_proj"
    assert {p.code for p in gate(good_adapter, served)} == {C.UNKNOWN_TENSOR}
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    assert gate(renamed(adapter, nest), served) == []
    assert {p.code for p in gate(adapter, base_fp)} == {C.UNKNOWN_TENSOR}


def test_every_name_the_gate_accepts_is_one_vllm_applies(
    good_adapter: Path, tiny_base: Path, base_fp: BaseModelFingerprint
):
    """Through vLLM's own name parser: each tensor of an accepted adapter maps to a module
    whose weight the base checkpoint has, i.e. one the served model adapts."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    from registry.compat.safetensors_header import read_header

    assert gate(good_adapter, base_fp) == []
    base_weights = {t.name for t in read_header(tiny_base / "model.safetensors").tensors}
    names = [t.name for t in inspect_adapter(good_adapter).tensors]
    assert len(names) == 28
    for name in names:
        module, _ = parse_fine_tuned_lora_name(name)
        assert f"{module}.weight" in base_weights, name
    # and a name it refuses maps to no module of the base
    module, _ = parse_fine_tuned_lora_name(
        Q_A.replace("base_model.model.model.", "base_model.model.")
    )
    assert f"{module}.weight" not in base_weights


def test_demo_adapters_still_pass(tmp_path: Path):
    from gateway.demo import init_demo

    paths = init_demo(tmp_path / "demo")
    served = fingerprint_base_model(paths.base)
    for name, folder in paths.adapters.items():
        problems = run_gate(inspect_adapter(folder), served, EngineLimits(max_lora_rank=32))
        assert problems == [], name


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Llava base as transformers saves it (`language_model.model.layers…`) and a real
    PEFT LoRA on its language model (named after the live `model.language_model.layers…`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    from tests.registry.helpers import save_tokenizer

    root = tmp_path_factory.mktemp("llava")
    torch.manual_seed(0)
    text = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=200,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
    )
    model = Llava(LlavaConfig(text_config=text, vision_config=vision, image_token_index=199))
    model.save_pretrained(root / "base")
    save_tokenizer(root / "base")
    targets = r".*language_model.*\.(q_proj|v_proj)"
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    peft_model.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def test_a_multimodal_bases_language_model_is_reached_under_either_spelling(llava):
    base, adapter = llava
    fingerprint = fingerprint_base_model(base)
    # vLLM's Llava maps model.language_model. onto the checkpoint's language_model.model.
    assert fingerprint.module_path("q_proj", 0) == "language_model.model.layers.0.self_attn.q_proj"
    assert run_gate(inspect_adapter(adapter), fingerprint, EngineLimits(max_lora_rank=16)) == []
    spellings = fingerprint.module_path_spellings("q_proj", 1)
    assert spellings == (
        "language_model.model.layers.1.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.q_proj",
    )


def test_one_module_under_both_spellings_is_refused(llava, tmp_path):
    """vLLM maps both names onto the one module and keeps whichever it loads last: one of the
    two deltas would silently not apply."""
    base, adapter = llava
    copy = tmp_path / "both"
    shutil.copytree(adapter, copy)
    live = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    saved = "base_model.model.language_model.model.layers.0.self_attn.q_proj"

    def both(tensors):
        for ab in ("A", "B"):
            tensors[f"{saved}.lora_{ab}.weight"] = tensors[f"{live}.lora_{ab}.weight"].clone()
        return tensors

    edit_tensors(copy, both)
    problems = run_gate(inspect_adapter(copy), fingerprint_base_model(base), EngineLimits(16))
    assert [p.code.value for p in problems] == ["module_named_twice"]
    assert "language_model.model.layers.0.self_attn.q_proj and " in problems[0].message
