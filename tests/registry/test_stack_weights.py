"""A stack's weights are exactly the components' weighted deltas: checked on the dense matrices
(every float dtype the gate admits, rsLoRA, modules only some components adapt), through peft
(its merge of the stack equals merging the components one after the other) and the gate."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.compat.artifact import inspect_adapter
from registry.compat.checks import run_gate
from registry.compat.engine_limits import EngineLimits
from registry.compat.lora_keys import lora_tensor_name, parse_lora_key
from registry.errors import UploadTooLarge
from registry.lora_weights import peft_scale
from registry.stack_weights import StackInput, write_stack

IN, OUT, MLP = 16, 16, 32
SHAPES = {"q_proj": (IN, OUT), "v_proj": (IN, OUT), "down_proj": (MLP, OUT), "up_proj": (IN, MLP)}


def module_path(layer: int, module: str) -> str:
    parent = "mlp" if module.endswith(("up_proj", "down_proj", "gate_proj")) else "self_attn"
    return f"model.layers.{layer}.{parent}.{module}"


def write_component(
    folder: Path,
    *,
    rank: int,
    alpha: float,
    modules: list[str],
    dtype: torch.dtype,
    seed: int,
    rslora: bool = False,
    layers: tuple[int, ...] = (0, 1),
    prefix: str = "model.",
) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in layers:
        for module in modules:
            width_in, width_out = SHAPES[module]
            path = prefix + module_path(layer, module).removeprefix("model.")
            a = torch.randn(rank, width_in, generator=generator)
            b = torch.randn(width_out, rank, generator=generator)
            tensors[lora_tensor_name(path, "A")] = a.to(dtype)
            tensors[lora_tensor_name(path, "B")] = b.to(dtype)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": modules,
        "layers_to_transform": list(layers),
        "lora_dropout": 0.0,
        "bias": "none",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def deltas(folder: Path, weight: float = 1.0) -> dict[str, np.ndarray]:
    """module path -> weight x scale x B @ A in float64."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = weight * peft_scale(config)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out: dict[str, np.ndarray] = {}
    for name, tensor in tensors.items():
        key = parse_lora_key(name)
        assert key is not None
        if key.ab == "A":
            a = tensor.double().numpy()
            b = tensors[lora_tensor_name(key.module_path, "B")].double().numpy()
            out[key.module_path] = scale * (b @ a)
    return out


