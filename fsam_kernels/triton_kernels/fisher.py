"""Fisher accumulation ``F += fl32(g * g)`` over many tensors in one launch per gradient dtype."""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import CHUNK, interpret_env
from .memory import _on16
from .tables import DTYPE_CODES, TableCache, chunk_table, pointer_table, triton_dtype, upload

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)


@triton.jit
def _fisher_accumulate_kernel(acc_ptrs, grad_ptrs, numels, chunk_slot, chunk_start, GRAD_DTYPE: tl.constexpr,
                              BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot = tl.load(chunk_slot + c)
    start = tl.multiple_of(tl.load(chunk_start + c), BLOCK)
    n = tl.load(numels + slot)
    acc_address = tl.load(acc_ptrs + slot)
    grad_address = tl.load(grad_ptrs + slot)
    acc = acc_address.to(tl.pointer_type(tl.float32))
    grad = grad_address.to(tl.pointer_type(GRAD_DTYPE))
    offs = start + tl.arange(0, BLOCK)
    if _on16(acc_address | grad_address) & (start + BLOCK <= n):
        # a full block of a pair on 16 bytes: no bounds mask, so 128-bit loads and stores
        acc = tl.multiple_of(acc, 16)
        g = tl.load(tl.multiple_of(grad, 16) + offs).to(tl.float32)
        tl.store(acc + offs, tl.load(acc + offs) + g * g)  # g * g rounds on its own: no FMA contraction
    else:
        inside = offs < n
        g = tl.load(grad + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(acc + offs, tl.load(acc + offs, mask=inside, other=0.0) + g * g, mask=inside)


_chunk_tables = TableCache()  # by the tensors' sizes (and device)
_pointer_tables = TableCache(16)  # by the tensors' addresses: gradients may move every backward pass


def _chunks(numels: Sequence[int], device: torch.device):
    slot, start, _ = chunk_table(numels)
    return upload(torch.tensor(numels, dtype=torch.int64), device), upload(slot, device), upload(start, device)


def _pointers(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    key = (tensors[0].device, tuple(t.data_ptr() for t in tensors))
    return _pointer_tables.get(key, lambda: pointer_table(tensors, tensors[0].device))


def fisher_accumulate(accum: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> list[int]:
    """Accumulate the pairs whose gradient dtype the kernel handles; return the positions of the
    others (the caller runs the reference on them). Inputs must be validated and contiguous."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    rest = []
    for i, g in enumerate(grads):
        if g.dtype in DTYPE_CODES:
            by_dtype.setdefault(g.dtype, []).append(i)
        else:
            rest.append(i)
    for dtype, idx in by_dtype.items():
        acc = [accum[i] for i in idx]
        grd = [grads[i] for i in idx]
        sizes = tuple(a.numel() for a in acc)
        numels, slot, start = _chunk_tables.get((acc[0].device, sizes), lambda: _chunks(sizes, acc[0].device))
        n_chunks = slot.numel()
        if n_chunks:
            _fisher_accumulate_kernel[(n_chunks,)](
                _pointers(acc), _pointers(grd), numels, slot, start,
                GRAD_DTYPE=triton_dtype(dtype), BLOCK=CHUNK, num_warps=8,
                enable_fp_fusion=False,
            )
    return rest
