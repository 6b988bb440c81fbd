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

Module paths (`module_paths`): for each adaptable projection, where it sits in the checkpoint,
e.g. `model.layers.{layer}.self_attn.q_proj`. They come from the base's own weight names (the
safetensors headers), taking the one path whose layers are exactly 0..num_layers-1 and whose
weight has the projection's shape; a base without readable headers gets its architecture's
standard layout. peft names LoRA tensors after these paths, and vLLM applies a LoRA tensor only
where its name is such a path, so the gate compares them exactly.

Everything here reads files (I/O, blocking): call it in a thread from async code.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.compat.safetensors_header import HeaderError, read_header
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
# Where each projection of a Llama-style decoder layer lives (HF's LlamaForCausalLM layout).
LLAMA_PARENTS = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}  # fmt: skip
_WEIGHT_NAME = re.compile(
    r"(?P<prefix>(?:[A-Za-z_][A-Za-z0-9_]*\.)*?)layers\.(?P<layer>0|[1-9][0-9]{0,5})\."
    r"(?P<parent>[A-Za-z_][A-Za-z0-9_]*)\.(?P<module>[A-Za-z_][A-Za-z0-9_]*)\.weight",
    re.ASCII,
)


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
    # The served tokenizer's special-token roles (bos_token → "<s>", …).
    roles: Mapping[str, str] = field(default_factory=dict)
    # projection → its path with a `{layer}` placeholder, from the checkpoint's weight names.
    module_paths: Mapping[str, str] = field(default_factory=dict)

    def module_path(self, module: str, layer: int) -> str | None:
        """Where `module` of decoder layer `layer` lives in the base; None if nowhere known."""
        template = self.module_paths.get(module)
        if template is None and module in LLAMA_PARENTS and module in self.modules:
            template = default_module_path(module)
        return None if template is None else template.format(layer=layer)

    def module_path_spellings(self, module: str, layer: int) -> tuple[str, ...]:
        """Every name of that module an adapter may use: the checkpoint's, and for a
        multimodal base's language model also the other spelling (transformers saves Llava-
        style checkpoints as `language_model.model.layers…` while PEFT names the live
        modules `model.language_model.layers…`; vLLM maps one onto the other)."""
        path = self.module_path(module, layer)
        if path is None:
            return ()
        for saved, live in _LANGUAGE_MODEL_SPELLINGS:
            if path.startswith(saved):
                return (path, live + path.removeprefix(saved))
            if path.startswith(live):
                return (path, saved + path.removeprefix(live))
        return (path,)


