"""Tenant-safe replacements for vLLM 0.32's pure-torch (CPU) LoRA ops.

vLLM marks a token without an adapter with lora index -1 and its CPU ops gather weights with
`weights[indices]`. In Python -1 is the LAST slot, so once every max_loras slot holds an
adapter, base-model tokens in the same batch silently receive the last slot's adapter: one
tenant's fine-tune applied to another's request (fixed upstream after 0.32, vllm PR #48421).

These versions select with the index clamped to a valid slot and zero-fill the rows marked -1,
so they contribute exactly zero: filled, not multiplied by a 0/1 mask, since inf or NaN in the
clamped-to slot 0 times 0 would still be NaN. With few slots they multiply every token by every
slot's weights in one batched matmul and keep each token's own row, instead of gathering a
weight matrix per token as vLLM does (the gather was most of a LoRA step's time on CPU). No
data-dependent shapes: the ops stay traceable by torch.compile.
"""

from __future__ import annotations

import torch

# Up to this many slots, every token is multiplied by every slot's weights (one batched BLAS
# matmul) and its own slot's row kept: at 4 slots 6x faster than gathering a weight matrix
# per token for decode and 30x for a 448-token prefill (measured on 2 CPU cores), since the
# gather copies a [tokens, out, in] tensor. Beyond it the slots' wasted products cost more.
MAX_DENSE_SLOTS = 32


def _lora_products(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """x[t] · W[idx[t]]ᵀ for each token: [tokens, in] x [slots, (1,) out, in] → [tokens, out],
    exactly zero for tokens whose index is -1."""
    stacked = weights.squeeze(dim=1) if weights.dim() == 4 else weights
    x = inputs.to(dtype=dtype)
    slots, out_dim, in_dim = stacked.shape
    # Dense only while it also allocates less than the gather ([slots, tokens, out] against
    # [tokens, out, in]): the smaller of out and in is the rank.
    if slots <= MAX_DENSE_SLOTS and slots <= max(8, min(out_dim, in_dim)):
        every = torch.matmul(x, stacked.to(dtype=dtype).transpose(1, 2))  # [slots, tokens, out]
        rows = torch.arange(x.shape[0], device=x.device)
        products = every[indices.clamp(min=0), rows]
    else:
        selected = stacked[indices.clamp(min=0)].to(dtype=dtype)  # [tokens, out, in]
        products = torch.einsum("bi, boi -> bo", x, selected)
    # Filled, not multiplied by a 0/1 mask: inf or NaN in slot 0 times 0 would be NaN.
    return products.masked_fill_((indices < 0).view(-1, 1), 0)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """output[t, :r] = scaling · x[t] · A[idx[t]]ᵀ, zero where idx[t] == -1."""
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """output[t] (+)= h[t] · B[idx[t]]ᵀ, nothing added where idx[t] == -1."""
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad the output dimension differently.
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """output[t, offset:offset+size] (+)= h[t] · B[idx[t]]ᵀ, nothing added where idx[t] == -1."""
    outputs = _lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


# Every module namespace that bound the upstream ops by name.
NAMESPACES = (
    "vllm.lora.ops.torch_ops.lora_ops",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper.punica_cpu",
)
REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def install() -> list[str]:
    """Swap the ops in every vLLM module that bound them; returns the patched module names.

    vLLM's sgmv_* wrappers look their bgmv_* helpers up in the lora_ops module globals, and
    punica_cpu imported the bgmv_* names directly, so both namespaces are rebound.
    """
    import importlib

    patched = []
    for module_name in NAMESPACES:
        module = importlib.import_module(module_name)
        for name, replacement in REPLACEMENTS.items():
            if not hasattr(module, name):
                raise RuntimeError(f"loraplex: {module_name}.{name} not found; vLLM layout changed")
            setattr(module, name, replacement)
        patched.append(module_name)
    return patched


def installed() -> bool:
    """Whether every vLLM namespace that binds the ops binds loraplex's: the engine reports it
    to the gateway, which refuses to serve on CPU without it (tenant bleed otherwise)."""
    import importlib

    for module_name in NAMESPACES:
        module = importlib.import_module(module_name)
        if any(getattr(module, n, None) is not f for n, f in REPLACEMENTS.items()):
            return False
    return True
