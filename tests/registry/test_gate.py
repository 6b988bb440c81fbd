"""The compatibility gate on real peft adapters, each mutated to break exactly one rule."""

from __future__ import annotations

import math
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from registry.compat import (
    AdapterArtifact,
    BaseModelFingerprint,
    EngineLimits,
    ProblemCode,
    fingerprint_base_model,
    inspect_adapter,
    run_gate,
    safetensors_dtype,
)
from registry.compat.checks import check_peft_config, check_tensors
from registry.compat.problems import Problem
from tests.registry.helpers import (
    WEIGHTS,
    build_base,
    edit_config,
    edit_tensors,
    flip_bit,
    read_raw,
    save_tokenizer,
    write_raw,
)

LIMITS = EngineLimits(max_lora_rank=16)
C = ProblemCode


def gate(
    folder: Path, base: BaseModelFingerprint, limits: EngineLimits = LIMITS, **claims: Any
) -> list[Problem]:
    artifact = replace(inspect_adapter(folder), **claims)
    return run_gate(artifact, base, limits)


def codes(problems: list[Problem]) -> set[ProblemCode]:
    return {p.code for p in problems}


def message(problems: list[Problem], code: ProblemCode) -> str:
    return " | ".join(p.message for p in problems if p.code == code)


def test_real_adapter_passes_and_is_described(good_adapter: Path, base_fp: BaseModelFingerprint):
    artifact = inspect_adapter(good_adapter)
    assert run_gate(artifact, base_fp, LIMITS) == []
    assert (artifact.rank, artifact.alpha, artifact.use_rslora) == (8, 16.0, False)
    assert artifact.scale == 2.0
    assert artifact.dtype == "F32"
    assert len(artifact.tensors) == 2 * 7 * 2  # layers x modules x (A, B)
    assert artifact.nonfinite_tensors == ()


def test_rslora_is_accepted_with_alpha_over_sqrt_r(
    make_adapter: Callable[..., Path], base_fp: BaseModelFingerprint
):
    folder = make_adapter("rslora", r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    artifact = inspect_adapter(folder)
    assert run_gate(artifact, base_fp, LIMITS) == []
    assert artifact.use_rslora and artifact.scale == pytest.approx(8 / math.sqrt(16))


def test_bf16_and_fp16_adapters_are_accepted(good_adapter, copy_adapter, base_fp):
    import torch

    for dtype, name in ((torch.bfloat16, "BF16"), (torch.float16, "F16")):
        folder = copy_adapter(good_adapter)
        edit_tensors(folder, lambda t, d=dtype: {k: v.to(d) for k, v in t.items()})
        artifact = inspect_adapter(folder)
        assert run_gate(artifact, base_fp, LIMITS) == [], name
        assert artifact.dtype == name


def test_one_flipped_bit_in_the_base_changes_its_sha_and_refuses_the_adapter(
    tiny_base: Path, tmp_path: Path, good_adapter: Path, base_fp: BaseModelFingerprint
):
    corrupted = tmp_path / "base-flipped"
    shutil.copytree(tiny_base, corrupted)
    flip_bit(corrupted / "model.safetensors", offset_from_end=1000, bit=3)
    served = fingerprint_base_model(corrupted)
    assert served.weights_sha256 != base_fp.weights_sha256
    assert served.tokenizer_sha256 == base_fp.tokenizer_sha256  # only the weights changed
    problems = gate(good_adapter, served, declared_base_sha256=base_fp.weights_sha256)
    assert codes(problems) == {C.BASE_MISMATCH}
    assert base_fp.weights_sha256[:16] in problems[0].message
    # The same claim against the genuine base passes.
    assert gate(good_adapter, base_fp, declared_base_sha256=base_fp.weights_sha256) == []


def test_truncated_safetensors(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.HEADER_INVALID}
    assert "truncated" in problems[0].message


def test_100_mb_header_length_field_is_refused_before_reading(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    path = folder / WEIGHTS
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 100 * 1024 * 1024) + blob[8:])
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.HEADER_INVALID}
    assert "104857600" in problems[0].message and "16777216" in problems[0].message


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(good_adapter, copy_adapter, base_fp, bad: float):
    folder = copy_adapter(good_adapter)
    target = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"

    def poison(tensors: dict[str, Any]) -> dict[str, Any]:
        tensors[target][3, 2] = bad
        return tensors

    edit_tensors(folder, poison)
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.NON_FINITE}
    assert target in problems[0].message


