"""The CPU op fix: rows without an adapter (-1) get exactly zero delta, even with all slots full."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from vllm.lora.ops.torch_ops import lora_ops as upstream

from kernels import cpu_lora_ops


def pristine_upstream_ops():
    """A fresh copy of vLLM's CPU ops module: loraplex's plugin, which vLLM loads in any
    process that imports parts of it (other tests' too), rebinds the shared module's names."""
    spec = importlib.util.find_spec(upstream.__name__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SLOTS, TOKENS, HIDDEN, RANK, OUT = 4, 6, 32, 8, 48


@pytest.fixture(params=["dense", "gathered"])
def batch(request, monkeypatch):
    """Both ways the ops compute: every slot's products (few slots) or a gather per token."""
    if request.param == "gathered":
        monkeypatch.setattr(cpu_lora_ops, "MAX_DENSE_SLOTS", 0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, generator=gen)
    lora_a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=gen)  # every slot filled
    lora_b = torch.randn(SLOTS, 1, OUT, RANK, generator=gen)
    indices = torch.tensor([0, -1, 3, -1, 1, 2])
    return x, lora_a, lora_b, indices


def reference(x, lora_a, lora_b, indices, scale):
    out = torch.zeros(TOKENS, OUT)
    for t, slot in enumerate(indices.tolist()):
        if slot >= 0:
            out[t] = scale * (x[t] @ lora_a[slot, 0].T) @ lora_b[slot, 0].T
    return out


def run(ops, x, lora_a, lora_b, indices, scale):
    shrunk = torch.zeros(TOKENS, RANK)
    ops.bgmv_shrink(x, lora_a, shrunk, indices, scale)
    out = torch.zeros(TOKENS, OUT)
    ops.bgmv_expand(shrunk, lora_b, out, indices, add_inputs=True)
    sliced = torch.zeros(TOKENS, OUT + 8)
    ops.bgmv_expand_slice(shrunk, lora_b, sliced, indices, 4, OUT, add_inputs=True)
    return out, sliced


def test_fixed_ops_match_per_token_reference(batch):
    x, lora_a, lora_b, indices = batch
    out, sliced = run(cpu_lora_ops, x, lora_a, lora_b, indices, 0.5)
    expected = reference(x, lora_a, lora_b, indices, 0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sliced[:, 4 : 4 + OUT], expected)
    assert torch.count_nonzero(out[indices < 0]) == 0
    assert (
        torch.count_nonzero(sliced[:, :4]) == 0 and torch.count_nonzero(sliced[:, 4 + OUT :]) == 0
    )


def test_upstream_ops_leak_the_last_slot_into_base_rows(batch):
    """Documents the vLLM 0.32 bug the plugin exists for; if it ever stops failing, drop it."""
    x, lora_a, lora_b, indices = batch
    out, _ = run(pristine_upstream_ops(), x, lora_a, lora_b, indices, 0.5)  # (either param)
    leaked = reference(x, lora_a, lora_b, torch.full_like(indices, SLOTS - 1), 0.5)
    torch.testing.assert_close(out[indices < 0], leaked[indices < 0])


def test_install_rebinds_every_namespace_the_cpu_wrapper_uses():
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    cpu_lora_ops.install()
    assert punica_cpu.bgmv_shrink is cpu_lora_ops.bgmv_shrink
    assert upstream.bgmv_expand is cpu_lora_ops.bgmv_expand
    assert upstream.bgmv_expand_slice is cpu_lora_ops.bgmv_expand_slice


def test_rows_without_adapter_stay_zero_when_slot_0_is_not_finite(batch):
    """-1 rows gather slot 0 and must discard it: filled, not multiplied by 0, since an
    inf in slot 0 (an adapter that overflowed fp16) times 0 is NaN on base-model rows."""
    x, lora_a, lora_b, indices = batch
    lora_a[0, 0, 0, 0] = float("inf")
    lora_b[0, 0, 0, 0] = float("inf")
    indices = torch.tensor([1, -1, 3, -1, 2, -1])  # slot 0 used by no row
    out, sliced = run(cpu_lora_ops, x, lora_a, lora_b, indices, 0.5)
    expected = reference(x, lora_a, lora_b, indices, 0.5)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(sliced[:, 4 : 4 + OUT], expected)
    assert torch.count_nonzero(out[indices < 0]) == 0  # NaN counts as nonzero
    assert torch.count_nonzero(sliced[indices < 0]) == 0
