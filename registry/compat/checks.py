"""The compatibility gate: pure `check_*(adapter, base, limits) -> list[Problem]` functions.

No I/O: each check reads an AdapterArtifact (from `inspect_adapter`), the served base's
BaseModelFingerprint and the engine's limits, and returns every problem it sees. `run_gate` runs
them all, so a refusal lists all reasons at once. Checks stay quiet about things an earlier check
already reported (e.g. shapes are not judged when the header could not be read). The checks on
dtypes and values live in value_checks.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from registry.compat.artifact import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_SUFFIXES,
    AdapterArtifact,
    TensorInfo,
)
from registry.compat.engine_limits import EngineLimits
from registry.compat.fingerprint import LLAMA_STYLE_TYPES, BaseModelFingerprint, ModuleDims
from registry.compat.lora_keys import LoraKey, lora_tensor_name, parse_lora_key
from registry.compat.problems import Problem, ProblemCode, capped, listed, shortened
from registry.compat.tokenizer_checks import check_tokenizer
from registry.compat.value_checks import (
    check_dtypes,
    check_finite,
    check_value_range,
    check_vanishing,
)

# Inits that only choose starting values; PiSSA, OLoRA, CorDA, LoftQ also rewrite the base
# weights, so their adapters are wrong on an unmodified base (vLLM refuses them too).
HARMLESS_INITS = frozenset({"gaussian", "eva", "orthogonal", "mica", "lora_ga"})
# The fields vLLM's PEFTHelper.from_dict requires (its dataclass fields without defaults); it
# refuses a config that lacks any of them, whatever their values.
VLLM_REQUIRED_FIELDS = ("r", "lora_alpha", "target_modules")
MAX_SHAPE_PROBLEMS = 12
_EMBEDDING_PART = re.compile(r"(?:^|\.)(?:embed_tokens|lm_head|wte|embed_out)(?:\.|$)")


Check = Callable[[AdapterArtifact, BaseModelFingerprint, EngineLimits], list[Problem]]


def check_files(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    problems = []
    pickles = [f for f in a.files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        problems.append(
            Problem(
                ProblemCode.PICKLE_WEIGHTS,
                f"{listed(pickles)}: pickle-based weights are never loaded; save the adapter with "
                "safe_serialization=True (adapter_model.safetensors)",
            )
        )
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if required in a.directories:
            problems.append(
                Problem(ProblemCode.MISSING_FILE, f"{required} is a folder, not a file")
            )
        elif required not in a.files:
            problems.append(Problem(ProblemCode.MISSING_FILE, f"{required} is missing"))
    if a.unsafe_files:
        problems.append(
            Problem(
                ProblemCode.UNSAFE_FILE,
                f"{listed(a.unsafe_files)}: symlinks and special files are not accepted",
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

    missing = [key for key in VLLM_REQUIRED_FIELDS if key not in config]
    if missing:
        refuse(
            ProblemCode.CONFIG_INVALID,
            f"{ADAPTER_CONFIG} lacks {', '.join(missing)}: vLLM requires "
            f"{', '.join(VLLM_REQUIRED_FIELDS)}",
        )
    targets = config.get("target_modules")
    if "target_modules" in config and not _is_targets(targets):
        refuse(
            ProblemCode.CONFIG_INVALID,
            f"target_modules must be a module name or a list of module names, got "
            f"{type(targets).__name__}",
        )
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
    if "r" in config and (a.rank is None or a.rank <= 0):
        refuse(ProblemCode.RANK_INVALID, f"r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if "lora_alpha" in config and (a.alpha is None or a.alpha <= 0):
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


def _regular_files(a: AdapterArtifact) -> set[str]:
    return set(a.files) - set(a.unsafe_files) - set(a.directories)


def _is_targets(value: object) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


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


def check_tensors(
    a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits
) -> list[Problem]:
    if a.header_error is not None or ADAPTER_WEIGHTS not in _regular_files(a):
        return []  # unreadable or not there: reported by check_safetensors / check_files
    problems: list[Problem] = []
    if not base.modules:
        return [
            Problem(
                ProblemCode.MODULE_NOT_IN_BASE,
                f"base architecture {base.model_type!r} has no LoRA-adaptable modules known to the "
                f"registry (supported: {listed(LLAMA_STYLE_TYPES)})",
            )
        ]
    targets = (a.config or {}).get("target_modules")
    # a string is a regex over module paths: which modules it names is not checked here
    declared = (
        [t.rsplit(".", 1)[-1] for t in targets]
        if isinstance(targets, list) and _is_targets(targets)
        else []
    )
    absent = {m for m in declared if m not in base.modules}
    embedding, dora, unknown, out_of_range = [], [], [], []
    misplaced: dict[str, str] = {}  # tensor name → the name peft gives it on this base
    pairs: dict[str, set[str]] = defaultdict(set)
    spelled: dict[str, set[str]] = defaultdict(set)  # base module → the names used for it
    shape_problems: list[Problem] = []
    lora_tensors = 0
    for tensor in a.tensors:
        key = parse_lora_key(tensor.name)
        lora_tensors += key is not None
        if key is None:
            if _EMBEDDING_PART.search(tensor.name):
                embedding.append(tensor.name)
            elif "lora_magnitude_vector" in tensor.name:
                dora.append(tensor.name)
            else:
                unknown.append(tensor.name)
            continue
        dims = base.modules.get(key.module)
        spellings = base.module_path_spellings(key.module, key.layer)
        if dims is None or not spellings:
            absent.add(key.module)
            continue
        if key.module_path not in spellings:
            # vLLM would load it under a module name the served model lacks, and never apply it
            misplaced[tensor.name] = lora_tensor_name(spellings[0], key.ab)
            continue
        pairs[key.module_path].add(key.ab)
        spelled[spellings[0]].add(key.module_path)
        if key.layer >= base.num_layers:
            out_of_range.append(tensor.name)
        if (shape_problem := _shape_problem(tensor, key, dims, a.rank)) is not None:
            shape_problems.append(shape_problem)
    if absent:
        problems.append(
            Problem(
                ProblemCode.MODULE_NOT_IN_BASE,
                f"target module(s) {listed(absent)} are not LoRA-adaptable modules of the "
                f"base; it has {listed(base.modules)}",
            )
        )
    if embedding:
        problems.append(
            Problem(
                ProblemCode.EMBEDDING_DELTA,
                f"embedding / lm_head weights or deltas are not servable on a shared base: "
                f"{listed(embedding)}",
            )
        )
    if dora:
        problems.append(Problem(ProblemCode.DORA, f"DoRA magnitude vectors: {listed(dora)}"))
    if unknown:
        problems.append(
            Problem(
                ProblemCode.UNKNOWN_TENSOR,
                f"unexpected tensors: {listed(unknown)}; LoRA tensors are named "
                "base_model.model.<base module path>.lora_A.weight / .lora_B.weight, the layer "
                "index in plain digits without leading zeros",
            )
        )
    if misplaced:
        first = min(misplaced)
        problems.append(
            Problem(
                ProblemCode.UNKNOWN_TENSOR,
                f"{len(misplaced)} tensor(s) name no module of the base, so vLLM would load "
                f"them and never apply them: {listed(misplaced)}; e.g. {shortened(first)} "
                f"should be {misplaced[first]}",
            )
        )
    if out_of_range:
        problems.append(
            Problem(
                ProblemCode.LAYER_OUT_OF_RANGE,
                f"the base has {base.num_layers} layers; tensors beyond them: "
                f"{listed(out_of_range)}",
            )
        )
    problems += capped(
        shape_problems, limit=MAX_SHAPE_PROBLEMS, code=ProblemCode.SHAPE_MISMATCH, what="shapes"
    )
    twice = [f"{' and '.join(sorted(names))}" for names in spelled.values() if len(names) > 1]
    if twice:
        # vLLM maps both names onto the one module and keeps whichever it loads last
        problems.append(
            Problem(
                ProblemCode.MODULE_NAMED_TWICE,
                f"tensors name one base module under two spellings (one would silently replace "
                f"the other): {listed(twice)}",
            )
        )
    unpaired = [path for path, ab in pairs.items() if len(ab) < 2]
    if unpaired:
        problems.append(
            Problem(
                ProblemCode.UNPAIRED_TENSOR,
                f"lora_A without lora_B or vice versa: {listed(unpaired)}",
            )
        )
    if not lora_tensors:
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
    check_vanishing,
)


def run_gate(a: AdapterArtifact, base: BaseModelFingerprint, limits: EngineLimits) -> list[Problem]:
    """Every problem from every check, in a stable order; empty means compatible."""
    return [problem for check in CHECKS for problem in check(a, base, limits)]