def test_nan_in_bf16_is_found_by_bit_pattern(good_adapter, copy_adapter, base_fp):
    import torch

    folder = copy_adapter(good_adapter)

    def poison(tensors: dict[str, Any]) -> dict[str, Any]:
        tensors = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
        next(iter(tensors.values()))[0, 0] = float("nan")
        return tensors

    edit_tensors(folder, poison)
    assert codes(gate(folder, base_fp)) == {C.NON_FINITE}


def test_largest_magnitude_per_tensor_is_read_from_the_bits_in_every_float_dtype(
    good_adapter, copy_adapter
):
    import torch

    target = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    for dtype, value in (
        (torch.float32, -123456.75),
        (torch.float16, -60000.0),
        (torch.bfloat16, -1.5e30),
    ):
        folder = copy_adapter(good_adapter)

        def plant(tensors: dict[str, Any], d: Any = dtype, v: float = value) -> dict[str, Any]:
            tensors = {k: t.to(d) for k, t in tensors.items()}
            tensors[target][5, 1] = v
            return tensors

        edit_tensors(folder, plant)
        artifact = inspect_adapter(folder)
        planted = torch.tensor(value, dtype=dtype).item()  # the value as stored
        assert artifact.tensor_max_abs[target] == abs(planted), dtype
        expected = {k: t.abs().max().item() for k, t in _loaded(folder).items() if k != target}
        assert {k: v for k, v in artifact.tensor_max_abs.items() if k != target} == expected
        assert inspect_adapter(folder, scan_values=False).tensor_max_abs == {}


def _loaded(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(folder / WEIGHTS))


def _with_b_value(folder: Path, value: float, dtype: Any = None) -> str:
    target = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    def plant(tensors: dict[str, Any]) -> dict[str, Any]:
        if dtype is not None:
            tensors = {k: t.to(dtype) for k, t in tensors.items()}
        tensors[target][0, 3] = value
        return tensors

    edit_tensors(folder, plant)
    return target


def test_values_beyond_an_fp16_engine_are_refused_and_fit_wider_engines(
    good_adapter, copy_adapter, base_fp
):
    folder = copy_adapter(good_adapter)
    target = _with_b_value(folder, 70000.0)  # fine in the fp32 file, inf once cast to fp16
    fp16 = EngineLimits(max_lora_rank=16, dtype="F16")
    problems = gate(folder, base_fp, fp16)
    assert codes(problems) == {C.VALUE_OUT_OF_RANGE}
    text = problems[0].message
    assert target in text and "F16" in text and "65504" in text
    assert "140000" in text  # the good adapter's scale is 2: B is served at twice the value
    for wider in ("BF16", "F32", None):  # None: the engine's dtype is not known yet
        assert gate(folder, base_fp, EngineLimits(max_lora_rank=16, dtype=wider)) == [], wider


def test_the_scale_folded_into_lora_b_can_overflow_an_fp16_adapter_on_an_fp16_engine(
    good_adapter, copy_adapter, base_fp
):
    import torch

    fp16 = EngineLimits(max_lora_rank=16, dtype="F16")
    folder = copy_adapter(good_adapter)
    _with_b_value(folder, 40000.0, dtype=torch.float16)  # scale 2: served as 80000
    assert codes(gate(folder, base_fp, fp16)) == {C.VALUE_OUT_OF_RANGE}
    folder = copy_adapter(good_adapter)
    _with_b_value(folder, 30000.0, dtype=torch.float16)  # served as 60000: fits
    assert gate(folder, base_fp, fp16) == []


