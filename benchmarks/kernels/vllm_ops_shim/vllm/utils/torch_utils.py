"""vLLM 0.32's `direct_register_custom_op` and `async_tensor_h2d`, same behaviour."""

from collections.abc import Callable

import numpy as np
import torch
from torch.library import Library

try:
    from torch.library import infer_schema
except ImportError:  # older torch
    from torch._custom_op.impl import infer_schema  # type: ignore[no-redef]

vllm_lib = Library("vllm", "FRAGMENT")  # the namespace vLLM's ops live in


def direct_register_custom_op(
    op_name: str,
    op_func: Callable,
    mutates_args: list[str] | None = None,
    fake_impl: Callable | None = None,
    target_lib: Library | None = None,
    dispatch_key: str | None = None,
    tags: tuple[torch.Tag, ...] = (),
) -> None:
    """Register `op_func` as torch.ops.vllm.<op_name> for this platform's dispatch key."""
    if dispatch_key is None:
        from vllm.platforms import current_platform

        dispatch_key = current_platform.dispatch_key
    schema_str = infer_schema(op_func, mutates_args=mutates_args or [])
    lib = target_lib or vllm_lib
    lib.define(op_name + schema_str, tags=tags)
    lib.impl(op_name, op_func, dispatch_key=dispatch_key)
    if fake_impl is not None:
        lib._register_fake(op_name, fake_impl)


def async_tensor_h2d(
    data: list | np.ndarray | torch.Tensor,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy list/numpy array/tensor async from host to device (pinned staging on CUDA)."""
    pin = torch.cuda.is_available()
    if dtype is None and out is not None:
        dtype = out.dtype
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, torch.Tensor):
        t = data
        if pin and not t.is_pinned():
            t = torch.empty(t.shape, dtype=dtype or t.dtype, device="cpu", pin_memory=True)
            t.copy_(data)
    else:
        t = torch.tensor(data, dtype=dtype, pin_memory=pin, device="cpu")
    if out is not None:
        return out.copy_(t, non_blocking=True)
    assert device is not None, "must provide destination tensor or device"
    return t.to(device=device, dtype=dtype, non_blocking=True)
