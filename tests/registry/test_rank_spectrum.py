"""The rank diagnostic against dense linear algebra: each module's singular values are those of
its delta s·B·A, and truncation writes the best rank-k approximation of every module (exactly
the delta at full rank), which peft loads and the gate accepts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.compat.artifact import inspect_adapter
from registry.compat.checks import run_gate
from registry.compat.engine_limits import EngineLimits
from registry.compat.lora_keys import lora_tensor_name
from registry.errors import UploadTooLarge
from registry.rank_spectrum import (
    ModuleSpectrum,
    rank_needed,
    rank_warnings,
    spectra,
    write_truncated,
)

PATH = "model.layers.0.self_attn.q_proj"


def write_adapter(
    folder: Path,
    a: np.ndarray,
    b: np.ndarray,
    alpha: float,
    rslora: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    folder.mkdir()
    tensors = {
        lora_tensor_name(PATH, "A"): torch.from_numpy(a).to(dtype),
        lora_tensor_name(PATH, "B"): torch.from_numpy(b).to(dtype),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": a.shape[0],
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": ["q_proj"],
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def delta(folder: Path) -> np.ndarray:
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    rank = config["r"]
    scale = config["lora_alpha"] / (rank**0.5 if config.get("use_rslora") else rank)
    a = tensors[lora_tensor_name(PATH, "A")].double().numpy()
    b = tensors[lora_tensor_name(PATH, "B")].double().numpy()
    return scale * b @ a


@pytest.mark.parametrize(
    ("rank", "width_in", "width_out", "rslora"),
    [(8, 16, 24, False), (8, 16, 24, True), (8, 32, 4, False), (3, 5, 5, False)],
)
def test_singular_values_are_the_deltas(tmp_path, rank, width_in, width_out, rslora):
    generator = np.random.default_rng(rank + width_out)
    a = generator.standard_normal((rank, width_in)).astype(np.float32)
    b = generator.standard_normal((width_out, rank)).astype(np.float32)
    folder = write_adapter(tmp_path / "a", a, b, alpha=2 * rank, rslora=rslora)
    (module,) = spectra(folder)
    dense = np.linalg.svd(delta(folder), compute_uv=False)[: len(module.singular_values)]
    assert module.path == PATH
    assert len(module.singular_values) == min(rank, width_out, width_in)
    np.testing.assert_allclose(module.singular_values, dense, rtol=1e-9, atol=1e-9)


def test_energy_counts_squared_singular_values():
    module = ModuleSpectrum(PATH, (4.0, 3.0))  # energies 16/25 and 9/25
    assert module.energy_at(1) == pytest.approx(0.64) and module.energy_at(2) == 1.0
    assert [module.rank_for(e) for e in (0.5, 0.64, 0.65, 1.0)] == [1, 1, 2, 2]
    assert ModuleSpectrum(PATH, (0.0, 0.0)).rank_for(0.95) == 1
    other = ModuleSpectrum("x", (1.0, 1.0, 1.0))
    assert rank_needed([module, other], 0.95) == 3


def test_truncation_is_the_best_low_rank_approximation(tmp_path):
    generator = np.random.default_rng(7)
    # a rank-2 delta plus a little noise in six more directions
    a = generator.standard_normal((8, 24))
    b = generator.standard_normal((20, 8)) * np.array([10, 8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    folder = write_adapter(tmp_path / "a", a, b, alpha=16)
    original = delta(folder)
    sigma = np.linalg.svd(original, compute_uv=False)
    (module,) = spectra(folder)
    assert module.rank_for(0.95) == 2

    write_truncated(folder, tmp_path / "r2", 2)
    config = json.loads((tmp_path / "r2" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (2, 2, False)
    error = np.linalg.norm(delta(tmp_path / "r2") - original) ** 2
    assert error == pytest.approx(float(np.sum(sigma[2:] ** 2)), rel=1e-4)  # Eckart-Young

    write_truncated(folder, tmp_path / "r8", 8)  # full rank: the same delta
    np.testing.assert_allclose(delta(tmp_path / "r8"), original, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"within 1\.\.8"):
        write_truncated(folder, tmp_path / "r9", 9)


def test_peft_loads_a_truncated_adapter_and_the_gate_accepts_it(
    tmp_path, tiny_base, make_adapter, base_fp
):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    source = make_adapter("spectrum-all", r=8, lora_alpha=16)
    write_truncated(source, tmp_path / "full", 8)
    write_truncated(source, tmp_path / "half", 4)

    def merged(folder: Path) -> dict[str, torch.Tensor]:
        model = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float64)
        return PeftModel.from_pretrained(model, folder).merge_and_unload().state_dict()

    want, full, half = merged(source), merged(tmp_path / "full"), merged(tmp_path / "half")
    for key in want:
        torch.testing.assert_close(full[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    assert any(not torch.allclose(half[k], want[k]) for k in want)
    for folder in (tmp_path / "full", tmp_path / "half"):
        assert run_gate(inspect_adapter(folder), base_fp, EngineLimits(max_lora_rank=16)) == []


def test_warnings_name_large_ranks_and_unused_rank():
    assert rank_warnings(16, 16, 0.95) == []
    (unused,) = rank_warnings(16, 4, 0.95)
    assert "95% of its delta at rank 4 of 16" in unused and "weighs 25% as much" in unused
    large = rank_warnings(64, 64, 0.95)
    assert len(large) == 1 and "rank 64 is above 32" in large[0]


@pytest.mark.parametrize(
    ("rank", "width_in", "width_out", "rslora", "dtype"),
    [
        (8, 16, 24, True, torch.float32),
        (8, 32, 4, False, torch.float32),  # out < r
        (8, 4, 32, False, torch.float32),  # in < r
        (6, 16, 24, False, torch.float16),
        (6, 16, 24, False, torch.bfloat16),
    ],
)
def test_truncation_in_every_shape_and_dtype(tmp_path, rank, width_in, width_out, rslora, dtype):
    generator = np.random.default_rng(rank * width_out + width_in)
    a = generator.standard_normal((rank, width_in)) * 0.05  # small A, large B: unbalanced
    b = generator.standard_normal((width_out, rank)) * 50
    folder = write_adapter(tmp_path / "a", a, b, alpha=rank, rslora=rslora, dtype=dtype)
    original = delta(folder)
    sigma = np.linalg.svd(original, compute_uv=False)
    write_truncated(folder, tmp_path / "r2", 2)
    stored = load_file(str(tmp_path / "r2" / "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {dtype}  # the source's dtype: 2/r its bytes
    a2 = stored[lora_tensor_name(PATH, "A")].double()
    b2 = stored[lora_tensor_name(PATH, "B")].double()
    # the singular values split evenly: both factors carry the root of each, neither grows alone
    assert torch.linalg.norm(a2) == pytest.approx(float(torch.linalg.norm(b2)), rel=1e-2)
    error = np.linalg.norm(delta(tmp_path / "r2") - original) ** 2
    best = float(np.sum(sigma[2:] ** 2))
    rounding = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert error == pytest.approx(best, rel=rounding, abs=rounding * float(np.sum(sigma**2)))


def test_a_truncation_over_the_size_limit_writes_nothing(tmp_path):
    generator = np.random.default_rng(3)
    a, b = generator.standard_normal((8, 16)), generator.standard_normal((24, 8))
    folder = write_adapter(tmp_path / "a", a, b, alpha=8, dtype=torch.bfloat16)
    size = 4 * (16 + 24) * 2  # rank 4, bf16
    with pytest.raises(UploadTooLarge):
        write_truncated(folder, tmp_path / "big", 4, max_bytes=size - 1)
    assert not (tmp_path / "big").exists()
    write_truncated(folder, tmp_path / "fits", 4, max_bytes=size)
    source = (folder / "adapter_model.safetensors").stat().st_size
    assert (tmp_path / "fits" / "adapter_model.safetensors").stat().st_size < source
