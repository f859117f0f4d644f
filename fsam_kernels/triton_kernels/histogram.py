"""The radix-histogram primitives of the sharded top-k (:mod:`fsam_kernels.distributed_select`).

Under FSDP2 no rank sees every score, so the threshold is found digit by digit: each pass counts the
keys under the prefix found so far, per masked tensor, and the ranks sum their counts. These kernels
do a pass in one launch over all tensors (the reference loops over tensors with several launches and
host synchronisations each):

* ``key_histogram``: one streaming read; each chunk histograms the digits of its keys under the
  prefix (``tl.histogram``, 256 bins: narrow enough to stay near a streaming read) and adds them to
  its tensor's row with atomics.
* ``mask_from_threshold``: the write / fix-up kernels of :mod:`.select` with a given threshold; the
  per-chunk tie quotas come from the per-tensor quotas by a segmented prefix sum (a few torch ops
  on the device, no host synchronisation).
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import CHUNK, interpret_env
from .select import MaskedPlan, _fixup_kernel, _load_keys, _write_kernel
from .tables import pointer_table, triton_dtype, upload

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)

MAX_RADIX_BITS = 8  # wider histograms cost far more than a streaming read in Triton


@triton.jit(do_not_specialize=["prefix", "shift", "high_shift"])  # new values every pass: no recompiles
def _histogram_kernel(score_ptrs, numels, chunk_slot, chunk_start, out, prefix, shift, high_shift,
                      DTYPE: tl.constexpr, SQUARE: tl.constexpr, TOP: tl.constexpr, BINS: tl.constexpr,
                      BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot, start, n, inside, key = _load_keys(score_ptrs, numels, chunk_slot, chunk_start, c, DTYPE, SQUARE, BLOCK)
    match = inside & (key >= 0)  # negative keys (sign bit set) lie under no prefix, as in the reference
    if not TOP:  # TOP: the first pass, whose prefix is empty (a shift by 32 is undefined)
        match = match & ((key >> high_shift) == prefix)
    digit = (key >> shift) & (BINS - 1)
    counts = tl.histogram(digit, BINS, mask=match)
    bins = tl.arange(0, BINS)
    tl.atomic_add(out + slot.to(tl.int64) * BINS + bins, counts.to(tl.int64), mask=counts > 0)


def key_histogram(plan: MaskedPlan, scores: Sequence[torch.Tensor], square: bool, prefix: int, shift: int,
                  radix_bits: int) -> torch.Tensor:
    """int64 ``(n_masked_tensors, 2**radix_bits)`` digit counts; scores share one kernel dtype."""
    bins = 1 << radix_bits
    out = torch.zeros((plan.n_tensors, bins), dtype=torch.int64, device=plan.device)
    high_shift = shift + radix_bits
    # keys are < 2**31: no key has bits above the top digit, nor a prefix of 2**(31 - high_shift) or more
    if (prefix != 0) if high_shift >= 32 else prefix >= 1 << (31 - high_shift):
        return out
    if plan.n_chunks:
        _histogram_kernel[(plan.n_chunks,)](
            pointer_table(scores, plan.device), plan.numels, plan.chunk_slot, plan.chunk_start, out,
            prefix, shift, min(high_shift, 31), DTYPE=triton_dtype(scores[0].dtype), SQUARE=bool(square),
            TOP=high_shift >= 32, BINS=bins, BLOCK=CHUNK, num_warps=8,
        )
    return out


def mask_from_threshold(plan: MaskedPlan, scores: Sequence[torch.Tensor], square: bool, threshold: int,
                        quotas: Sequence[int], mask_bytes: int) -> torch.Tensor:
    """Packed mask of the keys ``> threshold`` plus the first ``quotas[j]`` keys ``== threshold``
    (row-major) of the ``j``-th masked tensor."""
    device = plan.device
    bits = torch.empty(mask_bytes, dtype=torch.uint8, device=device)
    if not plan.n_chunks:
        return bits.zero_()
    n_chunks = plan.n_chunks
    score_ptrs = pointer_table(scores, device)
    params = upload(torch.tensor([0, 0, threshold, 0], dtype=torch.int32), device)
    counts = torch.empty(3 * n_chunks, dtype=torch.int32, device=device)
    common = dict(DTYPE=triton_dtype(scores[0].dtype), SQUARE=bool(square), BLOCK=CHUNK, num_warps=8)
    _write_kernel[(n_chunks,)](score_ptrs, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start, params,
                               counts, n_chunks, bits, **common)
    # Ties before a chunk within its tensor, then what is left of the tensor's quota for the chunk.
    ties = counts[n_chunks : 2 * n_chunks].to(torch.int64)
    before = torch.cumsum(ties, 0) - ties
    slot = plan.chunk_slot.long()
    # (an empty tensor's first chunk is its successor's, possibly n_chunks; no chunk refers to it)
    first = upload(torch.tensor(plan.first_chunk, dtype=torch.int64).clamp(max=n_chunks - 1), device)
    before -= before[first][slot]
    quota = upload(torch.tensor(list(quotas), dtype=torch.int64), device)[slot]
    chunk_quota = (quota - before).clamp(min=0).minimum(ties)
    _fixup_kernel[(n_chunks,)](score_ptrs, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start, params,
                               chunk_quota, bits, **common)
    return bits
