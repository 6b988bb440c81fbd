"""The paged layers' Triton path (kernels.paged_lora_triton) against their CPU torch path.

Both read the same pool; the torch path is itself checked against the SGMV references
(test_paged_lora_cpu). Without CUDA the kernels run under TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import pytest
import torch

from kernels.paged_lora_triton import PagedSgmvRunner
from tests.kernels.test_paged_lora_cpu import RANKS, SHAPES, token_slots
from tests.kernels.test_paged_lora_cpu import run as torch_path
from tests.kernels.test_sgmv_ops import TOL, make_adapters, make_pool

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # interpreter dtype notes


def on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("page_size", [None, 4], ids=["contiguous", "pages_of_4"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)],
    ids=str,
)
def test_matches_the_torch_path(device, dtype, shape, page_size) -> None:
    hidden, widths = SHAPES[shape]
    adapters = make_adapters(RANKS, hidden, widths, seed=11)
    kw = {"hidden": hidden, "widths": widths, "page_size": page_size, "dtype": dtype}
    cpu_pool = make_pool(adapters, **kw, device=torch.device("cpu"), extra_slots=1)
    pool = make_pool(adapters, **kw, device=device, extra_slots=1)
    slots = torch.tensor(token_slots(len(adapters)))
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(len(slots), hidden, generator=gen).to(dtype)
    y0 = torch.randn(len(slots), sum(widths), generator=gen).to(dtype)
    want = torch_path(cpu_pool, x, y0, slots)

    runner = PagedSgmvRunner(max_tokens=128, num_slots=pool.num_slots, device=device)
    xd, yd, sd = on(device, x, y0.clone(), slots)
    got = runner.apply(yd, xd, pool, sd)
    assert got is yd  # in place
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])
    untouched = (slots < 0) | (slots == len(adapters))  # no adapter, or the empty slot
    assert torch.equal(got.cpu()[untouched], y0[untouched])


def test_buffers_are_reused_across_batch_sizes_and_layers(device) -> None:
    """One runner serves every layer of a wrapper: pools of other widths, batches of other
    sizes, a decode step after a prefill, and a step whose rows all lack an adapter."""
    runner = PagedSgmvRunner(max_tokens=96, num_slots=len(RANKS), device=device)
    for step, (shape, slots) in enumerate(
        [
            ("qkv_gqa", token_slots(len(RANKS) - 1)[:70]),
            ("o_proj", [3, 0, -1, 5]),  # decode: one row per request
            ("gate_up", [-1] * 9),
            ("qkv_gqa", [5]),
        ]
    ):
        hidden, widths = SHAPES[shape]
        adapters = make_adapters(RANKS, hidden, widths, seed=20 + step)
        kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": torch.float32}
        cpu_pool = make_pool(adapters, **kw, device=torch.device("cpu"))
        pool = make_pool(adapters, **kw, device=device)
        token_slot = torch.tensor(slots)
        x = torch.randn(len(slots), hidden)
        y0 = torch.randn(len(slots), sum(widths))
        want = torch_path(cpu_pool, x, y0, token_slot)
        xd, yd, sd = on(device, x, y0.clone(), token_slot)
        got = runner.apply(yd, xd, pool, sd).cpu()
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        if all(s < 0 for s in slots):
            assert torch.equal(got, y0)


def test_refuses_mismatched_inputs(device) -> None:
    hidden, widths = SHAPES["o_proj"]
    adapters = make_adapters([4, 8], hidden, widths, seed=3)
    kw = {"hidden": hidden, "widths": widths, "page_size": 4, "dtype": torch.float32}
    pool = make_pool(adapters, **kw, device=device)
    runner = PagedSgmvRunner(max_tokens=8, num_slots=pool.num_slots, device=device)
    x = torch.randn(3, hidden, device=device)
    y = torch.zeros(3, sum(widths), device=device)
    with pytest.raises(ValueError, match="token_slot must be"):
        runner.apply(y, x, pool, torch.zeros(2, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="must be the pool's"):
        runner.apply(y.half(), x.half(), pool, torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="builder holds"):
        big = torch.zeros(9, dtype=torch.long, device=device)
        runner.apply(
            torch.zeros(9, sum(widths), device=device),
            torch.randn(9, hidden, device=device),
            pool,
            big,
        )
    other = PagedSgmvRunner(max_tokens=8, num_slots=pool.num_slots + 1, device=device)
    with pytest.raises(ValueError, match="slots"):
        other.apply(y, x, pool, torch.zeros(3, dtype=torch.long, device=device))
