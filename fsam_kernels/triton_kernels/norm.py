"""Global gradient norm ``sqrt(sum_i ||a_i * g_i||^2)`` (``a_i = |w_i|`` for ASAM groups, else 1).

One launch per (weight dtype, gradient dtype) group writes one fp32 partial sum per chunk; one
single-program launch adds the partials in fp64 in a fixed order, so the norm is deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CHUNK, interpret_env
from .reductions import _sum
from .tables import triton_dtype

_FINAL_BLOCK = 1024

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)


@triton.jit
def _sumsq_kernel(w_ptrs, g_ptrs, numels, adaptive, chunk_slot, chunk_start, partials,
                  W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot = tl.load(chunk_slot + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + slot)
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    gp = tl.load(g_ptrs + slot).to(tl.pointer_type(G_DTYPE))
    v = tl.load(gp + offs, mask=inside, other=0.0).to(tl.float32)
    if tl.load(adaptive + slot) != 0:
        wp = tl.load(w_ptrs + slot).to(tl.pointer_type(W_DTYPE))
        v = tl.abs(tl.load(wp + offs, mask=inside, other=0.0).to(tl.float32)) * v
    tl.store(partials + c, _sum(v * v, 0))


@triton.jit
def _sqrt_of_sum_kernel(partials, n, extra, out, BLOCK: tl.constexpr):
    # fp64: a billion-parameter model has ~300 partials per lane, more than fp32 sums keep exactly
    acc = tl.full([BLOCK], 0, tl.float64)
    i = tl.full([], 0, tl.int64)
    while i < n:
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0).to(tl.float64)
        i += BLOCK
    total = _sum(acc, 0) + tl.load(extra).to(tl.float64)
    tl.store(out, tl.sqrt_rn(total.to(tl.float32)))


def grad_norm(groups, device: torch.device, extra_sumsq: torch.Tensor) -> torch.Tensor:
    """Norm over the tensors of ``groups`` (see ``backends.triton_backend._Group``) plus
    ``extra_sumsq`` (a 1-element fp32 device tensor: the squared norm of tensors done elsewhere)."""
    total = sum(g.n_chunks for g in groups)
    partials = torch.empty(max(total, 1), dtype=torch.float32, device=device)
    base = 0
    for g in groups:
        if g.n_chunks:
            _sumsq_kernel[(g.n_chunks,)](
                g.w_ptrs, g.g_ptrs, g.numels, g.adaptive, g.chunk_slot, g.chunk_start, partials[base:],
                W_DTYPE=triton_dtype(g.w_dtype), G_DTYPE=triton_dtype(g.g_dtype), BLOCK=CHUNK, num_warps=8,
            )
        base += g.n_chunks
    out = torch.empty((), dtype=torch.float32, device=device)
    _sqrt_of_sum_kernel[(1,)](partials, total, extra_sumsq, out, BLOCK=_FINAL_BLOCK, num_warps=8)
    return out
