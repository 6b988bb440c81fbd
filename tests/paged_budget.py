"""Sizing a paged adapter pool (LORAPLEX_PAGED_POOL_BYTES) for the demo base in tests."""

from __future__ import annotations

from gateway.demo import DemoBaseSpec

PAGE_SIZE = 4


# vLLM's layer groups of a Llama and the PEFT modules whose weights land in each
GROUP_MEMBERS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def group_row_bytes(base: DemoBaseSpec = DemoBaseSpec()) -> dict[str, int]:
    """Bytes of one rank row (A row per slice + B column) per layer group, all layers, fp32."""
    h, inter = base.hidden_size, base.intermediate_size
    kv = h // base.num_attention_heads * base.num_key_value_heads
    per_layer = {
        "qkv_proj": 3 * h + h + 2 * kv,
        "o_proj": h + h,
        "gate_up_proj": 2 * h + 2 * inter,
        "down_proj": inter + h,
    }
    return {g: base.num_hidden_layers * n * 4 for g, n in per_layer.items()}


def row_bytes(base: DemoBaseSpec = DemoBaseSpec()) -> int:
    """Bytes of one rank row over every paged layer, fp32."""
    return sum(group_row_bytes(base).values())


def pages(rank: int, page_size: int = PAGE_SIZE) -> int:
    return -(-rank // page_size)


def pool_bytes(num_pages: int, page_size: int = PAGE_SIZE) -> int:
    return num_pages * page_size * row_bytes()