def test_the_max_and_non_finite_values_are_found_in_any_chunk_of_a_long_tensor(
    good_adapter, copy_adapter, monkeypatch
):
    """A 64-byte scan chunk splits every tensor into many: the max and a NaN are planted in
    the first and in a middle chunk, where keeping only the last chunk's answer would miss."""
    import torch

    from registry.compat import artifact as artifact_module

    monkeypatch.setattr(artifact_module, "SCAN_CHUNK", 64)
    target = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"  # 8 x 128 fp32
    for row, col in ((0, 0), (4, 70)):  # the first chunk; a middle one
        for planted in (-9000.5, float("nan")):
            folder = copy_adapter(good_adapter)

            def plant(tensors, r=row, c=col, v=planted):
                tensors[target][r, c] = v
                return tensors

            edit_tensors(folder, plant)
            artifact = inspect_adapter(folder)
            stored = _loaded(folder)[target]
            if math.isnan(planted):
                assert target in artifact.nonfinite_tensors, (row, col)
                assert target not in artifact.tensor_max_abs
            else:
                assert artifact.tensor_max_abs[target] == 9000.5 == stored.abs().max().item()
            assert torch.isfinite(stored).all() == (not math.isnan(planted))


@pytest.mark.parametrize(
    ("rank", "alpha", "value", "refused"),
    [
        # vLLM rounds B to fp16 first (43669 -> 43680), then scales by 1.5 -> 65520: inf;
        # the exact product, 65503.5, would have passed
        (16, 24, 43669.0, True),
        (16, 24, 43660.0, False),  # rounds to 43648, x 1.5 = 65472
        (16, 48, 21834.0, True),  # scale 3: 21840 x 3 = 65520
        # scale 1/2: the cast comes first, so 70000 overflows although 35000 would fit
        (16, 8, 70000.0, True),
        (16, 16, 65519.0, False),  # scale 1: rounds down to 65504, served finite
        (16, 16, 65520.0, True),  # the first value that rounds to inf
    ],
)
def test_the_range_check_replays_vllms_cast_and_scale(
    make_adapter, copy_adapter, base_fp, rank, alpha, value, refused
):
    folder = copy_adapter(make_adapter(f"r{rank}a{alpha}", r=rank, lora_alpha=alpha))
    _with_b_value(folder, value)
    problems = gate(folder, base_fp, EngineLimits(max_lora_rank=16, dtype="F16"))
    assert codes(problems) == ({C.VALUE_OUT_OF_RANGE} if refused else set())


