"""Pool groups: what an adapter is charged per layer group, how the byte budget is split
between groups, and the demand profile's wire format."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kernels.page_groups import (
    DemandEntry,
    PoolGroup,
    PoolGroups,
    demand_by_group,
    format_demand,
    lora_weight_ranks,
    pages_fit,
    parse_demand,
    split_pages,
)

# The demo Llama's groups: bytes of one page of 4 rank rows, both decoder layers, fp32.
BYTES = {"qkv_proj": 40_960, "o_proj": 16_384, "gate_up_proj": 49_152, "down_proj": 24_576}
MEMBERS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


def groups(pages: int = 32) -> PoolGroups:
    return PoolGroups(4, tuple(PoolGroup(g, pages, MEMBERS[g], BYTES[g]) for g in BYTES))


@pytest.mark.parametrize(
    ("ranks", "pages"),
    [
        ({"q_proj": 32, "v_proj": 32}, (8, 0, 0, 0)),
        ({"gate_proj": 4, "up_proj": 4, "down_proj": 4}, (0, 0, 1, 1)),
        ({"q_proj": 8, "k_proj": 8, "v_proj": 8, "o_proj": 8}, (2, 2, 0, 0)),
        ({"q_proj": 4, "o_proj": 12}, (1, 3, 0, 0)),  # per-module ranks (rank_pattern)
        ({"qkv_proj": 5}, (2, 0, 0, 0)),  # already-fused names (some models register them)
        ({"lm_head": 16}, (0, 0, 0, 0)),  # not a paged layer (the worker refuses it anyway)
        (None, (8, 8, 8, 8)),  # no readable safetensors header: max_lora_rank everywhere
    ],
)
def test_an_adapter_is_charged_where_its_weights_land(ranks, pages):
    assert groups().adapter_pages(ranks, fallback_rank=32) == pages


def write_safetensors(path: Path, header: dict) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_weight_ranks_come_from_the_header_not_the_config(tmp_path):
    """A config that names q_proj alone over weights for q and down: vLLM loads the tensors, so
    the charge must follow them (the scheduler would otherwise book q/k/v only and the worker
    run out of MLP pages mid-step)."""
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": 8, "target_modules": ["q_proj"]})
    )
    prefix = "base_model.model.model.layers"
    header = {
        "__metadata__": {"format": "pt"},
        f"{prefix}.0.self_attn.q_proj.lora_A.weight": {"dtype": "F32", "shape": [8, 64]},
        f"{prefix}.0.self_attn.q_proj.lora_B.weight": {"dtype": "F32", "shape": [64, 8]},
        f"{prefix}.1.mlp.down_proj.lora_A.weight": {"dtype": "F32", "shape": [16, 128]},
        f"{prefix}.1.mlp.down_proj.lora_B.weight": {"dtype": "F32", "shape": [64, 16]},
    }
    write_safetensors(tmp_path / "adapter_model.safetensors", header)
    ranks = lora_weight_ranks(tmp_path)
    assert ranks == {"q_proj": 8, "down_proj": 16}
    assert groups().adapter_pages(ranks, fallback_rank=32) == (2, 0, 0, 4)


def test_a_real_peft_adapter_and_unreadable_weights(tmp_path, demo):
    assert lora_weight_ranks(demo.adapters["demo-qv-rs32"]) == {"q_proj": 32, "v_proj": 32}
    assert lora_weight_ranks(demo.adapters["demo-mlp-r4"]) == dict.fromkeys(
        ("gate_proj", "up_proj", "down_proj"), 4
    )
    assert lora_weight_ranks(tmp_path) is None  # no weights file (e.g. adapter_model.bin)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 16)
    assert lora_weight_ranks(tmp_path) is None  # a header length beyond any adapter's
    write_safetensors(tmp_path / "adapter_model.safetensors", {"lora_A.weight": {"shape": [4]}})
    assert lora_weight_ranks(tmp_path) is None  # not PEFT's layout: the worst case is charged


def test_fitting_holds_in_every_group():
    assert pages_fit((8, 0), (0, 4), (8, 4))
    assert not pages_fit((8, 0), (1, 0), (8, 4))
    assert pages_fit((12, 0), (4, 0), (8, 4), factor=2.0)


def test_without_demand_every_group_gets_the_same_pages():
    per_round = sum(BYTES.values())
    assert split_pages(32 * per_round + 100, BYTES, 8) == dict.fromkeys(BYTES, 32)
    assert split_pages(32 * per_round, BYTES, 8, dict.fromkeys(BYTES, 0.0)) == dict.fromkeys(
        BYTES, 32
    )


def test_demand_moves_bytes_to_the_groups_adapters_use_within_the_budget():
    budget = 32 * sum(BYTES.values())  # 4 MiB: 32 pages in every group when split equally
    # the residency benchmark's 64 adapters: ranks 4 (MLP), 8 (q/k/v/o), 16 (all), 32 (q/v)
    population = [
        DemandEntry(4, ("down_proj", "gate_proj", "up_proj"), 11),
        DemandEntry(8, ("k_proj", "o_proj", "q_proj", "v_proj"), 20),
        DemandEntry(16, tuple(p for m in MEMBERS.values() for p in m), 18),
        DemandEntry(32, ("q_proj", "v_proj"), 15),
    ]
    demand = demand_by_group(population, MEMBERS, 4, BYTES)
    assert demand["qkv_proj"] == (20 * 2 + 18 * 4 + 15 * 8) * BYTES["qkv_proj"]
    assert demand["o_proj"] == (20 * 2 + 18 * 4) * BYTES["o_proj"]
    pages = split_pages(budget, BYTES, 8, demand)
    spent = sum(pages[g] * BYTES[g] for g in BYTES)
    assert spent <= budget and budget - spent < min(BYTES.values())  # nothing left to give
    assert all(p >= 8 for p in pages.values())  # room for one rank-32 adapter everywhere
    assert pages["qkv_proj"] >= 48 and pages["o_proj"] > 20  # the groups most adapters touch
    assert pages["gate_up_proj"] < 32 and pages["down_proj"] < 32
    # the 8 most popular adapters (need 40 pages of a one-ledger pool of 32) now fit together
    top8 = [(8, 0, 0, 0), (4, 4, 4, 4), (8, 0, 0, 0), (4, 4, 4, 4)]
    top8 += [(2, 2, 0, 0), (4, 4, 4, 4), (2, 2, 0, 0), (8, 0, 0, 0)]
    need = tuple(sum(col) for col in zip(*top8, strict=True))
    assert pages_fit((0, 0, 0, 0), need, tuple(pages[g] for g in BYTES))


def test_a_group_nobody_targets_keeps_its_minimum():
    demand = {"qkv_proj": 1.0, "o_proj": 0.0, "gate_up_proj": 0.0, "down_proj": 0.0}
    budget = 32 * sum(BYTES.values())
    pages = split_pages(budget, BYTES, 8, demand)
    assert pages["o_proj"] == pages["gate_up_proj"] == pages["down_proj"] == 8
    assert pages["qkv_proj"] == (budget - 8 * sum(BYTES.values())) // BYTES["qkv_proj"] + 8


def test_a_budget_below_the_minimum_is_refused():
    with pytest.raises(ValueError, match="do not hold 8 pages"):
        split_pages(7 * sum(BYTES.values()), BYTES, 8, {"qkv_proj": 1.0})


def test_the_demand_profile_round_trips_and_bad_input_is_named():
    entries = [DemandEntry(16, ("q_proj", "v_proj"), 3), DemandEntry(4, (), 1)]
    assert parse_demand(format_demand(entries)) == entries
    assert parse_demand("[]") == []
    for raw, reason in [
        ("{", "not JSON"),
        ('{"r": 4}', "JSON list"),
        ('[[4, "q_proj", 1]]', "is not"),
        ("[[4, [1], 1]]", "is not"),
        ('[[0, ["q_proj"], 1]]', "positive"),
        ('[[4, ["q_proj"], -2]]', "positive"),
        ('[[true, ["q_proj"], 1]]', "is not"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_demand(raw)


def test_groups_cross_the_rpc_as_plain_data():
    pool = groups(12)
    assert PoolGroups.from_dict(pool.to_dict()) == pool
    assert pool.totals == (12, 12, 12, 12) and pool.bytes_of((1, 0, 0, 2)) == 40_960 + 2 * 24_576


def test_the_split_never_spends_more_than_the_budget():
    import random

    rng = random.Random(7)
    for _ in range(2_000):
        page_bytes = {f"g{i}": rng.randint(1, 5_000) for i in range(rng.randint(1, 6))}
        min_pages = rng.randint(1, 8)
        budget = rng.randint(min_pages * sum(page_bytes.values()), 10**7)
        demand = {g: rng.choice([0.0, rng.random(), rng.random() * 1e12]) for g in page_bytes}
        pages = split_pages(budget, page_bytes, min_pages, demand)
        assert sum(pages[g] * page_bytes[g] for g in page_bytes) <= budget
        assert all(p >= min_pages for p in pages.values())


@pytest.mark.parametrize("rank", ["r", [4], -4, 0, True, 4.5])
def test_a_malformed_rank_in_the_header_reads_as_unreadable(tmp_path, rank):
    # It raised (in the scheduler, inside the engine core), or charged a negative rank nothing.
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    write_safetensors(tmp_path / "adapter_model.safetensors", {key: {"shape": [rank, 16]}})
    assert lora_weight_ranks(tmp_path) is None
