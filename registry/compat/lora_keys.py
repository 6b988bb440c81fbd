"""PEFT's tensor names for LoRA weights of a Llama-style decoder layer, parsed."""

from __future__ import annotations

import re
from dataclasses import dataclass

_LORA_KEY = re.compile(
    r"^base_model\.model\.(?:model\.|language_model\.)*layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<module>[A-Za-z0-9_]+)\.lora_(?P<ab>[AB])\.weight$"
)


@dataclass(frozen=True)
class LoraKey:
    layer: int
    module: str
    ab: str  # "A" (r x in, down-projection) or "B" (out x r, up-projection), PEFT's convention


def parse_lora_key(name: str) -> LoraKey | None:
    match = _LORA_KEY.fullmatch(name)
    if match is None:
        return None
    return LoraKey(int(match["layer"]), match["module"], match["ab"])
