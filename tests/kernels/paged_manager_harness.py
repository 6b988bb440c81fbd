"""The real PagedLRUCacheLoRAModelManager over fake paged layers: no vLLM engine, no model.
Four layer groups x `layers` layers, adapters made of random LoRA weights per group."""

from __future__ import annotations

import types
from unittest import mock

import torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.lora_weights import LoRALayerWeights
from vllm.lora.model_manager import AdapterLRUCache, LoRAModelManager

import kernels.paged_lora_manager as plm
from kernels.paged_config import PagedLoraConfig
from kernels.paged_lora_cpu import paged_lora_pool_cpu
from kernels.paged_lora_layers import PagedLinearMixin
from kernels.paged_worker import PagedLRUCacheWorkerLoRAManager

H = 16
GROUPS = {"qkv_proj": (16, 8, 8), "o_proj": (16,), "gate_up_proj": (32, 32), "down_proj": (16,)}
HIN = {"qkv_proj": H, "o_proj": H, "gate_up_proj": H, "down_proj": 32}


class FakeLayer(PagedLinearMixin):
    tp_size = 1

    def __init__(self, hin, widths):
        self.n_slices = len(widths)
        self.output_slices = tuple(widths)
        self.output_size = sum(widths)
        self.input_size = hin
        self.device = torch.device("cpu")


def make_manager(
    *,
    pool_bytes,
    page_size=4,
    max_loras=4,
    max_cpu_loras=8,
    max_rank=16,
    layers=2,
    groups=GROUPS,
    demand=(),
):
    plm._config = PagedLoraConfig(pool_bytes=pool_bytes, page_size=page_size, demand=demand)
    lora_config = types.SimpleNamespace(
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=max_rank,
        lora_dtype=torch.float32,
        fully_sharded_loras=False,
    )
    modules = {}
    for i in range(layers):
        for g, widths in groups.items():
            m = FakeLayer(HIN[g], widths)
            m.create_lora_weights(max_loras, lora_config)
            modules[f"model.layers.{i}.{g}"] = m

    def fake_init(self, *a, **kw):
        self.lora_config = kw["lora_config"]
        self.device = torch.device("cpu")
        self.model = torch.nn.Module()
        self._registered_adapters = AdapterLRUCache(self.capacity, self.deactivate_adapter)
        self._active_adapters = AdapterLRUCache(self.lora_slots, self._deactivate_adapter)
        self.lora_index_to_id = [None] * self.lora_slots
        self.modules = modules
        self.packed_modules_mapping = {
            "qkv_proj": ["q_proj", "k_proj", "v_proj"],
            "gate_up_proj": ["gate_proj", "up_proj"],
        }
        self.is_pooling_model = False
        self._last_mapping = None
        self._last_slot_layout = None
        self._classification_head = None
        self._enable_mixed_moe_lora_format = False
        self.packed_modules = {}

    with mock.patch.object(LoRAModelManager, "__init__", fake_init):
        mgr = plm.PagedLRUCacheLoRAModelManager(lora_config=lora_config)
    return mgr


def make_lora(lora_id, ranks, seed=None, groups=GROUPS, layers=2, zero=()):
    """ranks: group -> rank (absent = not adapted)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else lora_id)
    loras = {}
    for i in range(layers):
        for g, r in ranks.items():
            widths = groups[g]
            name = f"model.layers.{i}.{g}"
            a = [torch.randn(r, HIN[g], generator=gen) for _ in widths]
            b = [torch.randn(w, r, generator=gen) for w in widths]
            if g in zero:
                b = [torch.zeros_like(x) for x in b]
            if len(widths) == 1:
                a, b = a[0], b[0]
            loras[name] = LoRALayerWeights(name, r, r, a, b)
    return LoRAModel(lora_id, max(ranks.values(), default=1), loras)


def register(mgr, lora):
    mgr.add_adapter(lora)


def check_served(mgr, lora):
    """Every paged layer: the slot's delta equals x A^T B^T of the adapter's own weights."""
    idx = mgr.lora_index_to_id.index(lora.id)
    gen = torch.Generator().manual_seed(123)
    bad = []
    for name, m in mgr.paged_modules.items():
        pool = m.paged_pool
        x = torch.randn(2, pool.hidden_in, generator=gen)
        y = paged_lora_pool_cpu(torch.zeros(2, pool.hidden_out), x, pool, torch.tensor([idx, idx]))
        w = lora.get_lora(name)
        if w is None:
            want = torch.zeros_like(y)
        else:
            a = w.lora_a if isinstance(w.lora_a, list) else [w.lora_a]
            b = w.lora_b if isinstance(w.lora_b, list) else [w.lora_b]
            want = torch.cat([x @ ai.t() @ bi.t() for ai, bi in zip(a, b, strict=True)], dim=1)
        if not torch.allclose(y, want, atol=1e-4):
            bad.append(name)
    return bad


def pool_pages_used(mgr):
    """Per group: max pages actually held in any layer of it (pool, not ledger)."""
    out = {}
    for name, m in mgr.paged_modules.items():
        g = name.rsplit(".", 1)[-1]
        out[g] = max(out.get(g, 0), m.paged_pool.num_pages - m.paged_pool.num_free_pages)
    return out


def ledger(mgr):
    return dict(zip(mgr.pool_groups.names, mgr.residency.used, strict=True))


def worker(mgr, loras_by_id):
    w = object.__new__(PagedLRUCacheWorkerLoRAManager)
    w._adapter_manager = mgr
    w.lora_config = mgr.lora_config
    w._load_adapter = lambda req: loras_by_id[req.lora_int_id]
    return w


def req(i):
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"a{i}", i, f"/nonexistent/{i}")
