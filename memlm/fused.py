"""Fused memory read for CUDA (Triton): out[r] = sum_j weights[r, j] * table[indices[r, j]].

The reference path is `F.embedding_bag(mode="sum", per_sample_weights=...)` (memlm.memory). The
Triton kernel does the same gather-and-weighted-sum in one pass per (bag, block of the value width),
accumulating in fp32 whatever the table's dtype, so a bf16 table is read once and never upcast in
memory. It is inference-only (no autograd): training and row overlays keep the reference path.

Opt in with `MEMFIT_MEMORY_KERNEL=triton`; it is used when Triton is importable, the table is on a CUDA
device (or `TRITON_INTERPRET=1`, Triton's CPU interpreter, which the tests use to check the kernel
against the reference on a machine without a GPU) and no gradient is being recorded. Anything else
falls back to the reference path, which is always correct.
"""

from __future__ import annotations

import functools
import os

import torch

ENV = "MEMFIT_MEMORY_KERNEL"


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def bag_kernel(idx_ptr, w_ptr, table_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        bag = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        inside = offs < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(0, K):
            slot = tl.load(idx_ptr + bag * K + j)
            w = tl.load(w_ptr + bag * K + j).to(tl.float32)
            row = tl.load(table_ptr + slot * D + offs, mask=inside, other=0.0).to(tl.float32)
            acc += w * row
        tl.store(out_ptr + bag * D + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)

    return triton, bag_kernel


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def wanted(table: torch.Tensor) -> bool:
    """Use the fused kernel for a read of `table` now? (see the module docstring)"""
    if os.environ.get(ENV, "torch").lower() != "triton" or torch.is_grad_enabled():
        return False
    if not (table.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return triton_available()


def bag(
    indices: torch.Tensor, table: torch.Tensor, weights: torch.Tensor, block_d: int = 128
) -> torch.Tensor:
    """(R, K) slot ids, (N, D) table, (R, K) weights -> (R, D) weighted sums, in the table's dtype."""
    if indices.dim() != 2 or weights.shape != indices.shape or table.dim() != 2:
        raise ValueError(
            f"bag: indices {tuple(indices.shape)}, weights {tuple(weights.shape)}, table {tuple(table.shape)}"
        )
    triton, kernel = _kernel()
    R, K = indices.shape
    D = table.shape[1]
    idx = indices.contiguous()
    w = weights.contiguous()
    tab = table.contiguous()
    out = torch.empty((R, D), dtype=table.dtype, device=table.device)
    if R:
        block = min(block_d, triton.next_power_of_2(D))
        kernel[(R, triton.cdiv(D, block))](idx, w, tab, out, D, K=K, BLOCK_D=block)
    return out