def fingerprint_base_model(path: Path) -> BaseModelFingerprint:
    """Fingerprint a HF checkpoint folder (config.json, weights, tokenizer files)."""
    path = Path(path)
    config = _read_json(path / "config.json", what="config.json")
    files = weight_files(path)
    tokenizer = tokenizer_info(path)
    if tokenizer is None or not tokenizer.vocab:
        raise BaseModelError(f"{path} has no tokenizer.json or vocab.json")
    dims = architecture_dims(config)
    modules = adaptable_modules(dims)
    return BaseModelFingerprint(
        weights_sha256=weights_sha256(path, files),
        weight_files=tuple(files),
        tokenizer_sha256=tokenizer.sha256,
        special_tokens=tokenizer.special_tokens,
        vocab=tokenizer.vocab,
        roles=dict(tokenizer.roles),
        modules=modules,
        module_paths=module_paths(modules, dims["num_layers"], weight_shapes(path, files)),
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


# (checkpoint spelling, live-module spelling) of a multimodal model's language model.
_LANGUAGE_MODEL_SPELLINGS = (("language_model.model.", "model.language_model."),)


def live_module_path(path: str) -> str:
    """A module path in PEFT's live-module spelling: a multimodal base's
    `language_model.model.layers…` reads as `model.language_model.layers…` (the same module
    to vLLM); any other path as it is."""
    for saved, live in _LANGUAGE_MODEL_SPELLINGS:
        if path.startswith(saved):
            return live + path.removeprefix(saved)
    return path


def default_module_path(module: str) -> str:
    return f"model.layers.{{layer}}.{LLAMA_PARENTS[module]}.{module}"


def weight_shapes(path: Path, names: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Every weight's name and shape from the safetensors headers; None when the weights are
    not all safetensors or a header cannot be read (the standard layout is assumed then)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        if not name.endswith(".safetensors"):
            return None
        try:
            header = read_header(path / name)
        except (HeaderError, OSError):
            return None
        shapes.update((t.name, t.shape) for t in header.tensors)
    return shapes


def module_paths(
    modules: Mapping[str, ModuleDims],
    num_layers: int,
    shapes: Mapping[str, tuple[int, ...]] | None,
) -> dict[str, str]:
    """Each projection's path template, as the checkpoint names it. The path must be unique:
    one (prefix, parent) holding the projection, with its nn.Linear shape (out, in), in every
    layer 0..num_layers-1 and no other; a vision tower's q_proj, say, has other layers or
    shapes. Without one, the architecture's standard layout."""
    found: dict[str, dict[tuple[str, str], set[int]]] = defaultdict(lambda: defaultdict(set))
    for name, shape in (shapes or {}).items():
        match = _WEIGHT_NAME.fullmatch(name)
        if match is None or (dims := modules.get(match["module"])) is None:
            continue
        if shape == (dims.out_features, dims.in_features):
            found[match["module"]][(match["prefix"], match["parent"])].add(int(match["layer"]))
    every_layer = set(range(num_layers))
    paths: dict[str, str] = {}
    for module in modules:
        places = [place for place, layers in found[module].items() if layers == every_layer]
        if len(places) == 1:
            prefix, parent = places[0]
            paths[module] = f"{prefix}layers.{{layer}}.{parent}.{module}"
        elif module in LLAMA_PARENTS:
            paths[module] = default_module_path(module)
    return paths


def tokenizer_info(path: Path, *, files: Collection[str] | None = None) -> TokenizerInfo | None:
    """Vocabulary, special tokens and roles of the tokenizer saved in `path`; None if it holds
    no tokenizer file. A tokenizer_config.json alone gives special tokens and roles and an
    empty vocabulary. `files` limits reading to those names (an adapter upload passes the
    regular files it found, so nothing is read through a link); None reads whatever is there,
    links included, as a base checkpoint in a HF cache needs."""

    def present(name: str) -> bool:
        return name in files if files is not None else (path / name).is_file()

    if not any(present(name) for name in TOKENIZER_FILES):
        return None
    vocab: dict[str, int] = {}
    special: set[str] = set()
    tokenizer_json = path / "tokenizer.json"
    if present("tokenizer.json"):
        from tokenizers import Tokenizer

        try:
            _check_size(tokenizer_json)
            loaded = Tokenizer.from_file(str(tokenizer_json))
        except BaseModelError:
            raise
        except OSError as exc:
            raise BaseModelError(f"cannot read tokenizer.json: {exc.strerror}") from None
        except Exception as exc:  # the Rust side raises its own exception type
            raise BaseModelError(f"cannot load tokenizer.json: {exc}") from None
        vocab = dict(loaded.get_vocab(with_added_tokens=True))
        data = _read_json(tokenizer_json, what="tokenizer.json")
        added_tokens = data.get("added_tokens") or []
        if not isinstance(added_tokens, list):
            raise BaseModelError("tokenizer.json: added_tokens must be a list")
        for added in added_tokens:
            if isinstance(added, dict) and added.get("special") and "content" in added:
                special.add(str(added["content"]))
    elif present("vocab.json"):
        vocab = _token_ids(_read_json(path / "vocab.json", "vocab.json"), "vocab.json")
    if present("added_tokens.json"):
        added_map = _read_json(path / "added_tokens.json", what="added_tokens.json")
        vocab.update(_token_ids(added_map, "added_tokens.json"))
    roles: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if present(name):
            _collect_special(_read_json(path / name, what=name), roles, special, what=name)
    special.update(roles.values())
    canonical = {
        "vocab": sorted(([t, i] for t, i in vocab.items()), key=lambda p: (p[1], p[0])),
        "special_tokens": sorted(special),
        "roles": roles,
    }
    blob = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return TokenizerInfo(
        # surrogatepass: a lone surrogate in a token is hashed, not an exception; valid text
        # encodes exactly as before, so registered digests stay valid
        sha256=hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest(),
        vocab=vocab,
        special_tokens=frozenset(special),
        roles=roles,
    )


def _token_ids(data: Mapping[str, Any], what: str) -> dict[str, int]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise BaseModelError(f"{what} must map tokens to integer ids")
    return dict(data)


def _token_text(value: Any, where: str) -> str | None:
    """A token as a string (None for null); anything else is refused, since transformers
    could not load it either."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])  # a serialised AddedToken
    raise BaseModelError(f"{where} must be a token string or an AddedToken object")


def _collect_special(
    data: Mapping[str, Any], roles: dict[str, str], special: set[str], *, what: str
) -> None:
    for key in ROLE_KEYS:
        text = _token_text(data.get(key), f"{what}: {key}")
        if text is not None:
            roles[key] = text
    # transformers 4 writes additional_special_tokens, transformers 5 extra_special_tokens
    for key in ("additional_special_tokens", "extra_special_tokens"):
        extra = data.get(key)
        if extra is None:
            continue
        if not isinstance(extra, list | dict):
            raise BaseModelError(f"{what}: {key} must be a list of tokens")
        for value in extra.values() if isinstance(extra, dict) else extra:
            text = _token_text(value, f"{what}: each of {key}")
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
    except OSError as exc:  # its text would name a server path: the reason only
        raise BaseModelError(f"cannot read {what}: {exc.strerror or type(exc).__name__}") from None
    except ValueError as exc:
        raise BaseModelError(f"cannot read {what}: {exc}") from None
    except RecursionError:
        raise BaseModelError(f"cannot read {what}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"{what} is not a JSON object")
    return data
