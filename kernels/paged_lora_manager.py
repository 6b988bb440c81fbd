"""Driver of the paged LoRA pool inside vLLM 0.32's worker: which adapters hold pages, when.

What vLLM does (vllm/lora/model_manager.py, worker_manager.py, v1/worker/lora_model_runner_mixin):
- The scheduler admits at most `max_loras` distinct adapters into one batch.
- Each step the worker calls `_apply_adapters(batch adapters)`, which `activate_adapter`s each
  one: if all `max_loras` slots are taken, the least recently used active adapter is
  deactivated (its slot freed, its weights left in place), then `set_lora` copies the adapter
  into the first free slot of every LoRA layer. `set_adapter_mapping` then maps tokens to slots.
- Out of band, `add_lora` loads and activates an adapter the same way. Here that is a
  prefetch: it pages the adapter in only into free pages and a free slot, evicting nothing
  (the resident adapters may be the next step's batch); otherwise the adapter waits in host
  memory (vLLM's CPU cache) and pages in with its first step.

What changes here (`kernels.paged_worker.install` rebinds two names, nothing else is edited):
- Every paged layer has a pool of pages (kernels.paged_lora_layers). Layers of one kind form a
  group with one page ledger (kernels.page_groups): an adapter is charged only in the groups it
  adapts. The byte budget is split between groups by the registered adapters' demand
  (LORAPLEX_PAGED_DEMAND, from the gateway's registry), or equally without it. Slots
  (`max_loras`) cost a page-table row each, so `max_loras` can be far larger than what
  max-rank slots would allow.
- `activate_adapter` first asks `Residency` how to make room for the adapter's pages: it pages
  out least-recently-used adapters that are neither in the running batch nor pinned. When only
  the running batch could make room it raises `PoolExhausted`, failing the step loudly rather
  than serving a request with another adapter's weights or none.
- On CUDA the page-in copies run on a side stream (kernels.page_copier), overlapping the GPU
  work of the step before; `_apply_adapters` makes the compute stream wait for them.
- Deactivation frees the adapter's pages at once (vLLM left the weights in the slot), so the
  pool holds exactly the active adapters; `remove_all_adapters` frees every page.
- vLLM's embedding and lm_head LoRA wrappers are unwrapped back to the base layers
  (kernels.paged_vocab): loraplex never serves those deltas, the registry refuses adapters
  that carry them, and one that does anyway is refused here, loudly, at activation.

Invariants relied on: `lora_index_to_id[i]` is the adapter whose weights slot i holds; every
`set_lora` / `reset_lora` goes through `activate_adapter`; `_deactivate_adapter` is the single
place slots are released (LRU callbacks, `deactivate_adapter`, `remove_adapter`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Collection
from typing import Any

from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager

from kernels.page_copier import PageCopier
from kernels.page_groups import (
    Pages,
    PoolGroup,
    PoolGroups,
    demand_by_group,
    module_group,
    pages_fit,
    pages_for_rank,
    split_pages,
)
from kernels.paged_config import PagedLoraConfig
from kernels.paged_lora_layers import PagedLinearMixin, effective_rank
from kernels.paged_residency import PoolExhausted, Residency
from kernels.paged_stats import PagedPoolStats
from kernels.paged_vocab import refuse_vocab_weights, unwrap_vocab_layers

logger = logging.getLogger(__name__)


_config: PagedLoraConfig | None = None


class PagedLRUCacheLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU adapter manager with adapter weights in byte-bounded paged pools."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _config is None:
            raise RuntimeError("paged LoRA manager created before kernels.paged_worker.install")
        lora_config = kwargs.get("lora_config")
        if lora_config is not None and lora_config.fully_sharded_loras:
            raise NotImplementedError("loraplex paged LoRA does not support fully sharded LoRA")
        self.paged_config = _config
        self.stats = PagedPoolStats(page_size=_config.page_size)
        self.residency = Residency(0, _config.page_size)
        # Adapters of the batch being applied (set by the worker manager): never paged out.
        self.protected: frozenset[int] = frozenset()
        # True while the worker manager applies a step's adapters; an activation outside a
        # step is vLLM's add_lora, i.e. the gateway loading an adapter ahead of its requests.
        self.in_step = False
        # lora id -> (the LoRAModel it was computed for, pages it needs); weak, so an adapter
        # vLLM's host cache drops is freed
        self._pages_cache: dict[int, tuple[weakref.ref[LoRAModel], Pages]] = {}
        self.pool_groups = PoolGroups(_config.page_size, ())
        self._group_of: dict[str, int] = {}  # paged module name -> index of its group
        self.unwrapped_vocab_layers: tuple[str, ...] = ()
        super().__init__(*args, **kwargs)
        # page-in copies of every layer: on CUDA one side stream, waited for once per step
        self.copier = PageCopier(self.device)
        self._unwrap_vocab_layers()
        self._allocate_pools()

    def _unwrap_vocab_layers(self) -> None:
        """Put the base embedding and logits layers back in place of vLLM's LoRA wrappers."""
        self.unwrapped_vocab_layers = unwrap_vocab_layers(self.model, self.modules)
        self.stats.vocab_layers_unwrapped = len(self.unwrapped_vocab_layers)

    @property
    def paged_modules(self) -> dict[str, PagedLinearMixin]:
        paged: dict[str, PagedLinearMixin] = {}
        for name, module in self.modules.items():
            if isinstance(module, PagedLinearMixin):
                paged[name] = module
        return paged

    def _allocate_pools(self) -> None:
        page_size, budget = self.paged_config.page_size, self.paged_config.pool_bytes
        paged = self.paged_modules
        if not paged:
            raise RuntimeError(
                f"LORAPLEX_PAGED_LORA is on but no LoRA layer of {type(self.model).__name__} "
                "is one loraplex pages"
            )
        layers: dict[str, list[PagedLinearMixin]] = {}
        for name, module in paged.items():
            layers.setdefault(module_group(name), []).append(module)
        group_bytes = {
            g: sum(m.paged_geometry.page_bytes(page_size) for m in ms) for g, ms in layers.items()
        }
        per_page = sum(group_bytes.values())
        if budget < per_page:
            raise ValueError(
                f"LORAPLEX_PAGED_POOL_BYTES={budget} is less than one page ({per_page} bytes: "
                f"{page_size} rank rows in {len(paged)} layers)"
            )
        members = {g: tuple(self.packed_modules_mapping.get(g) or (g,)) for g in layers}
        max_rank = self.lora_config.max_lora_rank
        widest = pages_for_rank(max_rank, page_size)
        pages, by_demand = self._group_pages(group_bytes, members, widest)
        for g, modules in layers.items():
            for module in modules:
                module.allocate_pool(
                    pages[g], page_size, self.stats, self.paged_config.kernel, self.copier
                )
        self.pool_groups = PoolGroups(
            page_size,
            tuple(PoolGroup(g, pages[g], members[g], group_bytes[g]) for g in layers),
        )
        self._group_of = {name: self.pool_groups.names.index(module_group(name)) for name in paged}
        self.residency = Residency(self.pool_groups.totals, page_size, self.pool_groups.names)
        self.stats.pages_total = sum(pages.values())
        self.stats.bytes_per_page = per_page
        self.stats.bytes_total = self.pool_groups.bytes_of(self.pool_groups.totals)
        self.stats.slots_total = self.lora_slots
        self._sync_gauges()  # per-group pages from the start, before any page-in
        if min(pages.values()) < widest:
            logger.warning(
                "paged LoRA pool holds %s pages of %d rank rows, less than max_lora_rank %d "
                "in some layers: larger adapters will be refused",
                pages,
                page_size,
                max_rank,
            )
        kernel = next(iter(paged.values())).paged_kernel
        if kernel == "triton" and str(self.device).startswith("cuda"):
            logger.warning(
                "paged LoRA on CUDA: the SGMV kernels are tested on GPUs on their own and "
                "inside vLLM only on CPU under the Triton interpreter; check adapted outputs "
                "against a reference before serving tenants with it"
            )
        logger.info(
            "paged LoRA: %d layers, pages of %d rank rows per group %s (%s; %d bytes, %d "
            "slots, %s kernel); vLLM's stacked buffers would take %d bytes",
            len(paged),
            page_size,
            pages,
            "split by the registered adapters' demand" if by_demand else "equal split",
            self.stats.bytes_total,
            self.lora_slots,
            kernel,
            self.lora_slots * max_rank * per_page // page_size,
        )

    def _group_pages(
        self, group_bytes: dict[str, int], members: dict[str, tuple[str, ...]], widest: int
    ) -> tuple[dict[str, int], bool]:
        """Pages per group within the budget, and whether the registered adapters' demand
        decided them (kernels.page_groups.split_pages) rather than an equal split."""
        budget = self.paged_config.pool_bytes
        equal = budget // sum(group_bytes.values())
        if not self.paged_config.demand or equal < widest:
            # no demand, or too small a pool to hold max_lora_rank everywhere (the scheduler
            # refuses to start on it; the worker's own refusal tests run it without admission)
            return dict.fromkeys(group_bytes, equal), False
        page_size = self.paged_config.page_size
        demand = demand_by_group(self.paged_config.demand, members, page_size, group_bytes)
        return split_pages(budget, group_bytes, widest, demand), True

    def pages_needed(self, lora_id: int) -> Pages:
        """Pages the adapter takes per group: in the group's layer that needs most.

        Computed once per registered adapter (it reads every layer's weights) and refused
        there if the adapter carries embedding or lm_head weights."""
        lora = self._registered_adapters[lora_id]
        cached = self._pages_cache.get(lora_id)
        if cached is not None and cached[0]() is lora:
            return cached[1]
        refuse_vocab_weights(self, lora_id, lora, self.unwrapped_vocab_layers)
        ranks = [0] * len(self.pool_groups.groups)
        max_rank = self.lora_config.max_lora_rank
        for name in self.paged_modules:
            weights = self._get_lora_layer_weights(lora, name)
            if weights is not None:
                group = self._group_of[name]
                rank = effective_rank(weights.lora_a, weights.lora_b)
                if rank > max_rank:
                    # vLLM checks only the config's r: refused here, before any layer changes
                    raise ValueError(
                        f"adapter {lora_id} has rank {rank} in {name}, above max_lora_rank "
                        f"{max_rank}"
                    )
                ranks[group] = max(ranks[group], rank)
        pages = tuple(self.residency.pages_for_rank(rank) for rank in ranks)
        if len(self._pages_cache) >= 4 * max(self.capacity, 1):
            self._pages_cache = {k: v for k, v in self._pages_cache.items() if v[0]() is not None}
        self._pages_cache[lora_id] = (weakref.ref(lora), pages)
        return pages

    def activate_adapter(self, lora_id: int) -> bool:
        if lora_id in self._active_adapters:
            self.residency.touch(lora_id)
            return super().activate_adapter(lora_id)
        pages = self.pages_needed(lora_id)
        if not self.in_step and not self._room_to_prefetch(pages):
            # A prefetch never evicts: what is resident may be the next step's batch. The
            # adapter stays loaded in host memory and pages in when its step comes.
            self.stats.prefetches_skipped_total += 1
            return False
        protected = self.protected | set(self._active_adapters.pinned_items)
        try:
            victims = self.residency.plan_admit(lora_id, pages, protected)
        except PoolExhausted:
            self.stats.refusals_total += 1
            raise
        for victim in victims:
            logger.debug("paged LoRA: paging out adapter %d for %d", victim, lora_id)
            self.stats.evictions_for_space_total += 1
            self.deactivate_adapter(victim)
        if len(self._active_adapters) >= self.lora_slots:
            # Every slot taken: free the least recently used one outside the batch ourselves,
            # or vLLM's LRU (blind to the batch) pages out an adapter this step still needs
            # and it is copied in again a moment later.
            self._free_a_slot(protected)
        try:
            activated = super().activate_adapter(lora_id)
        except BaseException:
            # vLLM marked it active in its slot before set_lora raised in some layer: undone,
            # or it stays half loaded (served with some layers' weights) outside the ledger.
            if lora_id in self._active_adapters:
                self.deactivate_adapter(lora_id)
            raise
        self._warn_if_nonfinite(lora_id)
        self.residency.admit(lora_id, pages)
        if not self.in_step:
            self.stats.prefetches_total += 1
        self.stats.page_ins_total += 1
        self.stats.pages_in_total += sum(pages)
        self._sync_gauges()
        return activated

    def _free_a_slot(self, protected: Collection[int]) -> None:
        """Deactivate the least recently used active adapter outside `protected` (the running
        batch, pinned ones); none such: vLLM's own LRU decides, as before."""
        for candidate in self._active_adapters.order:
            if candidate not in protected:
                self.stats.evictions_for_space_total += 1
                self.deactivate_adapter(candidate)
                return

    def pin_adapter(self, lora_id: int) -> bool:
        """vLLM pins by activating outside a step, which here is a prefetch that evicts
        nothing and may be skipped; then its pin failed ("Cannot pin key"). Pinning may page
        out what is not in use, as a step does."""
        in_step, self.in_step = self.in_step, True
        try:
            return super().pin_adapter(lora_id)
        finally:
            self.in_step = in_step

    def _warn_if_nonfinite(self, lora_id: int) -> None:
        """Say so when an adapter's weights hold inf or NaN in some layer: its own requests
        get what those weights give; other tenants' rows are kept apart from it
        (kernels.paged_pool, kernels.paged_lora_cpu)."""
        if lora_id not in self.lora_index_to_id:
            return
        index = self.lora_index_to_id.index(lora_id)
        layers = [
            name
            for name, module in self.paged_modules.items()
            if module.paged_pool is not None and index in module.paged_pool.nonfinite_slots
        ]
        if layers:
            logger.warning(
                "paged LoRA: adapter %d has inf or NaN weights in %d layers (%s): its requests "
                "will not get finite outputs",
                lora_id,
                len(layers),
                layers[0],
            )

    def _room_to_prefetch(self, pages: Pages) -> bool:
        """Free pages and a free slot: paging in now displaces nothing."""
        residency = self.residency
        return (
            pages_fit(residency.used, pages, residency.totals)
            and len(self._active_adapters) < self.lora_slots
        )

    def _deactivate_adapter(self, lora_id: int) -> None:
        index = self.lora_index_to_id.index(lora_id) if lora_id in self.lora_index_to_id else None
        super()._deactivate_adapter(lora_id)
        if index is not None:
            for module in self.paged_modules.values():
                module.reset_lora(index)
        if lora_id in self.residency:
            self.stats.page_outs_total += 1
            self.stats.pages_out_total += self.residency.release(lora_id)
            self._sync_gauges()

    def remove_adapter(self, adapter_id: int) -> bool:
        self._pages_cache.pop(adapter_id, None)
        return super().remove_adapter(adapter_id)

    def remove_all_adapters(self) -> None:
        self._pages_cache.clear()
        super().remove_all_adapters()
        for module in self.paged_modules.values():
            for index in range(self.lora_slots):
                module.reset_lora(index)
        for lora_id in self.residency.resident():
            self.stats.page_outs_total += 1
            self.stats.pages_out_total += self.residency.release(lora_id)
        self._sync_gauges()

    def _sync_gauges(self) -> None:
        used = self.residency.used
        self.stats.group_pages = {
            group.name: {"total": group.pages, "used": held}
            for group, held in zip(self.pool_groups.groups, used, strict=True)
        }
        self.stats.pages_used = sum(used)
        self.stats.bytes_used = self.pool_groups.bytes_of(used)
        self.stats.adapters_resident = len(self.residency.resident())
