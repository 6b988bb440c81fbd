"""One reason a registration is refused: a stable code for machines, a sentence for people."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

MAX_LISTED = 8


class ProblemCode(StrEnum):
    # files and formats
    MISSING_FILE = "missing_file"
    PICKLE_WEIGHTS = "pickle_weights"
    UNSAFE_FILE = "unsafe_file"
    HEADER_INVALID = "safetensors_header_invalid"
    NON_FINITE = "non_finite_weights"
    VALUE_OUT_OF_RANGE = "value_out_of_engine_range"
    DTYPE_UNSUPPORTED = "dtype_unsupported"
    # adapter_config.json
    CONFIG_INVALID = "adapter_config_invalid"
    PEFT_TYPE = "peft_type_unsupported"
    FEATURE_UNSUPPORTED = "peft_feature_unsupported"
    DORA = "dora_unsupported"
    MODULES_TO_SAVE = "modules_to_save_unsupported"
    RANK_INVALID = "rank_invalid"
    RANK_EXCEEDS_LIMIT = "rank_exceeds_limit"
    ALPHA_INVALID = "alpha_invalid"
    # against the base
    BASE_MISMATCH = "base_sha256_mismatch"
    TOKENIZER_MISMATCH = "tokenizer_mismatch"
    TOKENS_MISSING = "tokens_missing_in_base"
    EMBEDDING_DELTA = "embedding_delta_unsupported"
    UNKNOWN_TENSOR = "unknown_tensor"
    MODULE_NOT_IN_BASE = "target_module_not_in_base"
    LAYER_OUT_OF_RANGE = "layer_out_of_range"
    SHAPE_MISMATCH = "shape_mismatch"
    UNPAIRED_TENSOR = "unpaired_lora_tensor"
    MODULE_NAMED_TWICE = "module_named_twice"
    NO_LORA_WEIGHTS = "no_lora_weights"
    # registry-level
    INVALID_NAME = "invalid_name"
    CARD_INVALID = "card_invalid"
    VISIBILITY_MISMATCH = "visibility_mismatch"
    DUPLICATE_ARTIFACT = "duplicate_artifact"
    ROLLBACK_PATH_INVALID = "rollback_path_invalid"
    ROLLBACK_TARGET_FAILING = "rollback_target_failing"
    LICENSE_PARTNER_ONLY = "license_partner_only"
    # stacks (registry.service.stacking)
    STACK_COMPONENT = "stack_component_invalid"
    STACKING_REFUSED = "stacking_refused"


MAX_ITEM_CHARS = 200


def printable(text: str) -> str:
    """`text` safe to store and send as UTF-8: a lone surrogate (which JSON escapes can put in
    a tensor or token name) becomes its backslash escape instead of an encoding error."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Problem:
    code: ProblemCode
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", printable(self.message))

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


def capped(problems: list[Problem], *, limit: int, code: ProblemCode, what: str) -> list[Problem]:
    """Keep the first `limit` problems and summarise the rest, so a 500-tensor mismatch stays
    readable while the count still tells the whole story."""
    if len(problems) <= limit:
        return problems
    rest = len(problems) - limit
    return [*problems[:limit], Problem(code, f"… and {rest} more {what}")]


def listed(items: Iterable[str]) -> str:
    """Up to MAX_LISTED of `items`, sorted, with a count of the rest."""
    values = sorted(set(items))
    shown = ", ".join(shortened(value) for value in values[:MAX_LISTED])
    return shown + (f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else "")


def shortened(item: str) -> str:
    """One listed item, cut so a megabyte-long tensor name cannot flood a message."""
    return item if len(item) <= MAX_ITEM_CHARS else item[:MAX_ITEM_CHARS] + "…"
