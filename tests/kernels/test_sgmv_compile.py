"""Both Triton modes outside the usual test path.

Compiled: the interpreter runs the kernels' Python on numpy and accepts things the compiler
rejects (types, early returns, dot shapes); compiling with Triton's bundled ptxas for an H100
catches those on CPU-only CI, with the configs the launchers would pick there (132 SMs).

Interpreted late: in a full test run torch._dynamo imports Triton long before
tests/kernels/conftest.py sets TRITON_INTERPRET, so Triton's own @jit helpers stay compiled;
the kernels must not call them (tl.zeros, tl.cdiv) or the interpreter refuses to run them.

Triton fixes its mode when it is imported, so both run in a fresh process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

CASES = [(dtype, t) for dtype in ("float16", "bfloat16", "float32") for t in (1, 64, 4096)]
TL_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _compile(
    kernel: object, pointers: dict[str, str], constexprs: dict[str, object], config: object
) -> object:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32")
        for name in kernel.arg_names
    }
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return compile(
        ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=options
    )


def compile_case(dtype_name: str, num_tokens: int) -> dict[str, int]:
    """Compile shrink and expand as the launchers would configure them for this shape."""
    from kernels import sgmv_expand, sgmv_shrink
    from kernels.sgmv_metadata import SgmvMetadataBuilder

    dtype, t = getattr(torch, dtype_name), TL_DTYPE[dtype_name]
    hidden, widths, page_size, max_rank = 4096, (4096, 1024, 1024), 16, 128
    meta = SgmvMetadataBuilder(max_tokens=num_tokens, num_slots=16, device="cpu").build(
        torch.zeros(num_tokens, dtype=torch.int32),
        torch.full((16,), 8, dtype=torch.int32),
        torch.ones(16),
    )
    cfg = sgmv_shrink.default_config(
        meta, hidden_in=hidden, max_rank=max_rank, num_slices=3, dtype=dtype, num_sms=132
    )
    common = {
        "token_ids_ptr": "*i32",
        "seg_indptr_ptr": "*i32",
        "seg_adapter_ptr": "*i32",
        "seg_rank_ptr": "*i32",
        "page_table_ptr": "*i32",
    }
    shrink = _compile(
        sgmv_shrink._sgmv_shrink_kernel,
        {
            "x_ptr": f"*{t}",
            "a_ptr": f"*{t}",
            "out_ptr": "*fp32",
            "seg_scale_ptr": "*fp32",
            **common,
        },
        {
            "PAGE_SIZE": page_size,
            "MAX_RANK": max_rank,
            "EVEN_K": True,
            "IEEE_DOT": dtype == torch.float32,
            "BLOCK_M": cfg.block_m,
            "BLOCK_N": cfg.block_n,
            "BLOCK_K": cfg.block_k,
            "SPLIT_K": cfg.split_k,
        },
        cfg,
    )
    ecfg = sgmv_expand.default_config(meta, max_width=max(widths), on_gpu=True)
    blocks = {k.upper(): v for k, v in dataclasses.asdict(ecfg).items() if k.startswith("block")}
    expand = _compile(
        sgmv_expand._sgmv_expand_kernel,
        {
            "h_ptr": "*fp32",
            "b_ptr": f"*{t}",
            "y_ptr": f"*{t}",
            "slice_bounds_ptr": "*i32",
            **common,
        },
        {
            "PAGE_SIZE": page_size,
            "MAX_RANK": max_rank,
            "IEEE_DOT": dtype == torch.float32,
            "BF16_DOT": dtype == torch.bfloat16,
            **blocks,
        },
        ecfg,
    )
    return {
        "split_k": cfg.split_k,
        "shrink_cubin": len(shrink.asm["cubin"]),
        "expand_cubin": len(expand.asm["cubin"]),
        "shrink_shared": shrink.metadata.shared,
        "expand_shared": expand.metadata.shared,
    }


def run_fresh(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


LATE_INTERPRETER = """
import os
import torch, torch._dynamo, triton  # Triton imported compiled, as in a full test run
os.environ["TRITON_INTERPRET"] = "1"
from kernels.sgmv_metadata import metadata_from_segments
from kernels.sgmv_shrink import sgmv_shrink, sgmv_shrink_ref
from kernels.sgmv_expand import sgmv_expand, sgmv_expand_ref
a = torch.randn(2, 1, 16, 32); b = torch.randn(2, 16, 24); table = torch.tensor([[0], [1]]).int()
meta = metadata_from_segments([3, 20], [1, 0], [16, 9], [0.5, 2.0], device="cpu")
x = torch.randn(23, 32)
h = sgmv_shrink(x, a, table, meta)
torch.testing.assert_close(h, sgmv_shrink_ref(x, a, table, meta))
y = sgmv_expand(h, b, table, meta, torch.zeros(23, 24), [24])
torch.testing.assert_close(y, sgmv_expand_ref(h, b, table, meta, torch.zeros(23, 24), [24]))
"""


def test_kernels_interpret_when_triton_was_imported_first() -> None:
    run_fresh("-c", LATE_INTERPRETER)


def test_kernels_compile_for_h100() -> None:
    pytest.importorskip("triton.backends.nvidia.compiler", reason="no NVIDIA backend in Triton")
    proc = run_fresh(__file__)
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(CASES)
    for (dtype_name, num_tokens), res in zip(CASES, results, strict=True):
        case = f"{dtype_name} T={num_tokens}"
        assert res["shrink_cubin"] > 0 and res["expand_cubin"] > 0, case
        # An H100 has 227 KiB of shared memory per block.
        assert max(res["shrink_shared"], res["expand_shared"]) <= 227 * 1024, case
        if num_tokens == 1:
            assert res["split_k"] > 1, f"{case}: decode should split K to fill the GPU"


if __name__ == "__main__":
    print(json.dumps([compile_case(d, t) for d, t in CASES]))
