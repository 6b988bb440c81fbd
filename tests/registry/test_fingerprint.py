from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from registry.compat import BaseModelFingerprint, ModuleDims, fingerprint_base_model
from registry.compat.fingerprint import adaptable_modules, architecture_dims, tokenizer_info
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
