"""Builders for real checkpoints and peft adapters, and byte-level surgery on their files."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

WEIGHTS = "adapter_model.safetensors"


def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def write_raw(path: Path, header: dict[str, Any], data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def edit_tensors(folder: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Load every tensor with safetensors, let `change` edit the dict, save it back validly."""
    from safetensors.torch import load_file, save_file

    path = folder / WEIGHTS
    tensors = change(dict(load_file(path)))
    save_file(tensors, path, metadata={"format": "pt"})


def flip_bit(path: Path, offset_from_end: int = 1, bit: int = 0) -> None:
    blob = bytearray(path.read_bytes())
    blob[-offset_from_end] ^= 1 << bit
    path.write_bytes(bytes(blob))


SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<unk>"]
WORDS = [f"w{i}" for i in range(92)]
ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Small, but every shape that matters: GQA (k/v out 32 vs q out 64), head_dim 16, MLP 128.
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def save_tokenizer(out: Path, extra_tokens: list[str] | None = None) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if extra_tokens:
        fast.add_tokens(extra_tokens)
    fast.save_pretrained(out)
    return len(fast)


def build_base(out: Path, **overrides: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab_size = save_tokenizer(out)
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **{**TINY, **overrides},
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return out


def build_adapter(base: Path, out: Path, *, safe: bool = True, **lora: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings: dict[str, Any] = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ALL_MODULES,
        "lora_dropout": 0.0,
        # False: random lora_B instead of zeros, so the weights are a real, non-trivial delta.
        "init_lora_weights": False,
        "task_type": "CAUSAL_LM",
        **lora,
    }
    torch.manual_seed(1)
    get_peft_model(model, LoraConfig(**settings)).save_pretrained(out, safe_serialization=safe)
    return out


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
