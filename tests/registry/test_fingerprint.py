from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from registry.compat import BaseModelFingerprint, ModuleDims, fingerprint_base_model
from registry.compat.fingerprint import (
    adaptable_modules,
    architecture_dims,
    module_paths,
    tokenizer_info,
    weight_shapes,
)
from registry.errors import BaseModelError
from tests.registry.helpers import flip_bit, save_tokenizer


def test_dims_and_gqa_modules_from_config(base_fp: BaseModelFingerprint):
    assert (base_fp.model_type, base_fp.hidden_size, base_fp.num_layers) == ("llama", 64, 2)
    assert (base_fp.num_heads, base_fp.num_kv_heads, base_fp.head_dim) == (4, 2, 16)
    assert base_fp.modules["q_proj"] == ModuleDims(64, 64)
    assert base_fp.modules["k_proj"] == ModuleDims(64, 32)  # kv_heads * head_dim
    assert base_fp.modules["down_proj"] == ModuleDims(128, 64)
    assert base_fp.special_tokens == {"<s>", "</s>", "<pad>", "<unk>"}
    assert base_fp.weight_files == ("model.safetensors",)


def test_weights_digest_follows_the_documented_recipe(tiny_base: Path, base_fp):
    data = (tiny_base / "model.safetensors").read_bytes()
    expected = hashlib.sha256(
        b"model.safetensors\0" + len(data).to_bytes(8, "little") + data
    ).hexdigest()
    assert base_fp.weights_sha256 == expected


def test_any_flipped_bit_or_renamed_shard_changes_the_digest(
    tiny_base: Path, tmp_path: Path, base_fp
):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    assert fingerprint_base_model(copy) == base_fp  # a copy is the same base
    flip_bit(copy / "model.safetensors", offset_from_end=12345, bit=7)
    assert fingerprint_base_model(copy).weights_sha256 != base_fp.weights_sha256
    flip_bit(copy / "model.safetensors", offset_from_end=12345, bit=7)  # undo
    (copy / "model.safetensors").rename(copy / "model-00001-of-00001.safetensors")
    assert fingerprint_base_model(copy).weights_sha256 != base_fp.weights_sha256


def test_tokenizer_fingerprint_tracks_vocab_and_special_tokens(tmp_path: Path, base_fp):
    plain, extra = tmp_path / "plain", tmp_path / "extra"
    save_tokenizer(plain)
    save_tokenizer(extra, extra_tokens=["<tool>"])
    plain_info, extra_info = tokenizer_info(plain), tokenizer_info(extra)
    assert plain_info is not None and extra_info is not None
    assert plain_info.sha256 == base_fp.tokenizer_sha256
    assert extra_info.sha256 != plain_info.sha256 and "<tool>" in extra_info.vocab
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config["eos_token"] = "<pad>"  # same vocab, different roles
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_info(plain).sha256 != base_fp.tokenizer_sha256  # type: ignore[union-attr]


def test_multimodal_text_config_and_defaults():
    dims = architecture_dims(
        {"model_type": "x", "text_config": {
            "model_type": "mistral", "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 3, "num_attention_heads": 8, "vocab_size": 100, "head_dim": None,
        }}
    )  # fmt: skip
    assert (dims["model_type"], dims["num_kv_heads"], dims["head_dim"]) == ("mistral", 8, 16)
    assert adaptable_modules(dims)["k_proj"] == ModuleDims(128, 128)
    assert adaptable_modules({**dims, "model_type": "gpt2"}) == {}


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors", "tokenizer.json"])
def test_incomplete_checkpoints_are_errors(tiny_base: Path, tmp_path: Path, missing: str):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base, copy)
    (copy / missing).unlink()
    with pytest.raises(BaseModelError):
        fingerprint_base_model(copy)


def test_tokenizer_digest_recipe_is_unchanged(base_fp: BaseModelFingerprint):
    """Bases are registered by this digest: the recipe in the module docstring must hold, or
    every registered base would refuse to start."""
    canonical = {
        "vocab": sorted(([t, i] for t, i in base_fp.vocab.items()), key=lambda p: (p[1], p[0])),
        "special_tokens": sorted(base_fp.special_tokens),
        "roles": dict(base_fp.roles),
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert base_fp.tokenizer_sha256 == hashlib.sha256(blob.encode()).hexdigest()


DIMS = {"model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_heads": 2,
        "num_kv_heads": 2, "head_dim": 4}  # fmt: skip


def _shapes(prefix: str, layers: int, parent: dict[str, str] | None = None) -> dict[str, Any]:
    modules = adaptable_modules(DIMS)
    parents = parent or {m: ("mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn")
                         for m in modules}  # fmt: skip
    return {
        f"{prefix}layers.{i}.{parents[m]}.{m}.weight": (d.out_features, d.in_features)
        for i in range(layers)
        for m, d in modules.items()
    }


STANDARD_Q = "model.layers.{layer}.self_attn.q_proj"


@pytest.mark.parametrize(
    ("case", "shapes", "q_path"),
    [
        ("llama", _shapes("model.", 2), STANDARD_Q),
        ("nested", _shapes("model.lm.", 2), "model.lm.layers.{layer}.self_attn.q_proj"),
        # a vision tower with other layer counts does not compete with the decoder
        ("tower", {**_shapes("model.", 2), **_shapes("vision.", 3)}, STANDARD_Q),
        # two equally good candidates: no guess, the standard layout
        ("ambiguous", {**_shapes("a.", 2), **_shapes("b.", 2)}, STANDARD_Q),
        ("missing a layer", _shapes("x.", 1), STANDARD_Q),
        ("no headers (.bin weights)", None, STANDARD_Q),
    ],
)
def test_module_paths_follow_the_checkpoint_or_the_standard_layout(case, shapes, q_path):
    paths = module_paths(adaptable_modules(DIMS), 2, shapes)
    assert paths["q_proj"] == q_path, case
    assert set(paths) == set(adaptable_modules(DIMS))


def test_a_wrong_shape_does_not_count_as_the_module():
    shapes = _shapes("model.", 2)
    shapes["model.layers.0.self_attn.q_proj.weight"] = (3, 3)
    shapes.update({k.replace("model.", "other.", 1): v for k, v in _shapes("model.", 2).items()})
    assert module_paths(adaptable_modules(DIMS), 2, shapes)["q_proj"].startswith("other.")


def test_a_base_with_pickle_weights_gets_the_standard_layout(tiny_base: Path):
    assert weight_shapes(tiny_base, ["model.safetensors"]) is not None
    assert weight_shapes(tiny_base, ["pytorch_model.bin"]) is None
