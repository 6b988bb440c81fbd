"""Pool groups: what an adapter is charged per layer group, how the byte budget is split
between groups, and the demand profile's wire format."""

from __future__ import annotations

import pytest

from kernels.page_groups import (
    DemandEntry,
    PoolGroup,
    PoolGroups,
    demand_by_group,
    format_demand,
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
    ("config", "pages"),
    [
        ({"r": 32, "target_modules": ["q_proj", "v_proj"]}, (8, 0, 0, 0)),
        ({"r": 4, "target_modules": ["gate_proj", "up_proj", "down_proj"]}, (0, 0, 1, 1)),
        ({"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, (2, 2, 0, 0)),
        # dotted paths end in the module name; rank_pattern's widest rank counts everywhere
        (
            {"r": 4, "rank_pattern": {"o_proj": 12}, "target_modules": ["model.o_proj"]},
            (0, 3, 0, 0),
        ),
        # already-fused names (some models register qkv_proj itself)
        ({"r": 5, "target_modules": ["qkv_proj"]}, (2, 0, 0, 0)),
        # a regex string or "all-linear" may reach any layer: charged everywhere
        ({"r": 8, "target_modules": ".*(q|v)_proj"}, (2, 2, 2, 2)),
        ({"r": 8, "target_modules": "all-linear"}, (2, 2, 2, 2)),
        ({"r": 8}, (2, 2, 2, 2)),
    ],
)
def test_an_adapter_is_charged_only_in_the_groups_it_targets(config, pages):
    assert groups().adapter_pages(config) == pages


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