def test_lora_a_is_cast_unscaled(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    target = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"

    def plant(value: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def change(tensors: dict[str, Any]) -> dict[str, Any]:
            tensors[target][1, 1] = value
            return tensors

        return change

    fp16 = EngineLimits(max_lora_rank=16, dtype="F16")
    edit_tensors(folder, plant(40000.0))  # twice this would overflow; A is not scaled
    assert gate(folder, base_fp, fp16) == []
    edit_tensors(folder, plant(-65600.0))
    problems = gate(folder, base_fp, fp16)
    assert codes(problems) == {C.VALUE_OUT_OF_RANGE} and target in problems[0].message


def test_engine_dtype_names_map_to_safetensors_names():
    assert safetensors_dtype("float16") == safetensors_dtype("torch.float16") == "F16"
    assert safetensors_dtype("half") == "F16"
    assert safetensors_dtype("bfloat16") == "BF16" and safetensors_dtype("float32") == "F32"
    assert safetensors_dtype("auto") is None and safetensors_dtype(None) is None
    assert safetensors_dtype("float8_e4m3fn") is None


def test_rank_above_the_engine_limit_names_the_limit(
    make_adapter: Callable[..., Path], base_fp: BaseModelFingerprint
):
    folder = make_adapter("r32", r=32, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    problems = gate(folder, base_fp, EngineLimits(max_lora_rank=16))
    assert codes(problems) == {C.RANK_EXCEEDS_LIMIT}
    assert "r=32" in problems[0].message and "max_lora_rank of 16" in problems[0].message
    assert gate(folder, base_fp, EngineLimits(max_lora_rank=32)) == []


def test_wrong_shape_gqa_k_proj(good_adapter, copy_adapter, base_fp):
    """k_proj's out dim is kv_heads*head_dim = 32 in this GQA base, not hidden = 64."""
    import torch

    folder = copy_adapter(good_adapter)
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"

    def widen(tensors: dict[str, Any]) -> dict[str, Any]:
        tensors[key] = torch.zeros(64, 8)
        return tensors

    edit_tensors(folder, widen)
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.SHAPE_MISMATCH}
    assert key in problems[0].message and "expected [32, 8]" in problems[0].message


def test_adapter_trained_on_a_non_gqa_base_is_refused_on_k_and_v_only(
    artifacts_root: Path, make_adapter: Callable[..., Path], base_fp: BaseModelFingerprint
):
    other_base = artifacts_root / "base-mha"
    if not other_base.exists():
        build_base(other_base, num_key_value_heads=4)
    folder = make_adapter("mha", base=other_base, target_modules=["q_proj", "k_proj", "v_proj"])
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.SHAPE_MISMATCH}
    text = message(problems, C.SHAPE_MISMATCH)
    assert "k_proj" in text and "v_proj" in text and "q_proj" not in text
    assert len(problems) == 4  # 2 layers x (k, v) lora_B


def test_lora_b_rank_must_match_r(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    edit_config(folder, r=4, lora_alpha=8)  # tensors still have rank 8
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.SHAPE_MISMATCH}


def test_use_dora_is_refused(make_adapter: Callable[..., Path], base_fp: BaseModelFingerprint):
    folder = make_adapter("dora", use_dora=True, target_modules=["q_proj", "v_proj"])
    problems = gate(folder, base_fp)
    assert C.DORA in codes(problems)
    assert codes(problems) <= {C.DORA}


def test_modules_to_save_is_refused(make_adapter: Callable[..., Path], base_fp):
    folder = make_adapter("mts", modules_to_save=["lm_head"], target_modules=["q_proj"])
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.MODULES_TO_SAVE, C.EMBEDDING_DELTA}
    assert "lm_head" in message(problems, C.EMBEDDING_DELTA)


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`:UserWarning")
def test_embedding_and_lm_head_lora_is_refused(make_adapter: Callable[..., Path], base_fp):
    folder = make_adapter("emb", target_modules=["embed_tokens", "lm_head"])
    problems = gate(folder, base_fp)
    assert {C.EMBEDDING_DELTA, C.MODULE_NOT_IN_BASE} <= codes(problems)


def test_pickle_bin_adapter_is_refused(make_adapter: Callable[..., Path], base_fp):
    folder = make_adapter("bin", safe=False, target_modules=["q_proj"])
    assert (folder / "adapter_model.bin").exists()
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.PICKLE_WEIGHTS, C.MISSING_FILE}
    assert "safe_serialization=True" in message(problems, C.PICKLE_WEIGHTS)


def test_bin_next_to_safetensors_is_still_refused(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    (folder / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    assert codes(gate(folder, base_fp)) == {C.PICKLE_WEIGHTS}


def test_target_module_missing_from_the_base(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    path = folder / WEIGHTS
    header, data = read_raw(path)
    old = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header[old.replace("q_proj", "qkv_proj")] = header.pop(old)
    write_raw(path, header, data)
    problems = gate(folder, base_fp)
    assert C.MODULE_NOT_IN_BASE in codes(problems)
    assert "qkv_proj" in message(problems, C.MODULE_NOT_IN_BASE)


def test_layer_beyond_the_base(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    path = folder / WEIGHTS
    header, data = read_raw(path)
    for ab in "AB":
        old = f"base_model.model.model.layers.1.mlp.up_proj.lora_{ab}.weight"
        header[old.replace("layers.1", "layers.7")] = header.pop(old)
    write_raw(path, header, data)
    assert codes(gate(folder, base_fp)) == {C.LAYER_OUT_OF_RANGE}


def test_unpaired_lora_tensor(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"
    edit_tensors(folder, lambda t: {k: v for k, v in t.items() if k != key})
    assert codes(gate(folder, base_fp)) == {C.UNPAIRED_TENSOR}


def test_fp64_is_an_unsupported_dtype(good_adapter, copy_adapter, base_fp):
    import torch

    folder = copy_adapter(good_adapter)
    edit_tensors(folder, lambda t: {k: v.to(torch.float64) for k, v in t.items()})
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.DTYPE_UNSUPPORTED}
    assert "F64" in problems[0].message


def test_inconsistent_offsets(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    path = folder / WEIGHTS
    header, data = read_raw(path)
    first = min(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0]
    )
    first["data_offsets"] = [4, first["data_offsets"][1] + 4]  # shifted: gap and overlap
    write_raw(path, header, data)
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.HEADER_INVALID}


def test_pickle_bytes_in_place_of_the_json_header(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    path = folder / WEIGHTS
    payload = b"\x80\x04\x95cos\nsystem\n(S'echo pwned'\ntR."
    path.write_bytes(struct.pack("<Q", len(payload)) + payload + b"\0" * 64)
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.HEADER_INVALID}


def test_symlinked_weights_are_not_followed(good_adapter, copy_adapter, base_fp, tmp_path):
    folder = copy_adapter(good_adapter)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / WEIGHTS).rename(outside)
    (folder / WEIGHTS).symlink_to(outside)
    problems = gate(folder, base_fp)
    assert C.UNSAFE_FILE in codes(problems)
    assert inspect_adapter(folder).tensors == ()  # never read through the link


def test_tokens_the_base_lacks(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    save_tokenizer(folder, extra_tokens=["<tool_call>", "</tool_call>"])
    problems = gate(folder, base_fp)
    assert codes(problems) == {C.TOKENS_MISSING}
    assert "<tool_call>" in problems[0].message


def test_shipping_the_base_tokenizer_is_fine(good_adapter, copy_adapter, base_fp):
    folder = copy_adapter(good_adapter)
    save_tokenizer(folder)
    artifact = inspect_adapter(folder)
    assert artifact.tokenizer is not None
    assert artifact.tokenizer.sha256 == base_fp.tokenizer_sha256
    assert run_gate(artifact, base_fp, LIMITS) == []


def test_declared_tokenizer_must_match(good_adapter, base_fp):
    problems = gate(good_adapter, base_fp, declared_tokenizer_sha256="0" * 64)
    assert codes(problems) == {C.TOKENIZER_MISMATCH}


def test_unknown_architecture_has_no_adaptable_modules(good_adapter, base_fp):
    unknown = replace(base_fp, model_type="gpt_bigcode", modules={})
    problems = gate(good_adapter, unknown)
    assert codes(problems) == {C.MODULE_NOT_IN_BASE}
    assert "gpt_bigcode" in problems[0].message


def test_every_reason_is_collected(make_adapter: Callable[..., Path], copy_adapter, base_fp):
    folder = copy_adapter(
        make_adapter("many", r=32, lora_alpha=16, use_dora=True, modules_to_save=["lm_head"])
    )
    (folder / "optimizer.pt").write_bytes(b"\x80\x04.")
    edit_config(folder, peft_type="LOHA")

    def poison(tensors: dict[str, Any]) -> dict[str, Any]:
        next(iter(tensors.values())).view(-1)[0] = float("nan")
        return tensors

    edit_tensors(folder, poison)
    problems = gate(folder, base_fp, declared_base_sha256="f" * 64)
    assert {
        C.PICKLE_WEIGHTS,
        C.PEFT_TYPE,
        C.DORA,
        C.MODULES_TO_SAVE,
        C.RANK_EXCEEDS_LIMIT,
        C.BASE_MISMATCH,
        C.EMBEDDING_DELTA,
        C.NON_FINITE,
    } <= codes(problems)


# Table of pure config rules, applied to the real adapter's inspected data (no I/O per case).
CONFIG_TABLE: list[tuple[str, dict[str, Any], ProblemCode]] = [
    ("peft type", {"peft_type": "IA3"}, C.PEFT_TYPE),
    ("dora", {"use_dora": True}, C.DORA),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, C.MODULES_TO_SAVE),
    ("trainable tokens", {"trainable_token_indices": [5, 6]}, C.EMBEDDING_DELTA),
    ("rank zero", {"r": 0}, C.RANK_INVALID),
    ("rank text", {"r": "8"}, C.RANK_INVALID),
    ("alpha negative", {"lora_alpha": -2}, C.ALPHA_INVALID),
    ("alpha missing", {"lora_alpha": None}, C.ALPHA_INVALID),
    ("alpha overflow", {"lora_alpha": 10**400}, C.ALPHA_INVALID),
    ("rank pattern", {"rank_pattern": {"q_proj": 4}}, C.FEATURE_UNSUPPORTED),
    ("alpha pattern", {"alpha_pattern": {"q_proj": 4}}, C.FEATURE_UNSUPPORTED),
    ("lora bias", {"lora_bias": True}, C.FEATURE_UNSUPPORTED),
    ("bias", {"bias": "lora_only"}, C.FEATURE_UNSUPPORTED),
    ("pissa init", {"init_lora_weights": "pissa"}, C.FEATURE_UNSUPPORTED),
    ("layer replication", {"layer_replication": [[0, 1]]}, C.FEATURE_UNSUPPORTED),
    ("fan in fan out", {"fan_in_fan_out": True}, C.FEATURE_UNSUPPORTED),
    ("target parameters", {"target_parameters": ["experts.gate_up_proj"]}, C.FEATURE_UNSUPPORTED),
]


@pytest.fixture(scope="module")
def good_artifact(good_adapter: Path) -> AdapterArtifact:
    return inspect_adapter(good_adapter)


@pytest.mark.parametrize(
    ("case", "change", "expected"), CONFIG_TABLE, ids=[c[0] for c in CONFIG_TABLE]
)
def test_config_rules(good_artifact, base_fp, case: str, change: dict[str, Any], expected):
    artifact = replace(good_artifact, config={**(good_artifact.config or {}), **change})
    assert expected in codes(check_peft_config(artifact, base_fp, LIMITS)), case


def test_config_declared_target_absent_from_base(good_artifact, base_fp):
    config = {**(good_artifact.config or {}), "target_modules": ["q_proj", "c_attn"]}
    problems = check_tensors(replace(good_artifact, config=config), base_fp, LIMITS)
    assert codes(problems) == {C.MODULE_NOT_IN_BASE}
    assert "c_attn" in problems[0].message


def test_harmless_inits_pass(good_artifact, base_fp):
    for init in (True, False, "gaussian", "eva"):
        config = {**(good_artifact.config or {}), "init_lora_weights": init}
        assert check_peft_config(replace(good_artifact, config=config), base_fp, LIMITS) == []


def test_hostile_tensor_shapes_do_not_crash_the_gate(good_artifact, base_fp):
    from registry.compat.artifact import TensorInfo

    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    tensors = (TensorInfo(name.format("A"), "F32", ()), TensorInfo(name.format("B"), "F32", (64,)))
    artifact = replace(
        good_artifact, tensors=tensors, config={**(good_artifact.config or {}), "r": None}
    )
    problems = run_gate(artifact, base_fp, LIMITS)
    assert {C.RANK_INVALID, C.SHAPE_MISMATCH} <= codes(problems)