def summed(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    total: dict[str, np.ndarray] = {}
    for part in parts:
        for path, delta in part.items():
            total[path] = total.get(path, 0) + delta
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stack_delta_is_the_weighted_sum_of_the_components(tmp_path, dtype):
    first = write_component(
        tmp_path / "a", rank=4, alpha=8, modules=["q_proj", "v_proj"], dtype=dtype, seed=1
    )
    second = write_component(
        tmp_path / "b",
        rank=8,
        alpha=6,
        modules=["q_proj", "down_proj", "up_proj"],
        dtype=dtype,
        seed=2,
        rslora=True,
        layers=(1,),  # layer 0 only from the first: zero rows from the second there
    )
    rank = write_stack([StackInput(first, 1.0), StackInput(second, -0.5)], tmp_path / "stack")
    assert rank == 12

    config = json.loads((tmp_path / "stack" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 12, False)
    assert config["target_modules"] == ["down_proj", "q_proj", "up_proj", "v_proj"]
    assert "layers_to_transform" not in config  # the union covers layers 0 and 1
    stored = load_file(str(tmp_path / "stack" / "adapter_model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}

    want = summed(deltas(first), deltas(second, -0.5))
    got = deltas(tmp_path / "stack")
    assert sorted(got) == sorted(want)
    for path in want:
        # float32 storage of B x scale is the only rounding
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-6, err_msg=path)
    # the modules the second does not adapt in layer 0 take no rank from it: zero rows
    a0 = stored[lora_tensor_name(module_path(0, "q_proj"), "A")]
    assert torch.count_nonzero(a0[4:]) == 0 and torch.count_nonzero(a0[:4]) > 0


def test_scale_folds_alpha_over_r_and_rslora():
    assert peft_scale({"r": 8, "lora_alpha": 16}) == 2.0
    assert peft_scale({"r": 16, "lora_alpha": 8, "use_rslora": True}) == 2.0
    assert math.isclose(peft_scale({"r": 2, "lora_alpha": 1, "use_rslora": True}), 2**-0.5)


def test_components_that_disagree_on_a_shape_are_refused(tmp_path):
    first = write_component(
        tmp_path / "a", rank=2, alpha=2, modules=["q_proj"], dtype=torch.float32, seed=1
    )
    second = write_component(
        tmp_path / "b", rank=2, alpha=2, modules=["q_proj"], dtype=torch.float32, seed=2
    )
    tensors = load_file(str(second / "adapter_model.safetensors"))
    name = lora_tensor_name(module_path(0, "q_proj"), "A")
    tensors[name] = torch.zeros(2, IN + 1)
    save_file(tensors, str(second / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="disagree on its shape"):
        write_stack([StackInput(first), StackInput(second)], tmp_path / "stack")
    with pytest.raises(ValueError, match="at least two"):
        write_stack([StackInput(first)], tmp_path / "one")
    assert not (tmp_path / "stack").exists() and not (tmp_path / "one").exists()


def test_both_spellings_of_a_multimodal_language_model_are_one_module(tmp_path):
    """A Llava-style base's checkpoint says language_model.model.layers…, PEFT's live module
    model.language_model.layers…; the gate accepts either and vLLM maps both onto one module,
    where a second tensor pair would overwrite the first: the stack holds one pair."""
    saved = write_component(
        tmp_path / "a",
        rank=2,
        alpha=2,
        modules=["q_proj"],
        dtype=torch.float32,
        seed=1,
        prefix="language_model.model.",
    )
    live = write_component(
        tmp_path / "b",
        rank=3,
        alpha=3,
        modules=["q_proj"],
        dtype=torch.float32,
        seed=2,
        prefix="model.language_model.",
    )
    write_stack([StackInput(saved), StackInput(live)], tmp_path / "stack")
    stored = load_file(str(tmp_path / "stack" / "adapter_model.safetensors"))
    assert sorted(stored) == sorted(
        lora_tensor_name(f"model.language_model.layers.{layer}.self_attn.q_proj", ab)
        for layer in (0, 1)
        for ab in "AB"
    )
    for layer in (0, 1):
        path = f"model.language_model.layers.{layer}.self_attn.q_proj"
        a, b = stored[lora_tensor_name(path, "A")], stored[lora_tensor_name(path, "B")]
        want = sum(
            deltas(folder)[p]
            for folder in (saved, live)
            for p in deltas(folder)
            if p.endswith(f"layers.{layer}.self_attn.q_proj")
        )
        np.testing.assert_allclose((b.double() @ a.double()).numpy(), want, rtol=1e-6, atol=1e-6)


def test_a_stack_over_the_size_limit_is_refused_before_anything_is_written(tmp_path):
    first = write_component(
        tmp_path / "a", rank=4, alpha=4, modules=["q_proj"], dtype=torch.float16, seed=1
    )
    second = write_component(
        tmp_path / "b", rank=4, alpha=4, modules=["v_proj"], dtype=torch.float16, seed=2
    )
    # rank 8 x (16 + 16) x 4 bytes x 2 modules x 2 layers
    size = 8 * (IN + OUT) * 4 * 2 * 2
    with pytest.raises(UploadTooLarge):
        write_stack([StackInput(first), StackInput(second)], tmp_path / "big", max_bytes=size - 1)
    assert not (tmp_path / "big").exists()
    write_stack([StackInput(first), StackInput(second)], tmp_path / "fits", max_bytes=size)
    weights = tmp_path / "fits" / "adapter_model.safetensors"
    assert size < weights.stat().st_size < size + 4096  # the weights and the header


def test_a_cancelled_build_writes_nothing_once_its_work_folder_is_gone(tmp_path):
    first = write_component(
        tmp_path / "a", rank=2, alpha=2, modules=["q_proj"], dtype=torch.float32, seed=1
    )
    with pytest.raises(FileNotFoundError):
        write_stack([StackInput(first), StackInput(first)], tmp_path / "removed" / "stack")
    assert not (tmp_path / "removed").exists()


def test_peft_merges_the_stack_to_the_components_merged_in_turn(
    tmp_path, tiny_base, make_adapter, base_fp
):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    attention = make_adapter("stack-attn", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    everything = make_adapter("stack-all-rs", r=4, lora_alpha=2, use_rslora=True)
    write_stack([StackInput(attention, 2.0), StackInput(everything, 1.0)], tmp_path / "stack")

    def merged(*adapters: tuple[Path, float]) -> dict[str, torch.Tensor]:
        model = LlamaForCausalLM.from_pretrained(tiny_base, dtype=torch.float64)
        for folder, weight in adapters:
            model = PeftModel.from_pretrained(model, folder)
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.data *= weight
            model = model.merge_and_unload()
        return {k: v.clone() for k, v in model.state_dict().items()}

    want = merged((attention, 2.0), (everything, 1.0))
    got = merged((tmp_path / "stack", 1.0))
    base = merged()
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert any("mlp" in k for k in changed) and any("q_proj" in k for k in changed)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6, msg=key)

    artifact = inspect_adapter(tmp_path / "stack")
    assert run_gate(artifact, base_fp, EngineLimits(max_lora_rank=16)) == []
    assert artifact.rank == 12
