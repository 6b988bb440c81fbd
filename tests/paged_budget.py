"""Sizing a paged adapter pool (LORAPLEX_PAGED_POOL_BYTES) for the demo base in tests."""

from __future__ import annotations

from gateway.demo import DemoBaseSpec

PAGE_SIZE = 4


def row_bytes(base: DemoBaseSpec = DemoBaseSpec()) -> int:
    """Bytes of one rank row (A row per slice + B column) over every paged layer, fp32."""
    h, inter = base.hidden_size, base.intermediate_size
    kv = h // base.num_attention_heads * base.num_key_value_heads
    per_layer = (3 * h + h + 2 * kv) + (h + h) + (2 * h + 2 * inter) + (inter + h)
    return base.num_hidden_layers * per_layer * 4


def pages(rank: int, page_size: int = PAGE_SIZE) -> int:
    return -(-rank // page_size)


def pool_bytes(num_pages: int, page_size: int = PAGE_SIZE) -> int:
    return num_pages * page_size * row_bytes()
