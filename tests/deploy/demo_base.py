"""The demo base's context, read from the checkpoint gateway/demo.py writes (not a copy of the
number): the shipped demo settings must not ask vLLM for more."""

from __future__ import annotations

import json
from pathlib import Path


def demo_max_position_embeddings(root: Path) -> int:
    """Builds the demo base under root (a few seconds) and returns its max_position_embeddings,
    the longest max_model_len vLLM accepts for it."""
    from gateway.demo import build_base

    build_base(root)
    return int(json.loads((root / "config.json").read_text())["max_position_embeddings"])
