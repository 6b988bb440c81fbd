"""Pool groups: the paged layers that share one page ledger, and what an adapter costs in each.

Every paged layer has a pool of its own. The layers of one kind — the same module in every
decoder layer (`qkv_proj`, `o_proj`, `gate_up_proj`, `down_proj` in a Llama) — form a group:
they have the same number of pages and one ledger. An adapter costs, in each group,
⌈r_g / P⌉ pages, r_g its largest rank among that group's layers, and nothing in a group it
does not adapt. A rank-32 adapter of q and v alone takes pages in `qkv_proj` only; a rank-4
MLP adapter only in `gate_up_proj` and `down_proj`.

Why groups, not one ledger for all layers: with one ledger every adapter was charged its
widest rank in every layer, so a q/v adapter held (in the books) pages of the MLP pools it
never touches. On the residency benchmark's population (ranks 4-32, each rank its own module
set) that charged about twice the bytes the adapters really take.

How the byte budget is split between groups (`split_pages`): each group first gets room for
one adapter of `max_lora_rank` (any adapter the engine accepts can then run, alone if need be),
and the rest goes by demand: the bytes the registered adapters would take in each group
(`demand_by_group`, from the gateway's registry at start, LORAPLEX_PAGED_DEMAND). Without a
demand profile every group gets the same number of pages.

Pages are tuples, one entry per group in the order of `PoolGroups.names`; a planner given a
plain int works on one group.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Pages = tuple[int, ...]


def as_pages(value: int | Sequence[int]) -> Pages:
    """`value` as a page vector (an int is one group)."""
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def pages_add(a: Pages, b: Pages) -> Pages:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def pages_fit(used: Pages, more: Pages, total: Pages, factor: float = 1.0) -> bool:
    """Whether `used + more` stays within `factor x total` in every group."""
    return all(u + m <= factor * t for u, m, t in zip(used, more, total, strict=True))


def pages_for_rank(rank: int, page_size: int) -> int:
    assert rank >= 0 and page_size > 0, f"rank must be >= 0, page_size > 0: {rank}, {page_size}"
    return -(-rank // page_size)


def module_group(module_path: str) -> str:
    """The group of a LoRA layer: its module name without the decoder-layer path."""
    return module_path.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class PoolGroup:
    name: str  # vLLM's module name, e.g. "qkv_proj"
    pages: int  # pages in every layer of the group
    members: tuple[str, ...]  # PEFT target names whose weights land here (q_proj, k_proj, …)
    bytes_per_page: int  # one page summed over the group's layers


@dataclass(frozen=True)
class PoolGroups:
    """The engine's pool as the scheduler sees it: page size and the groups, in ledger order."""

    page_size: int
    groups: tuple[PoolGroup, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def totals(self) -> Pages:
        return tuple(g.pages for g in self.groups)

    def bytes_of(self, pages: Pages) -> int:
        return sum(p * g.bytes_per_page for p, g in zip(pages, self.groups, strict=True))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (crosses vLLM's RPC)."""
        return {
            "page_size": self.page_size,
            "groups": [
                {
                    "name": g.name,
                    "pages": g.pages,
                    "members": list(g.members),
                    "bytes_per_page": g.bytes_per_page,
                }
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PoolGroups:
        return cls(
            int(data["page_size"]),
            tuple(
                PoolGroup(
                    str(g["name"]), int(g["pages"]), tuple(g["members"]), int(g["bytes_per_page"])
                )
                for g in data["groups"]
            ),
        )

    def groups_targeted(self, target_modules: object) -> list[bool]:
        """Per group: may an adapter with PEFT's `target_modules` have weights there?

        A list names modules (or dotted paths ending in one): a group is targeted when one of
        them is the group or a member of it. Anything else (PEFT's regex string, "all-linear",
        missing) may reach every group, so it counts as all of them: the scheduler's charge
        must never be below what the worker will find.
        """
        if not isinstance(target_modules, list | tuple | set | frozenset) or not target_modules:
            return [True] * len(self.groups)
        names = {module_group(str(t)) for t in target_modules}
        return [g.name in names or not names.isdisjoint(g.members) for g in self.groups]

    def adapter_pages(self, weight_ranks: Mapping[str, int] | None, fallback_rank: int) -> Pages:
        """Pages an adapter may take per group: in each, ⌈r / P⌉ for the widest rank among the
        modules of its weights that land there (`lora_weight_ranks`). That is what the worker
        charges, or more (it counts all-zero slices as nothing), and it follows the tensors
        vLLM loads, not what adapter_config.json declares: a config naming q_proj over weights
        for every projection must not be charged for q/k/v alone. Without the weights' header
        (None) every group is charged `fallback_rank` (the engine's max_lora_rank)."""
        if weight_ranks is None:
            return (pages_for_rank(fallback_rank, self.page_size),) * len(self.groups)
        return tuple(
            pages_for_rank(
                max((weight_ranks.get(m, 0) for m in (g.name, *g.members)), default=0),
                self.page_size,
            )
            for g in self.groups
        )


WEIGHTS_FILE = "adapter_model.safetensors"
# A safetensors header larger than this is not an adapter's (PEFT's are a few kB per layer).
MAX_HEADER_BYTES = 64 << 20


def lora_weight_ranks(adapter_dir: str | Path) -> dict[str, int] | None:
    """Module name → widest rank of its LoRA weights, read from adapter_model.safetensors'
    header alone (`…q_proj.lora_A.weight` of shape [r, in]); None when there is no such file
    or its header cannot be read. No tensor data is read."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > MAX_HEADER_BYTES:
                return None
            header = json.loads(handle.read(size))
    except (OSError, struct.error, ValueError):
        return None
    if not isinstance(header, dict):
        return None
    ranks: dict[str, int] = {}
    for key, entry in header.items():
        parts = key.split(".")
        if "lora_A" not in parts or not isinstance(entry, dict):
            continue
        index = parts.index("lora_A")
        shape = entry.get("shape")
        if index == 0 or not isinstance(shape, list) or not shape:
            return None  # not PEFT's layout: the caller charges the worst case
        rank = shape[0]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            return None  # a malformed header, as unreadable as a missing one
        module = parts[index - 1]
        ranks[module] = max(ranks.get(module, 0), rank)
    return ranks


def declared_rank(adapter_config: Mapping[str, Any]) -> int:
    """The largest rank a PEFT adapter_config.json declares (`r`, any `rank_pattern` entry)."""
    ranks = [
        int(adapter_config.get("r") or 0),
        *(int(v) for v in (adapter_config.get("rank_pattern") or {}).values()),
    ]
    return max(ranks)


@dataclass(frozen=True)
class DemandEntry:
    """`count` registered adapters of rank `rank` adapting `modules` (PEFT target names)."""

    rank: int
    modules: tuple[str, ...]  # empty: may adapt anything (regex or "all-linear" targets)
    count: int = 1


def format_demand(entries: Iterable[DemandEntry]) -> str:
    """LORAPLEX_PAGED_DEMAND's value: a JSON list of [rank, [modules], count]."""
    return json.dumps([[e.rank, list(e.modules), e.count] for e in entries])


def parse_demand(raw: str) -> list[DemandEntry]:
    """Read LORAPLEX_PAGED_DEMAND; ValueError naming what is wrong."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError("expected a JSON list of [rank, [modules], count]")
    entries = []
    for item in data:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in (item[0], item[2]))
            or not isinstance(item[1], list)
            or not all(isinstance(m, str) for m in item[1])
        ):
            raise ValueError(f"entry {item!r} is not [rank, [module names], count]")
        rank, modules, count = item
        if rank <= 0 or count <= 0:
            raise ValueError(f"entry {item!r}: rank and count must be positive")
        entries.append(DemandEntry(rank, tuple(modules), count))
    return entries


def demand_by_group(
    entries: Iterable[DemandEntry],
    members: Mapping[str, Sequence[str]],
    page_size: int,
    bytes_per_page: Mapping[str, int],
) -> dict[str, float]:
    """Bytes the entries' adapters would take in each group (`members`: group -> the PEFT
    target names whose weights land there)."""
    probe = PoolGroups(
        page_size,
        tuple(PoolGroup(g, 0, tuple(m), bytes_per_page[g]) for g, m in members.items()),
    )
    demand = dict.fromkeys(members, 0.0)
    for e in entries:
        pages = pages_for_rank(e.rank, page_size)
        for group, hit in zip(probe.names, probe.groups_targeted(list(e.modules)), strict=True):
            if hit:
                demand[group] += e.count * pages * bytes_per_page[group]
    return demand


def split_pages(
    budget: int,
    bytes_per_page: Mapping[str, int],
    min_pages: int,
    demand: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Pages per group within `budget` bytes; every group gets at least `min_pages`.

    Without demand (or none positive) every group gets the same count, the most that fits.
    With it, after each group's `min_pages` the rest of the budget goes to the groups in
    proportion to their demand, then leftover bytes go page by page to the group furthest
    below its share. Raises ValueError when the minimum alone does not fit.
    """
    assert min_pages >= 1, f"min_pages must be >= 1, got {min_pages}"
    groups = list(bytes_per_page)
    per_round = sum(bytes_per_page.values())
    if per_round * min_pages > budget:
        raise ValueError(
            f"{budget} bytes do not hold {min_pages} pages in each of {len(groups)} layer "
            f"groups ({per_round} bytes per page in all of them)"
        )
    weights = {g: max(0.0, float((demand or {}).get(g, 0.0))) for g in groups}
    total_weight = sum(weights.values())
    if total_weight <= 0 or not all(math.isfinite(w) for w in weights.values()):
        equal = budget // per_round
        return dict.fromkeys(groups, equal)
    pages = dict.fromkeys(groups, min_pages)
    spare = budget - per_round * min_pages
    share = {g: spare * weights[g] / total_weight for g in groups}
    for g in groups:
        pages[g] += int(share[g] // bytes_per_page[g])
    left = budget - sum(pages[g] * bytes_per_page[g] for g in groups)
    while left < 0:  # float rounding gave a page too many: take it from the largest share
        g = max((g for g in groups if pages[g] > min_pages), key=lambda g: pages[g])
        pages[g] -= 1
        left += bytes_per_page[g]
    while True:
        # the group whose pages fall furthest below its share, among those a page still fits
        fitting = [g for g in groups if bytes_per_page[g] <= left and weights[g] > 0]
        if not fitting:
            return pages
        g = max(
            fitting,
            key=lambda g: share[g] - (pages[g] - min_pages) * bytes_per_page[g],
        )
        pages[g] += 1
        left -= bytes_per_page[g]
