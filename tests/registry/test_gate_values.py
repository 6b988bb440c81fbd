"""Values too small for the engine's dtype: a tensor that rounds to all zeros there makes its
module serve as the base. Refused only when the whole tensor vanishes (exact, like the overflow
check beside it), replaying vLLM's cast and, for lora_B, its scale."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registry.compat import EngineLimits, ProblemCode, inspect_adapter, run_gate
from tests.registry.helpers import edit_tensors

C = ProblemCode
A = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
B = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"


def limits(dtype: str | None) -> EngineLimits:
    return EngineLimits(max_lora_rank=16, dtype=dtype)


def scaled_to(name: str, largest: float):
    """Rescale tensor `name` so its largest magnitude is `largest` (all values shrink)."""

    def change(tensors: dict[str, Any]) -> dict[str, Any]:
        tensor = tensors[name]
        tensors[name] = tensor / tensor.abs().max() * largest
        return tensors

    return change


def test_a_tensor_that_rounds_to_zero_in_fp16_is_refused(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    edit_tensors(folder, scaled_to(A, 1e-9))
    problems = run_gate(inspect_adapter(folder), base_fp, limits("F16"))
    assert [p.code for p in problems] == [C.VALUE_OUT_OF_RANGE]
    text = problems[0].message
    assert "1 tensor(s) round to all zeros in the engine's F16" in text and A in text
    for wider in ("BF16", "F32", None):  # representable there (or the dtype is not known)
        assert run_gate(inspect_adapter(folder), base_fp, limits(wider)) == [], wider


@pytest.mark.parametrize(
    ("largest", "refused"),
    [
        # vLLM casts B to fp16 first (2e-8 -> 0), then scales by 2: the product, 4e-8, would
        # have rounded to fp16's smallest subnormal (5.96e-8) and survived
        (2e-8, True),
        (3.1e-8, False),  # rounds up to 5.96e-8, stays non-zero after the scale
    ],
)
def test_lora_b_is_cast_before_it_is_scaled(
    good_adapter, copy_adapter, base_fp, largest: float, refused: bool
):
    folder = copy_adapter(good_adapter)
    edit_tensors(folder, scaled_to(B, largest))
    problems = run_gate(inspect_adapter(folder), base_fp, limits("F16"))
    assert [p.code for p in problems] == ([C.VALUE_OUT_OF_RANGE] if refused else [])


def test_one_tiny_value_in_a_normal_tensor_passes(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)

    def plant(tensors: dict[str, Any]) -> dict[str, Any]:
        tensors[A][0, 0] = 1e-12
        return tensors

    edit_tensors(folder, plant)
    assert run_gate(inspect_adapter(folder), base_fp, limits("F16")) == []


def test_an_untrained_zero_lora_b_is_not_the_engines_doing(make_adapter, base_fp):
    folder: Path = make_adapter("zero-b", init_lora_weights=True, target_modules=["q_proj"])
    artifact = inspect_adapter(folder)
    assert 0.0 in artifact.tensor_max_abs.values()  # peft's default init: B is all zeros
    assert run_gate(artifact, base_fp, limits("F16")) == []
