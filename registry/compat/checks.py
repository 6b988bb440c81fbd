"""The compatibility gate: pure `check_*(adapter, base, limits) -> list[Problem]` functions.

No I/O: each check reads an AdapterArtifact (from `inspect_adapter`), the served base's
BaseModelFingerprint and the engine's limits, and returns every problem it sees. `run_gate` runs
them all, so a refusal lists all reasons at once. Checks stay quiet about things an earlier check
already reported (e.g. shapes are not judged when the header could not be read).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from registry.compat.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_SUFFIXES,
    AdapterArtifact,
    TensorInfo,
)
from registry.compat.fingerprint import LLAMA_STYLE_TYPES, BaseModelFingerprint, ModuleDims
from registry.compat.problems import Problem, ProblemCode, capped

SUPPORTED_DTYPES = frozenset({"F16", "BF16", "F32"})
# The largest finite value of each dtype an engine can hold LoRA weights in.
FINITE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38}
_TORCH_DTYPE_NAMES = {"float16": "F16", "half": "F16", "bfloat16": "BF16", "float32": "F32"}
# Inits that only choose starting values; PiSSA, OLoRA, CorDA, LoftQ also rewrite the base
# weights, so their adapters are wrong on an unmodified base (vLLM refuses them too).
HARMLESS_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
MAX_LISTED = 8
MAX_SHAPE_PROBLEMS = 12
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?:model\.|language_model\.)*layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])\.weight$"
)
_EMBEDDING_PART = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|embed_out)(?:\.|$)")


@dataclass(frozen=True)
class EngineLimits:
    """What the serving engine was started with (vLLM's --max-lora-rank and its LoRA dtypes).

    `dtype` is the dtype the engine holds LoRA weights in (vLLM's resolved lora_dtype, as a
    safetensors name); None while it is not known, and then values are not judged against it."""

    max_lora_rank: int
    supported_dtypes: frozenset[str] = SUPPORTED_DTYPES
    dtype: str | None = None


@dataclass(frozen=True)
class LoraKey:
    layer: int
    module: str
    ab: str  # "A" (r x in, down-projection) or "B" (out x r, up-projection), PEFT's convention


Check = Callable[[AdapterArtifact, BaseModelFingerprint, EngineLimits], list[Problem]]


def safetensors_dtype(torch_name: str | None) -> str | None:
    """ "float16" or "torch.float16" → "F16"; None for "auto", None or a dtype not served."""
    if torch_name is None:
        return None
    return _TORCH_DTYPE_NAMES.get(torch_name.removeprefix("torch."))


def parse_lora_key(name: str) -> LoraKey | None:
    match = _LORA_KEY.fullmatch(name)
    if match is None:
        return None
    return LoraKey(int(match["layer"]), match["module"], match["ab"])


def _listed(items: Iterable[str]) -> str:
    values = sorted(set(items))
    shown = ", ".join(values[:MAX_LISTED])
    return shown + (f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else "")


def check_files(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    problems = []
    pickles = [f for f in a.files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(
            Problem(
                ProblemCode.PICKLE_WEIGHTS,
                f"{_listed(pickles)}: pickle-based weights are never loaded; save the adapter with "
                "safe_serialization=True (adapter_model.safetensors)",
            )
        )
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required not in a.files:
            problems.append(Problem(ProblemCode.MISSING_FILE, f"{required} is missing"))
    if a.unsafe_files:
        problems.append(
            Problem(
                ProblemCode.UNSAFE_FILE,
                f"{_listed(a.unsafe_files)}: symlinks and special files are not accepted",
            )
        )
    return problems


def check_safetensors(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if a.header_error is None:
        return []
    return [Problem(ProblemCode.HEADER_INVALID, f"{ADAPTER_WEIGHTS}: {a.header_error}")]


def check_peft_config(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if a.config_error is not None:
        return [Problem(ProblemCode.CONFIG_INVALID, a.config_error)]
    if a.config is None:
        return []
    config = a.config
    problems: list[Problem] = []

    def refuse(code: ProblemCode, message: str) -> None:
        problems.append(Problem(code, message))

    if a.peft_type != "LORA":
        refuse(ProblemCode.PEFT_TYPE, f"peft_type is {config.get('peft_type')!r}; only LORA")
    if config.get("use_dora"):
        refuse(ProblemCode.DORA, "use_dora is set: DoRA adapters are not supported")
    if config.get("modules_to_save"):
        refuse(
            ProblemCode.MODULES_TO_SAVE,
            f"modules_to_save {config['modules_to_save']!r}: full copies of base modules "
            "cannot be served on a shared base",
        )
    if config.get("trainable_token_indices"):
        refuse(ProblemCode.EMBEDDING_DELTA, "trainable_token_indices changes token embeddings")
    rank = config.get("r")
    if a.rank is None or a.rank <= 0:
        refuse(ProblemCode.RANK_INVALID, f"r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if a.alpha is None or a.alpha <= 0:
        refuse(ProblemCode.ALPHA_INVALID, f"lora_alpha must be a positive number, got {alpha!r}")
    for key, why in (
        ("lora_bias", "LoRA bias terms"),
        ("layer_replication", "layer replication"),
        ("rank_pattern", "per-module ranks (one rank and scale per adapter is served)"),
        ("alpha_pattern", "per-module alphas (one rank and scale per adapter is served)"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
        ("use_bdlora", "block-diagonal LoRA"),
        ("use_qalora", "QALoRA"),
        ("fan_in_fan_out", "fan_in_fan_out (transposed, Conv1D-style weights)"),
        ("target_parameters", "LoRA on raw parameters (target_parameters)"),
    ):
        if config.get(key):
            refuse(ProblemCode.FEATURE_UNSUPPORTED, f"{key} is set: {why} is not supported")
    if config.get("bias", "none") != "none":
        refuse(ProblemCode.FEATURE_UNSUPPORTED, f"bias={config['bias']!r}: only 'none'")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in HARMLESS_INITS:
        refuse(
            ProblemCode.FEATURE_UNSUPPORTED,
            f"init_lora_weights={init!r} rewrites the base weights during training; convert "
            "the adapter to plain LoRA first",
        )
    return problems


def check_rank(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if a.rank is None or a.rank <= limits.max_lora_rank:
        return []
    return [
        Problem(
            ProblemCode.RANK_EXCEEDS_LIMIT,
            f"rank r={a.rank} exceeds the engine's max_lora_rank of {limits.max_lora_rank}",
        )
    ]


def check_base_hash(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    claimed = a.declared_base_sha256
    if claimed is None or claimed.lower() == base.weights_sha256:
        return []
    return [
        Problem(
            ProblemCode.BASE_MISMATCH,
            f"the adapter was trained on base sha256 {claimed[:16]}… but the served base is "
            f"{base.weights_sha256[:16]}…",
        )
    ]


def check_tokenizer(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    problems: list[Problem] = []
    claimed = a.declared_tokenizer_sha256
    if claimed is not None and claimed.lower() != base.tokenizer_sha256:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"the adapter expects tokenizer {claimed[:16]}… but the served base's is "
                f"{base.tokenizer_sha256[:16]}…",
            )
        )
    if a.tokenizer_error is not None:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"the shipped tokenizer is unreadable: {a.tokenizer_error}",
            )
        )
    if a.tokenizer is None:
        return problems
    vocab = a.tokenizer.vocab
    missing = [t for t in vocab if t not in base.vocab]
    missing_special = [t for t in a.tokenizer.special_tokens if t not in base.vocab]
    if missing or missing_special:
        problems.append(
            Problem(
                ProblemCode.TOKENS_MISSING,
                f"the adapter's tokenizer needs {len({*missing, *missing_special})} token(s) the "
                f"base lacks: {_listed([*missing, *missing_special])}",
            )
        )
    moved = [t for t, i in vocab.items() if t in base.vocab and base.vocab[t] != i]
    if moved:
        problems.append(
            Problem(
                ProblemCode.TOKENIZER_MISMATCH,
                f"{len(moved)} token(s) have different ids than in the base: {_listed(moved)}",
            )
        )
    return problems


def check_tensors(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if a.header_error is not None or ADAPTER_WEIGHTS not in a.files:
        return []
    problems: list[Problem] = []
    if not base.modules:
        return [
            Problem(
                ProblemCode.MODULE_NOT_IN_BASE,
                f"base architecture {base.model_type!r} has no LoRA-adaptable modules known to the "
                f"registry (supported: {_listed(LLAMA_STYLE_TYPES)})",
            )
        ]
    targets = (a.config or {}).get("target_modules")
    declared = [str(t).rsplit(".", 1)[-1] for t in targets] if isinstance(targets, list) else []
    absent = {m for m in declared if m not in base.modules}
    embedding, dora, unknown, out_of_range = [], [], [], []
    pairs: dict[tuple[int, str], set[str]] = defaultdict(set)
    shape_problems: list[Problem] = []
    for tensor in a.tensors:
        key = parse_lora_key(tensor.name)
        if key is None:
            if _EMBEDDING_PART.search(tensor.name):
                embedding.append(tensor.name)
            elif "lora_magnitude_vector" in tensor.name:
                dora.append(tensor.name)
            else:
                unknown.append(tensor.name)
            continue
        pairs[(key.layer, key.module)].add(key.ab)
        dims = base.modules.get(key.module)
        if dims is None:
            absent.add(key.module)
            continue
        if key.layer >= base.num_layers:
            out_of_range.append(tensor.name)
        if (shape_problem := _shape_problem(tensor, key, dims, a.rank)) is not None:
            shape_problems.append(shape_problem)
    if absent:
        problems.append(
            Problem(
                ProblemCode.MODULE_NOT_IN_BASE,
                f"target module(s) {_listed(absent)} are not LoRA-adaptable modules of the "
                f"base; it has {_listed(base.modules)}",
            )
        )
    if embedding:
        problems.append(
            Problem(
                ProblemCode.EMBEDDING_DELTA,
                f"embedding / lm_head weights or deltas are not servable on a shared base: "
                f"{_listed(embedding)}",
            )
        )
    if dora:
        problems.append(Problem(ProblemCode.DORA, f"DoRA magnitude vectors: {_listed(dora)}"))
    if unknown:
        problems.append(
            Problem(ProblemCode.UNKNOWN_TENSOR, f"unexpected tensors: {_listed(unknown)}")
        )
    if out_of_range:
        problems.append(
            Problem(
                ProblemCode.LAYER_OUT_OF_RANGE,
                f"the base has {base.num_layers} layers; tensors beyond them: "
                f"{_listed(out_of_range)}",
            )
        )
    problems += capped(
        shape_problems, limit=MAX_SHAPE_PROBLEMS, code=ProblemCode.SHAPE_MISMATCH, what="shapes"
    )
    unpaired = [f"layer {layer} {module}" for (layer, module), ab in pairs.items() if len(ab) < 2]
    if unpaired:
        problems.append(
            Problem(
                ProblemCode.UNPAIRED_TENSOR,
                f"lora_A without lora_B or vice versa: {_listed(unpaired)}",
            )
        )
    if not pairs:
        problems.append(Problem(ProblemCode.NO_LORA_WEIGHTS, "no lora_A/lora_B weights found"))
    return problems


def _shape_problem(
    tensor: TensorInfo, key: LoraKey, dims: ModuleDims, rank: int | None
) -> Problem | None:
    """A is (r, in), B is (out, r); with no valid r in the config (reported elsewhere) the
    tensor's own rank dimension is taken so the base dims are still checked."""
    if len(tensor.shape) != 2:
        return Problem(
            ProblemCode.SHAPE_MISMATCH, f"{tensor.name}: shape {list(tensor.shape)} is not 2-D"
        )
    r = rank if rank is not None else tensor.shape[0 if key.ab == "A" else 1]
    expected = (r, dims.in_features) if key.ab == "A" else (dims.out_features, r)
    if tensor.shape == expected:
        return None
    return Problem(
        ProblemCode.SHAPE_MISMATCH,
        f"{tensor.name}: shape {list(tensor.shape)}, expected {list(expected)} (r={r}; in the "
        f"base {key.module} maps {dims.in_features} to {dims.out_features})",
    )


def check_dtypes(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    counts = Counter(t.dtype for t in a.tensors)
    bad = {dtype: n for dtype, n in counts.items() if dtype not in limits.supported_dtypes}
    supported = ", ".join(sorted(limits.supported_dtypes))
    problems = [
        Problem(ProblemCode.DTYPE_UNSUPPORTED, f"{n} tensor(s) are {dtype}; supported: {supported}")
        for dtype, n in sorted(bad.items())
    ]
    if not bad and len(counts) > 1:
        problems.append(
            Problem(
                ProblemCode.DTYPE_UNSUPPORTED, f"mixed dtypes {_listed(counts)}: save one dtype"
            )
        )
    return problems


def check_finite(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if not a.nonfinite_tensors:
        return []
    return [
        Problem(
            ProblemCode.NON_FINITE,
            f"{len(a.nonfinite_tensors)} tensor(s) contain NaN or Inf: "
            f"{_listed(a.nonfinite_tensors)}",
        )
    ]


def _rounded(value: float, dtype: str) -> float:
    """`value` as the engine holds it in `dtype` (round to nearest even, inf past the range),
    the way torch casts; without torch, so the registry need not import it."""
    with np.errstate(over="ignore"):
        if dtype == "F16":
            return float(np.float16(value))
        single = np.float32(value)
    if dtype == "BF16":  # keep the upper 16 bits of the fp32 pattern, rounded to nearest even
        bits = int(np.array(single).view(np.uint32))
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return float(np.array(bits, dtype=np.uint32).view(np.float32))
    return float(single)


def _as_served(largest: float, dtype: str, scale: float) -> float:
    """What vLLM makes of a tensor's largest magnitude: cast to the engine's dtype, then, for
    lora_B, `lora_b *= scale` (fp32 math, rounded to the dtype again). Both steps are monotonic,
    so the largest input gives the largest output and the tensor's max is all the gate needs."""
    value = _rounded(largest, dtype)
    if scale != 1.0:
        with np.errstate(over="ignore"):
            value = _rounded(float(np.float32(value) * np.float32(scale)), dtype)
    return value


def check_value_range(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    """vLLM casts A and B to the engine's dtype and then multiplies B by the scale in that
    dtype: a value past the dtype's range becomes inf there, and every output of the adapter
    with it. An fp32 adapter served in fp16 is the usual case, but an fp16 B with a scale above
    1 can overflow too, and a B that fits can round up past the range before it is scaled.
    The check replays both roundings on each tensor's largest value, so it refuses exactly what
    would overflow (values within half an ulp of the maximum round down to it and pass)."""
    dtype = limits.dtype
    if dtype not in FINITE_MAX or not a.tensor_max_abs:
        return []
    scale = a.scale or 1.0  # an invalid rank or alpha is refused by check_peft_config
    beyond: dict[str, float] = {}
    for name, largest in a.tensor_max_abs.items():
        key = parse_lora_key(name)
        if key is None:
            continue  # reported by check_tensors
        tensor_scale = scale if key.ab == "B" else 1.0
        if not math.isfinite(_as_served(largest, dtype, tensor_scale)):
            beyond[name] = largest * tensor_scale
    if not beyond:
        return []
    worst = max(beyond, key=beyond.__getitem__)
    scaled = f" (lora_B times its scale of {scale:g})" if scale != 1.0 else ""
    return [
        Problem(
            ProblemCode.VALUE_OUT_OF_RANGE,
            f"{len(beyond)} tensor(s) exceed the engine's {dtype} range (±{FINITE_MAX[dtype]:g}) "
            f"once cast{scaled}, so they would serve as inf: {_listed(beyond)}; largest "
            f"{beyond[worst]:.6g} in {worst}",
        )
    ]


CHECKS: tuple[Check, ...] = (
    check_files,
    check_safetensors,
    check_peft_config,
    check_rank,
    check_base_hash,
    check_tokenizer,
    check_tensors,
    check_dtypes,
    check_finite,
    check_value_range,
)


def run_gate(a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits) -> list[Problem]:
    """Every problem from every check, in a stable order; empty means compatible."""
    return [problem for check in CHECKS for problem in check(a, base, limits)]
