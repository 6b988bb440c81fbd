"""Fingerprints of a base checkpoint and of tokenizers: what "the same base" means.

Weights digest (`weights_sha256`): the weight files are the `*.safetensors` files directly in
the checkpoint folder (`*.bin` only when there are none), sorted by file name compared as UTF-8
bytes; the digest is sha256 over, for each file in that order,
`name (UTF-8) ‖ 0x00 ‖ size (8-byte little-endian) ‖ file bytes`. Names and sizes are in the
stream so re-sharding or renaming a shard changes the digest, and one flipped bit anywhere in any
weight file changes it too.

Tokenizer digest (`tokenizer_sha256`): sha256 over canonical JSON (sorted keys, no spaces, UTF-8)
of {"vocab": [[token, id], …] sorted by id then token, "special_tokens": sorted contents,
"roles": {"bos_token": …, "eos_token": …, …}}. Vocabulary comes from tokenizer.json (with added
tokens) or vocab.json + added_tokens.json; special tokens from tokenizer.json's added tokens
marked special, tokenizer_config.json and special_tokens_map.json. Merges, normalizers and the
chat template are deliberately outside it: they change how text is cut, not which ids exist.

Everything here reads files (I/O, blocking): call it in a thread from async code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.errors import BaseModelError

CHUNK = 4 * 1024 * 1024
MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024
# Llama-family projections: each is a plain nn.Linear in every decoder layer, all layers alike.
LLAMA_STYLE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
ROLE_KEYS = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
)  # fmt: skip
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json",
)  # fmt: skip


@dataclass(frozen=True)
class ModuleDims:
    """nn.Linear(in_features → out_features); LoRA A is (r, in), B is (out, r)."""

    in_features: int
    out_features: int


@dataclass(frozen=True)
class TokenizerInfo:
    sha256: str
    vocab: Mapping[str, int] = field(repr=False)
    special_tokens: frozenset[str]
    roles: Mapping[str, str]


@dataclass(frozen=True)
class BaseModelFingerprint:
    """Everything the compatibility gate needs to know about the served base."""

    weights_sha256: str
    weight_files: tuple[str, ...]
    tokenizer_sha256: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    modules: Mapping[str, ModuleDims]
    special_tokens: frozenset[str] = frozenset()
    vocab: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)


def fingerprint_base_model(path: Path) -> BaseModelFingerprint:
    """Fingerprint a HF checkpoint folder (config.json, weights, tokenizer files)."""
    path = Path(path)
    config = _read_json(path / "config.json", what="config.json")
    files = weight_files(path)
    tokenizer = tokenizer_info(path)
    if tokenizer is None:
        raise BaseModelError(f"{path} has no tokenizer.json or vocab.json")
    dims = architecture_dims(config)
    return BaseModelFingerprint(
        weights_sha256=weights_sha256(path, files),
        weight_files=tuple(files),
        tokenizer_sha256=tokenizer.sha256,
        special_tokens=tokenizer.special_tokens,
        vocab=tokenizer.vocab,
        modules=adaptable_modules(dims),
        **dims,
    )


def weight_files(path: Path) -> list[str]:
    for pattern in ("*.safetensors", "*.bin"):
        names = sorted((p.name for p in path.glob(pattern) if p.is_file()), key=str.encode)
        if names:
            return names
    raise BaseModelError(f"{path} has no *.safetensors (or *.bin) weight files")


def weights_sha256(path: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        file_path = path / name
        digest.update(name.encode() + b"\0" + file_path.stat().st_size.to_bytes(8, "little"))
        with file_path.open("rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def architecture_dims(config: Mapping[str, Any]) -> dict[str, Any]:
    """Decoder dims from config.json; multimodal configs keep them under text_config."""
    text = config.get("text_config") or config

    def positive(key: str, default: Any = None) -> int:
        value = text.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise BaseModelError(f"config.json: {key} must be a positive integer, got {value!r}")
        return value

    heads = positive("num_attention_heads")
    hidden = positive("hidden_size")
    return {
        "model_type": str(text.get("model_type") or config.get("model_type") or "unknown"),
        "hidden_size": hidden,
        "intermediate_size": positive("intermediate_size"),
        "num_layers": positive("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": positive("num_key_value_heads", heads),
        "head_dim": positive("head_dim", hidden // heads),
        "vocab_size": positive("vocab_size"),
    }


def adaptable_modules(dims: Mapping[str, Any]) -> dict[str, ModuleDims]:
    """LoRA-targetable projections and their dims; empty for architectures we do not know, so
    every adapter on them is refused rather than guessed at."""
    if dims["model_type"] not in LLAMA_STYLE_TYPES:
        return {}
    hidden, inter = dims["hidden_size"], dims["intermediate_size"]
    q_out = dims["num_heads"] * dims["head_dim"]
    kv_out = dims["num_kv_heads"] * dims["head_dim"]  # grouped-query attention: narrower k/v
    return {
        "q_proj": ModuleDims(hidden, q_out),
        "k_proj": ModuleDims(hidden, kv_out),
        "v_proj": ModuleDims(hidden, kv_out),
        "o_proj": ModuleDims(q_out, hidden),
        "gate_proj": ModuleDims(hidden, inter),
        "up_proj": ModuleDims(hidden, inter),
        "down_proj": ModuleDims(inter, hidden),
    }


def tokenizer_info(path: Path) -> TokenizerInfo | None:
    """Vocabulary and special tokens of the tokenizer saved in `path`; None if there is none."""
    vocab: dict[str, int] = {}
    special: set[str] = set()
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.is_file():
        from tokenizers import Tokenizer

        _check_size(tokenizer_json)
        try:
            loaded = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # the Rust side raises its own exception type
            raise BaseModelError(f"cannot load tokenizer.json: {exc}") from None
        vocab = dict(loaded.get_vocab(with_added_tokens=True))
        data = _read_json(tokenizer_json, what="tokenizer.json")
        for added in data.get("added_tokens") or []:
            if isinstance(added, dict) and added.get("special") and "content" in added:
                special.add(str(added["content"]))
    elif (path / "vocab.json").is_file():
        vocab = _token_ids(_read_json(path / "vocab.json", "vocab.json"), "vocab.json")
    if (path / "added_tokens.json").is_file():
        added_map = _read_json(path / "added_tokens.json", what="added_tokens.json")
        vocab.update(_token_ids(added_map, "added_tokens.json"))
    roles: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).is_file():
            _collect_special(_read_json(path / name, what=name), roles, special)
    if not vocab:
        return None
    special.update(roles.values())
    canonical = {
        "vocab": sorted(([t, i] for t, i in vocab.items()), key=lambda p: (p[1], p[0])),
        "special_tokens": sorted(special),
        "roles": roles,
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return TokenizerInfo(
        sha256=hashlib.sha256(blob.encode()).hexdigest(),
        vocab=vocab,
        special_tokens=frozenset(special),
        roles=roles,
    )


def _token_ids(data: Mapping[str, Any], what: str) -> dict[str, int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise BaseModelError(f"{what} must map tokens to integer ids")
    return dict(data)


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])  # a serialised AddedToken
    return None


def _collect_special(data: Mapping[str, Any], roles: dict[str, str], special: set[str]) -> None:
    for key in ROLE_KEYS:
        text = _token_text(data.get(key))
        if text is not None:
            roles[key] = text
    # transformers 4 writes additional_special_tokens, transformers 5 extra_special_tokens
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = data.get(key)
        values = extra.values() if isinstance(extra, dict) else extra or []
        for value in values:
            text = _token_text(value)
            if text is not None:
                special.add(text)


def _check_size(path: Path) -> None:
    size = path.stat().st_size
    if size > MAX_TOKENIZER_FILE_BYTES:
        raise BaseModelError(
            f"{path.name} is {size} bytes; the limit is {MAX_TOKENIZER_FILE_BYTES}"
        )


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        _check_size(path)
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"cannot read {what}: {exc}") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"{what} is not a JSON object")
    return data
