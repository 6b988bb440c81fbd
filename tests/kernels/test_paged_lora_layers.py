"""Which kernel a paged vLLM layer runs (kernels.paged_lora_layers.resolve_kernel)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed")

from kernels.paged_lora_layers import resolve_kernel

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_kernel("auto", CUDA) == "triton"
    assert resolve_kernel("triton", CUDA) == "triton"
    assert resolve_kernel("auto", CPU) == "torch"
    assert resolve_kernel("torch", CPU) == "torch"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        resolve_kernel("triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel("triton", CPU) == "triton"
    assert resolve_kernel("auto", CPU) == "torch"  # the interpreter is never picked by itself


def test_refused_combinations_say_what_to_set():
    with pytest.raises(NotImplementedError, match="LORAPLEX_PAGED_KERNEL=auto"):
        resolve_kernel("torch", CUDA)
    with pytest.raises(NotImplementedError, match="not xpu"):
        resolve_kernel("auto", torch.device("xpu"))


def test_set_lora_skips_an_all_zero_slice_of_higher_rank():
    """peft rank_pattern: q_proj r=8 trained, k_proj r=16 with B still all zero. The zero
    slice needs no rank rows, so the adapter takes rank 8 and the slice holds zeros (it used
    to be copied into the rank-8 rows and raise inside vLLM's step)."""
    from kernels.paged_lora_cpu import paged_lora_pool_cpu
    from kernels.paged_lora_layers import LayerGeometry, PagedLinearMixin
    from kernels.paged_pool import PagedLoraPool

    hidden, widths = 16, (8, 8)

    class Layer(PagedLinearMixin):
        n_slices = 2

    layer = Layer()
    layer.paged_geometry = LayerGeometry(
        num_slots=2,
        max_rank=16,
        hidden_in=hidden,
        slice_widths=widths,
        dtype=torch.float32,
        device=CPU,
    )
    layer.paged_pool = PagedLoraPool(
        num_pages=8,
        page_size=4,
        num_slots=2,
        max_rank=16,
        hidden_in=hidden,
        slice_widths=widths,
        dtype=torch.float32,
        device=CPU,
    )
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(8, hidden, generator=gen), torch.randn(16, hidden, generator=gen)]
    b = [torch.randn(8, 8, generator=gen), torch.zeros(8, 16)]
    layer.set_lora(1, a, b)

    pool = layer.paged_pool
    assert int(pool.slot_rank[1]) == 8 and len(pool.slot_pages(1)) == 2
    x = torch.randn(3, hidden, generator=gen)
    y = paged_lora_pool_cpu(torch.zeros(3, 16), x, pool, torch.tensor([1, -1, 1]))
    want = torch.zeros(3, 16)
    want[[0, 2], :8] = x[[0, 2]] @ a[0].t() @ b[0].t()
    torch.testing.assert_close(y, want)
