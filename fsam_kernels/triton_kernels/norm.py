"""Global gradient norm ``sqrt(sum_i ||a_i * g_i||^2)`` (``a_i = |w_i|`` for ASAM groups, else 1).

One launch per (weight dtype, gradient dtype) group writes one partial sum per chunk; one
single-program launch adds the partials in fp64 in a fixed order, so the norm is deterministic.

The norm rule the kernels follow (docs/backends.md, "The gradient norm"): the product ``v = fl32(|w| * g)`` (the
reference's), each square ``v * v`` in fp64 (exact: 48 significant bits; no overflow for finite inputs,
the reference's skip rule), summed in fp64 and its root rounded once to the norm dtype. The fp64 sum's
rounding error (about 1e-16 relative) stays far below fp32's, so the native and Triton kernels return
the same fp32 norm bit for bit, whatever their summation order. The reference's own value (davda54/sam's
per-tensor fp32 norms) differs from it by its fp32 rounding, at most a few ulps (tested at 2e-6
relative). One fp64 multiply-add per element costs nothing on a memory-bound stream on data-centre
GPUs (fp64 at 1/2 of fp32); a consumer GPU (1/64) is still near its bandwidth for fp32 inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CHUNK, interpret_env
from .memory import _on16
from .reductions import _sum
from .tables import triton_dtype

_FINAL_BLOCK = 1024

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)


@triton.jit
def _sumsq_kernel(w_ptrs, g_ptrs, numels, adaptive, chunk_slot, chunk_start, partials,
                  W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot = tl.load(chunk_slot + c)
    start = tl.multiple_of(tl.load(chunk_start + c), BLOCK)
    n = tl.load(numels + slot)
    g_address = tl.load(g_ptrs + slot)
    w_address = tl.load(w_ptrs + slot)
    gp = g_address.to(tl.pointer_type(G_DTYPE))
    wp = w_address.to(tl.pointer_type(W_DTYPE))
    is_adaptive = tl.load(adaptive + slot) != 0
    offs = start + tl.arange(0, BLOCK)
    w = tl.full([BLOCK], 1.0, tl.float32)
    if _on16(g_address | tl.where(is_adaptive, w_address, 0)) & (start + BLOCK <= n):
        # a full block of tensors on 16 bytes: no bounds mask, so 128-bit loads
        g = tl.load(tl.multiple_of(gp, 16) + offs)
        if is_adaptive:
            w = tl.load(tl.multiple_of(wp, 16) + offs).to(tl.float32)
    else:  # the same values (zeros past the end), so the same sums
        inside = offs < n
        g = tl.load(gp + offs, mask=inside, other=0.0)
        if is_adaptive:
            w = tl.load(wp + offs, mask=inside, other=0.0).to(tl.float32)
    # the reference's fp32 product |w| * g, rounded once; its square is exact in fp64, and squares of
    # fp32 values cannot overflow there: the fp64 sum, whatever its order, rounds to the same fp32 norm
    v = (tl.abs(w) * g.to(tl.float32)).to(tl.float64)
    total = _sum(v * v, 0)
    tl.store(partials + c, total)


@triton.jit
def _sqrt_of_sum_kernel(partials, n, extra, out, BLOCK: tl.constexpr):
    # fp64: a billion-parameter model has ~300 partials per lane, more than fp32 sums keep exactly
    acc = tl.full([BLOCK], 0, tl.float64)
    i = tl.full([], 0, tl.int64)
    while i < n:
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0).to(tl.float64)
        i += BLOCK
    total = _sum(acc, 0) + tl.load(extra)
    # rounded to out's dtype (the norm dtype) after the root: inf beyond its range (the skip rule)
    tl.store(out, tl.sqrt(total).to(out.dtype.element_ty))


def grad_norm(groups, device: torch.device, extra_sumsq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Norm, in ``dtype`` (the norm dtype), over the tensors of ``groups`` (see
    ``backends.triton_backend._Group``) plus ``extra_sumsq`` (a 1-element fp64 device tensor: the sum of
    squares of tensors done elsewhere)."""
    total = sum(g.n_chunks for g in groups)
    partials = torch.empty(max(total, 1), dtype=torch.float64, device=device)
    base = 0
    for g in groups:
        if g.n_chunks:
            _sumsq_kernel[(g.n_chunks,)](
                g.w_ptrs, g.g_ptrs, g.numels, g.adaptive, g.chunk_slot, g.chunk_start, partials[base:],
                W_DTYPE=triton_dtype(g.w_dtype), G_DTYPE=triton_dtype(g.g_dtype), BLOCK=CHUNK,
                num_warps=8, enable_fp_fusion=False,
            )
        base += g.n_chunks
    out = torch.empty((), dtype=dtype, device=device)
    _sqrt_of_sum_kernel[(1,)](partials, total, extra_sumsq, out, BLOCK=_FINAL_BLOCK, num_warps=8)
    return out
