"""PEFT's tensor names for LoRA weights of a decoder layer, parsed strictly.

peft names a LoRA tensor `base_model.model.<the base module's own path>.lora_A.weight`, e.g.
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` on a Llama base whose weight is
`model.layers.3.self_attn.q_proj.weight`. vLLM strips `base_model.model.` and looks the rest up
among the served model's modules; a name that matches none loads without error and is never
applied, so the adapter silently serves as the base. The parser therefore keeps every part of
the path (prefix, layer, parent) for the gate to compare with the base's own module paths, and
accepts only ASCII identifiers and a canonical layer index (no sign, no leading zeros, no
Unicode digits, at most six digits so int() is always cheap).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PEFT_PREFIX = "base_model.model."
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
LAYER_INDEX = r"0|[1-9][0-9]{0,5}"
# No real module path comes near this; longer names are not parsed at all (cheap refusals).
MAX_NAME_CHARS = 1024
_LORA_KEY = re.compile(
    rf"base_model\.model\.(?P<prefix>(?:{_NAME}\.)*?)layers\.(?P<layer>{LAYER_INDEX})\."
    rf"(?P<parent>{_NAME})\.(?P<module>{_NAME})\.lora_(?P<ab>[AB])\.weight",
    re.ASCII,
)


@dataclass(frozen=True)
class LoraKey:
    layer: int
    module: str
    ab: str  # "A" (r x in, down-projection) or "B" (out x r, up-projection), PEFT's convention
    prefix: str = "model."  # what precedes `layers.`, e.g. "model." or "model.language_model."
    parent: str = "self_attn"  # the block holding the projection: self_attn, mlp, …

    @property
    def module_path(self) -> str:
        """The base module this tensor adapts, as the checkpoint names it (no `.weight`)."""
        return f"{self.prefix}layers.{self.layer}.{self.parent}.{self.module}"


def parse_lora_key(name: str) -> LoraKey | None:
    """The parts of a PEFT LoRA tensor name, or None if `name` is not one (or its layer index
    is not canonical). Whether the path exists in the served base is the gate's question."""
    match = _LORA_KEY.fullmatch(name) if len(name) <= MAX_NAME_CHARS else None
    if match is None:
        return None
    return LoraKey(
        layer=int(match["layer"]),
        module=match["module"],
        ab=match["ab"],
        prefix=match["prefix"],
        parent=match["parent"],
    )


def lora_tensor_name(module_path: str, ab: str) -> str:
    """The name peft gives lora_`ab` of the base module at `module_path`."""
    return f"{PEFT_PREFIX}{module_path}.lora_{ab}.weight"
