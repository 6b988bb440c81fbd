"""Static merges (registry.merge_weights): one adapter is PEFT's merge_and_unload, several are
PEFT's TIES-Merging of their deltas, and the merged checkpoint generates what the adapter
served. Through the real libraries: PEFT, transformers, safetensors, the demo model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from registry.merge_weights import (
    MERGE_RECORD,
    MergeInput,
    magnitude_prune,
    merge_into_base,
    ties,
)
from tests.e2e.merged_reference import greedy_tokens, greedy_tokens_of, merged_model

QKVO, MLP = "demo-qkvo-r8", "demo-mlp-r4"
ALL = "demo-all-r16"


def test_one_adapter_merged_is_peft_merge_and_unload(demo, tmp_path):
    out = tmp_path / "merged"
    record = merge_into_base(demo.base, [MergeInput(demo.adapters[QKVO])], out)
    assert record["modules_merged"] == 8  # q, k, v, o in both layers
    peft = merged_model(demo.base, demo.adapters[QKVO]).state_dict()
    mine = load_file(out / "model.safetensors")
    assert set(mine) == set(peft)
    for name, tensor in mine.items():
        torch.testing.assert_close(tensor, peft[name], rtol=0, atol=1e-6, msg=name)
    base = load_file(demo.base / "model.safetensors")
    assert torch.equal(
        mine["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"]
    )
    assert (out / "tokenizer.json").read_bytes() == (demo.base / "tokenizer.json").read_bytes()


def test_the_merged_checkpoint_generates_what_the_adapter_served(demo, tmp_path):
    """Seed (b): merge equivalence. The adapter's greedy output (PEFT over the base) is the
    merged checkpoint's, loaded as a plain model."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "merged"
    merge_into_base(demo.base, [MergeInput(demo.adapters[ALL])], out)
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = [1, 15, 27, 300, 42, 7]
    expected = greedy_tokens(demo.base, demo.adapters[ALL], prompt, 12)
    assert greedy_tokens_of(model, prompt, 12) == expected
    assert expected != greedy_tokens(demo.base, None, prompt, 12)  # the adapter does something


def test_ties_is_peft_merge_utils_ties():
    from peft.utils.merge_utils import ties as peft_ties

    rng = np.random.default_rng(0)
    deltas = [rng.standard_normal((24, 40)) for _ in range(3)]
    deltas[1][:, :10] = -np.abs(deltas[0][:, :10])  # disagreeing signs to elect between
    weights = [1.0, 0.5, 0.8]
    for density in (0.2, 0.5, 1.0):
        expected = peft_ties(
            [torch.from_numpy(d) for d in deltas],
            torch.tensor(weights, dtype=torch.float64),
            density,
        )
        np.testing.assert_allclose(ties(deltas, weights, density), expected.numpy(), atol=1e-12)


def test_pruning_keeps_exactly_the_density_share_by_magnitude():
    magnitudes = np.random.default_rng(1).permutation(np.arange(1, 101, dtype=np.float64))
    delta = (magnitudes * np.where(np.arange(100) % 2, 1, -1)).reshape(10, 10)
    kept = magnitude_prune(delta, 0.1)
    assert np.count_nonzero(kept) == 10
    assert set(np.abs(kept[kept != 0])) == set(range(91, 101))
    assert np.array_equal(kept[kept != 0], delta[kept != 0])  # kept as they were, signs too
    assert np.count_nonzero(magnitude_prune(delta, 0.004)) == 0  # int(0.4) entries


def test_two_adapters_merged_with_ties_write_base_plus_ties_of_their_deltas(demo, tmp_path):
    out = tmp_path / "ties"
    inputs = [MergeInput(demo.adapters[QKVO], 1.0), MergeInput(demo.adapters[ALL], 0.7)]
    record = merge_into_base(demo.base, inputs, out, method="ties", density=0.3)
    assert record["method"] == "ties" and record["density"] == 0.3
    assert [a["weight"] for a in record["adapters"]] == [1.0, 0.7]
    assert json.loads((out / MERGE_RECORD).read_text()) == record
    base, merged = load_file(demo.base / "model.safetensors"), load_file(out / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj"  # both adapters adapt it
    deltas = [_peft_delta(demo.adapters[a], name) for a in (QKVO, ALL)]
    expected = ties(deltas, [1.0, 0.7], 0.3)
    np.testing.assert_allclose(
        (merged[f"{name}.weight"] - base[f"{name}.weight"]).double().numpy(), expected, atol=1e-6
    )
    only_all = "model.layers.0.mlp.down_proj"  # only the second: its own trimmed, weighted delta
    alone = 0.7 * magnitude_prune(_peft_delta(demo.adapters[ALL], only_all), 0.3)
    np.testing.assert_allclose(
        (merged[f"{only_all}.weight"] - base[f"{only_all}.weight"]).double().numpy(),
        alone,
        atol=1e-6,
    )


def _peft_delta(folder: Path, module: str) -> np.ndarray:
    """scale·B·A read with safetensors and PEFT's config, independently of LoraFile."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
    b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
    return (config["lora_alpha"] / config["r"] * (b @ a)).numpy()


def test_an_adapter_the_gate_refuses_is_not_merged_and_nothing_is_written(demo, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    source = demo.adapters[QKVO]
    (bad / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    save_file(
        {k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()},
        bad / "adapter_model.safetensors",
    )
    out = tmp_path / "merged"
    with pytest.raises(ValueError, match="incompatible with the base") as refused:
        merge_into_base(demo.base, [MergeInput(bad)], out)
    assert "qq_proj" in str(refused.value)
    assert not out.exists() and list(tmp_path.glob(".merged-*")) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "slerp"}, "method"),
        ({"method": "ties", "density": 0.0}, "density"),
        ({"method": "ties", "density": 1.5}, "density"),
        ({"method": "linear", "density": 0.5}, "only for ties"),
    ],
)
def test_bad_options_are_refused_before_any_work(demo, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        merge_into_base(demo.base, [MergeInput(demo.adapters[QKVO])], tmp_path / "m", **options)
    assert not (tmp_path / "m").exists()


def test_an_existing_destination_is_never_overwritten(demo, tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="exists"):
        merge_into_base(demo.base, [MergeInput(demo.adapters[QKVO])], tmp_path / "m")


def test_copies_of_the_weights_the_merge_does_not_rewrite_are_left_out(demo, tmp_path):
    """A pytorch .bin or Mistral's consolidated file beside the safetensors would serve the
    plain base from the merged folder."""
    base = tmp_path / "base"
    shutil.copytree(demo.base, base)
    shutil.copyfile(base / "model.safetensors", base / "consolidated.safetensors")
    (base / "pytorch_model.bin").write_bytes(b"not merged")
    out = tmp_path / "merged"
    record = merge_into_base(base, [MergeInput(demo.adapters[QKVO])], out)
    assert record["left_out"] == ["consolidated.safetensors", "pytorch_model.bin"]
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors")) == [
        "model.safetensors"
    ]


def test_a_merge_that_overflows_the_bases_dtype_is_refused(demo, tmp_path):
    base = tmp_path / "base-f16"
    shutil.copytree(demo.base, base)
    tensors = load_file(base / "model.safetensors")
    half = {name: t.half() for name, t in tensors.items()}
    half["model.layers.0.self_attn.q_proj.weight"].fill_(65504.0)  # float16's largest
    save_file(half, base / "model.safetensors")
    with pytest.raises(ValueError, match="overflows F16"):
        merge_into_base(base, [MergeInput(demo.adapters[QKVO], 1e4)], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
