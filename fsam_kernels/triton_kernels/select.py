"""Global top-k Fisher mask without concatenating or sorting, and the per-chunk mask counts.

The selection key of an element is the int32 bit pattern of its non-negative fp32 Fisher score (or
of ``fl32(g) * fl32(g)``); such keys order like the scores. Wide histograms are slow in Triton
(a 2048-bin ``tl.histogram`` pass costs ~23 streaming reads on an H200), so the threshold is found by
a *sampled bracket* instead of a radix select over all elements:

1. ``_sample_kernel`` reads ``S`` keys at evenly spaced positions of the concatenated order.
2. ``_bracket_kernel`` (one program) radix-selects two order statistics of the sample around rank
   ``k * S / N``: keys ``lo <= hi`` such that, with overwhelming probability, the k-th largest key
   lies in ``[lo, hi]`` while only ~``N * 10 sigma / S`` elements lie strictly between them.
3. ``_count_kernel`` (one streaming read) counts keys ``> hi``, ``== hi``, ``== lo`` per chunk and
   compacts the keys strictly between ``lo`` and ``hi`` into a small candidate buffer.
4. ``_resolve_kernel`` (one program) locates the k-th largest key ``T`` from those counts, with a
   radix select over the candidates only when it lies strictly inside the bracket.
5. ``_write_kernel`` (one streaming read) writes the bits of the keys ``> T`` and counts, per
   chunk, keys ``> T`` and ``== T``; ``_scan_kernel`` (one program) turns the tie counts into
   per-chunk tie quotas (the lowest global bit indices win) and the per-chunk prefix counts of
   the final mask; ``_fixup_kernel`` rewrites only the chunks that keep some ties.

Exact whatever the data: ties at ``lo``/``hi`` are counted, never compacted, so the candidate
buffer is bounded by the sample's rank spacing. If the bracket misses (a vanishingly unlikely
sample) or the candidates overflow, the status flag says so and the caller falls back to the
reference. Seven launches (six when N fits the candidate buffer: no sampling), one host
synchronisation (status and buffer sizes).

The parallel variant (``parallel=True``, what the backend uses for large models): steps 2 and 4 run
as four radix passes each over a persistent grid (:mod:`.radix`) with small finishing kernels, since
one program (one SM) takes milliseconds over millions of candidates at 256-bin ``tl.histogram``
speed. Seventeen launches instead of seven.

Where the time should go on a GPU (to be measured): the count and write passes stream all keys
once each; the two single-program stages cost ~8 histogram passes over the sample and up to 4 over
the candidates (fewer when ``lo`` and ``hi`` share their leading bytes), which is what
``sample_size`` and the candidate capacity trade against each other.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import CHUNK, N_GROUPS, interpret_env
from .radix import PASSES, launch_passes, selected_key
from .reductions import _cumsum, _min, _sum
from .tables import chunk_table, pointer_table, triton_dtype, upload

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)

_SCAN_BLOCK = 1024
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1


# ----------------------------------------------------------------------------- helpers
@triton.jit
def _key(x, SQUARE: tl.constexpr):
    f = x.to(tl.float32)
    if SQUARE:
        f = f * f
    return f.to(tl.int32, bitcast=True)


@triton.jit
def _load_keys(score_ptrs, numels, chunk_slot, chunk_start, c, DTYPE: tl.constexpr, SQUARE: tl.constexpr,
               BLOCK: tl.constexpr):
    slot = tl.load(chunk_slot + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + slot)
    src = tl.load(score_ptrs + slot).to(tl.pointer_type(DTYPE))
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    key = _key(tl.load(src + offs, mask=inside, other=0.0), SQUARE)
    return slot, start, n, inside, key


@triton.jit
def _store_mask_bytes(mask, bit_base, start, n, sel, BLOCK: tl.constexpr):
    # A chunk owns the bytes of its elements up to the tensor's 512-bit-aligned end (padding = 0).
    bits = tl.reshape(sel.to(tl.int32), [BLOCK // 8, 8])
    byte = _sum(bits << tl.arange(0, 8)[None, :], 1).to(tl.uint8)
    j = tl.arange(0, BLOCK // 8)
    n_bytes = (((n + 511) // 512) * 512 - start) // 8
    tl.store(mask + (bit_base + start) // 8 + j, byte, mask=j < n_bytes)


@triton.jit
def _kth_largest(keys, n, rank, bound_lo, bound_hi, BLOCK: tl.constexpr):
    """The ``rank``-th largest (1-based) of ``n`` int32 keys, all in ``[bound_lo, bound_hi]``: radix
    select, 4 passes of 8 bits, in the unsigned order ``key + 2**31`` (equal to the signed order).
    The passes over digits that the bounds (hence every key) share are skipped: in a narrow bracket
    of float keys that is usually the first one or two of the four."""
    prefix = tl.full([], 0, tl.int64)
    rank = tl.full([], 0, tl.int64) + rank  # a tensor even when the launcher specialised it
    lo_u = bound_lo.to(tl.int64) + 2147483648
    hi_u = bound_hi.to(tl.int64) + 2147483648
    bins = tl.arange(0, 256)
    for shift in tl.static_range(24, -1, -8):
        if (lo_u >> shift) == (hi_u >> shift):
            prefix = (lo_u >> shift) << shift
        else:
            hist = tl.full([256], 0, tl.int32)
            i = tl.full([], 0, tl.int64)
            while i < n:
                offs = i + tl.arange(0, BLOCK)
                valid = offs < n
                u = tl.load(keys + offs, mask=valid, other=0).to(tl.int64) + 2147483648
                match = valid & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
                digit = ((u >> shift) & 255).to(tl.int32)
                hist += tl.histogram(digit, 256, mask=match)
                i += BLOCK
            above = (_sum(hist, 0) - _cumsum(hist, 0)).to(tl.int64)  # keys in higher bins
            b = _min(tl.where(above < rank, bins, 256), 0)
            rank = rank - _sum(tl.where(bins == b, above, 0), 0)
            prefix = prefix + (b.to(tl.int64) << shift)
    return (prefix - 2147483648).to(tl.int32)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _sample_kernel(score_ptrs, elem_offsets, n_tensors, n_total, n_samples, n_search, sample,
                   DTYPE: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = s < n_samples
    pos = ((2 * s + 1) * n_total) // (2 * n_samples)
    # binary search of the tensor holding each position: elem_offsets[lo] <= pos < elem_offsets[hi]
    lo = tl.full([BLOCK], 0, tl.int64)
    hi = tl.full([BLOCK], 0, tl.int64) + n_tensors
    it = tl.full([], 0, tl.int64)
    while it < n_search:
        mid = (lo + hi) // 2
        go = tl.load(elem_offsets + mid) <= pos
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
        it += 1
    src = tl.load(score_ptrs + lo).to(tl.pointer_type(DTYPE))
    x = tl.load(src + (pos - tl.load(elem_offsets + lo)), mask=valid, other=0.0)
    tl.store(sample + s, _key(x, SQUARE), mask=valid)


@triton.jit
def _bracket_kernel(sample, n_samples, rank_hi, rank_lo, params, info, BLOCK: tl.constexpr):
    lo = tl.full([], -2147483648, tl.int32)
    hi = tl.full([], 2147483647, tl.int32)
    if rank_hi >= 1:
        hi = _kth_largest(sample, n_samples, rank_hi, lo, hi, BLOCK)
    if rank_lo <= n_samples:
        lo = _kth_largest(sample, n_samples, rank_lo, lo, tl.full([], 2147483647, tl.int32), BLOCK)
    tl.store(params + 0, lo)
    tl.store(params + 1, hi)
    tl.store(info + 0, 0)  # candidate counter


@triton.jit
def _count_kernel(score_ptrs, numels, chunk_slot, chunk_start, params, counts, n_chunks, cand, info, capacity,
                  DTYPE: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot, start, n, inside, key = _load_keys(score_ptrs, numels, chunk_slot, chunk_start, c, DTYPE, SQUARE, BLOCK)
    lo = tl.load(params + 0)
    hi = tl.load(params + 1)
    gt = inside & (key > hi)
    eq_hi = inside & (key == hi)
    eq_lo = inside & (key == lo) & (lo != hi)
    inner = inside & (key > lo) & (key < hi)
    tl.store(counts + c, _sum(gt.to(tl.int32), 0))
    tl.store(counts + n_chunks + c, _sum(eq_hi.to(tl.int32), 0))
    tl.store(counts + 2 * n_chunks + c, _sum(eq_lo.to(tl.int32), 0))
    n_inner = _sum(inner.to(tl.int32), 0)
    if n_inner > 0:
        base = tl.atomic_add(info + 0, n_inner.to(tl.int64))
        pos = base + _cumsum(inner.to(tl.int32), 0) - 1
        tl.store(cand + pos, key, mask=inner & (pos < capacity))


@triton.jit
def _threshold_case(counts, n_chunks, info, capacity, params, k, BLOCK: tl.constexpr):
    """From the count pass's per-chunk counts: the threshold when it is a bracket key (``t``), or
    ``inside`` when it lies strictly between them (its rank among the candidates is ``rank``), and
    ``ok`` = 0 when the bracket missed or the candidates overflowed."""
    n_gt = tl.full([], 0, tl.int64)
    n_hi = tl.full([], 0, tl.int64)
    n_lo = tl.full([], 0, tl.int64)
    i = tl.full([], 0, tl.int64)
    while i < n_chunks:
        offs = i + tl.arange(0, BLOCK)
        valid = offs < n_chunks
        n_gt += _sum(tl.load(counts + offs, mask=valid, other=0).to(tl.int64), 0)
        n_hi += _sum(tl.load(counts + n_chunks + offs, mask=valid, other=0).to(tl.int64), 0)
        n_lo += _sum(tl.load(counts + 2 * n_chunks + offs, mask=valid, other=0).to(tl.int64), 0)
        i += BLOCK
    n_inner = tl.load(info + 0)
    lo = tl.load(params + 0)
    hi = tl.load(params + 1)
    t = hi
    ok = tl.full([], 1, tl.int64)
    inside = tl.full([], 0, tl.int64)
    if k <= n_gt:
        ok = tl.full([], 0, tl.int64)
    elif k <= n_gt + n_hi:
        t = hi
    elif k <= n_gt + n_hi + n_inner:
        if n_inner <= capacity:
            inside = tl.full([], 1, tl.int64)
        else:
            ok = tl.full([], 0, tl.int64)
    elif k <= n_gt + n_hi + n_inner + n_lo:
        t = lo
    else:
        ok = tl.full([], 0, tl.int64)
    return t, ok, inside, k - n_gt - n_hi, n_inner, lo, hi


@triton.jit
def _resolve_kernel(counts, n_chunks, cand, info, capacity, params, k, BLOCK: tl.constexpr):
    t, ok, inside, rank, n_inner, lo, hi = _threshold_case(counts, n_chunks, info, capacity, params, k, BLOCK)
    if inside != 0:
        t = _kth_largest(cand, n_inner, rank, lo, hi, BLOCK)
    tl.store(params + 2, t)
    tl.store(info + 1, ok)


# ----------------------------------------------------------------------------- the parallel variant
# The same stages with the two order statistics of the sample and the one among the candidates found
# by :mod:`.radix` (four launches over many programs each) instead of one program (see select_mask).
@triton.jit
def _bracket_finish_kernel(sel, hist, params, info):
    lo = tl.full([], -2147483648, tl.int32)
    hi = tl.full([], 2147483647, tl.int32)
    if tl.load(sel + 0) != 0:
        hi = selected_key(sel, hist, 0, 2)
    if tl.load(sel + 4) != 0:
        lo = selected_key(sel, hist, 1, 2)
    tl.store(params + 0, lo)
    tl.store(params + 1, hi)
    tl.store(info + 0, 0)  # candidate counter


@triton.jit
def _resolve_pre_kernel(counts, n_chunks, info, capacity, params, k, sel, BLOCK: tl.constexpr):
    """As ``_resolve_kernel``, except that a threshold strictly inside the bracket is left to the
    parallel radix select over the candidates: its selection row (active, rank, lo, hi) goes to
    ``sel[0:4]`` and the number of candidates to ``sel[4]``."""
    t, ok, inside, rank, n_inner, lo, hi = _threshold_case(counts, n_chunks, info, capacity, params, k, BLOCK)
    tl.store(sel + 0, inside)
    tl.store(sel + 1, rank)
    tl.store(sel + 2, lo.to(tl.int64))
    tl.store(sel + 3, hi.to(tl.int64))
    tl.store(sel + 4, tl.minimum(n_inner, capacity))  # how many candidates the passes read
    tl.store(params + 2, t)
    tl.store(info + 1, ok)


@triton.jit
def _candidate_finish_kernel(sel, hist, params):
    if tl.load(sel + 0) != 0:
        tl.store(params + 2, selected_key(sel, hist, 0, 1))


@triton.jit
def _write_kernel(score_ptrs, numels, bit_offsets, chunk_slot, chunk_start, params, counts, n_chunks, mask,
                  DTYPE: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot, start, n, inside, key = _load_keys(score_ptrs, numels, chunk_slot, chunk_start, c, DTYPE, SQUARE, BLOCK)
    t = tl.load(params + 2)
    gt = inside & (key > t)
    eq = inside & (key == t)
    _store_mask_bytes(mask, tl.load(bit_offsets + slot), start, n, gt, BLOCK)
    tl.store(counts + c, _sum(gt.to(tl.int32), 0))
    tl.store(counts + n_chunks + c, _sum(eq.to(tl.int32), 0))


@triton.jit
def _scan_kernel(counts, n_chunks, chunk_group, k, quota, prefix, info, BLOCK: tl.constexpr,
                 N_GROUPS: tl.constexpr):
    """Tie quotas (ties go to the lowest global indices) and, per chunk, the exclusive prefix count
    of the final mask within the chunk's group; the group totals go to ``info[2:2+N_GROUPS]``."""
    n_gt = tl.full([], 0, tl.int64)
    i = tl.full([], 0, tl.int64)
    while i < n_chunks:
        offs = i + tl.arange(0, BLOCK)
        n_gt += _sum(tl.load(counts + offs, mask=offs < n_chunks, other=0).to(tl.int64), 0)
        i += BLOCK
    need = k - n_gt
    eq_before = tl.full([], 0, tl.int64)
    gids = tl.arange(0, N_GROUPS)
    carries = tl.full([N_GROUPS], 0, tl.int64)
    i = tl.full([], 0, tl.int64)
    while i < n_chunks:
        offs = i + tl.arange(0, BLOCK)
        valid = offs < n_chunks
        gt = tl.load(counts + offs, mask=valid, other=0).to(tl.int64)
        eq = tl.load(counts + n_chunks + offs, mask=valid, other=0).to(tl.int64)
        eq_excl = eq_before + _cumsum(eq, 0) - eq
        q = tl.minimum(tl.maximum(need - eq_excl, 0), eq)
        tl.store(quota + offs, q, mask=valid)
        eq_before += _sum(eq, 0)
        kept = gt + q
        grp = tl.load(chunk_group + offs, mask=valid, other=0)
        pre = tl.full([BLOCK], 0, tl.int64)
        for g in tl.static_range(N_GROUPS):
            v = tl.where(valid & (grp == g), kept, 0)
            carry = _sum(tl.where(gids == g, carries, 0), 0)
            pre = tl.where(valid & (grp == g), carry + _cumsum(v, 0) - v, pre)
            carries = tl.where(gids == g, carry + _sum(v, 0), carries)
        tl.store(prefix + offs, pre, mask=valid)
        i += BLOCK
    tl.store(info + 2 + gids, carries)


@triton.jit
def _fixup_kernel(score_ptrs, numels, bit_offsets, chunk_slot, chunk_start, params, quota, mask,
                  DTYPE: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    q = tl.load(quota + c)
    if q > 0:
        slot, start, n, inside, key = _load_keys(score_ptrs, numels, chunk_slot, chunk_start, c, DTYPE, SQUARE,
                                                 BLOCK)
        t = tl.load(params + 2)
        eq = inside & (key == t)
        sel = (inside & (key > t)) | (eq & (_cumsum(eq.to(tl.int32), 0) <= q))
        _store_mask_bytes(mask, tl.load(bit_offsets + slot), start, n, sel, BLOCK)


@triton.jit
def _popcount_kernel(mask, numels, bit_offsets, chunk_slot, chunk_start, counts, n_chunks, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    slot = tl.load(chunk_slot + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + slot)
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    b = tl.load(bit_offsets + slot) + offs
    byte = tl.load(mask + (b >> 3), mask=inside, other=0).to(tl.int32)
    bit = (byte >> (b & 7).to(tl.int32)) & 1
    tl.store(counts + c, _sum(bit, 0))
    tl.store(counts + n_chunks + c, 0)


# ----------------------------------------------------------------------------- host side
class MaskedPlan:
    """Tables of the masked tensors of one layout (their chunks, bit offsets, element offsets)."""

    def __init__(self, layout, group_of_param: Sequence[int]) -> None:
        device = layout.device
        idx = layout.masked_index
        numels = [layout.numel[i] for i in idx]
        self.n_tensors = len(idx)
        self.n_total = sum(numels)
        self.numels = upload(torch.tensor(numels, dtype=torch.int64), device)
        self.bit_offsets = upload(torch.tensor(layout.bit_offset, dtype=torch.int64), device)
        self.elem_offsets = upload(torch.tensor([0, *itertools.accumulate(numels)], dtype=torch.int64), device)
        slot, start, local = chunk_table(numels)
        self.n_chunks = slot.numel()
        self.chunk_slot = upload(slot, device)
        self.chunk_start = upload(start, device)
        counts = [(n + CHUNK - 1) // CHUNK for n in numels]
        self.first_chunk = [0, *itertools.accumulate(counts)][: len(counts)]
        groups = torch.tensor([group_of_param[i] for i in idx], dtype=torch.int32)
        self.chunk_group = upload(groups[slot.long()] if self.n_chunks else torch.zeros(0, dtype=torch.int32), device)
        self.n_search = max(1, math.ceil(math.log2(max(1, self.n_tensors)))) + 1
        self.device = device
        # programs of a radix pass: a few per SM (a few in the interpreter: several, to test the atomics)
        self.max_radix_programs = (4 * torch.cuda.get_device_properties(device).multi_processor_count
                                   if device.type == "cuda" else 3)

    def radix_grid(self, n_keys: int) -> int:
        return max(1, min(triton.cdiv(n_keys, CHUNK), self.max_radix_programs))


def bracket_ranks(n_total: int, k: int, n_samples: int) -> tuple[int, int]:
    """1-based sample ranks of the bracket keys ``hi`` and ``lo`` (out of range: no bound)."""
    q = k / n_total
    r = q * n_samples
    margin = 5.0 * math.sqrt(n_samples * q * (1.0 - q)) + 4.0
    return math.floor(r - margin), math.ceil(r + margin) + 1


def candidate_capacity(n_total: int, n_samples: int, rank_hi: int, rank_lo: int, floor: int, ceiling: int) -> int:
    """Candidate buffer size for a bracket: the keys expected strictly inside it (its sample ranks
    times N / S) plus a quarter, within ``[floor, ceiling]`` and at most N. The count grows like
    ``10 N sqrt(q (1 - q) / S)``: a fixed buffer would overflow (and fall back) on billion-value models."""
    span = max(0, min(rank_lo, n_samples + 1) - max(rank_hi, 0) - 1)
    expected = span * -(-n_total // n_samples)
    return min(n_total, max(floor, min(ceiling, expected + expected // 4)))


def select_mask(plan: MaskedPlan, scores: Sequence[torch.Tensor], k: int, square: bool, mask_bytes: int,
                sample_size: int, capacity: int, max_capacity: int, parallel: bool = False):
    """Packed mask of the ``k`` (1 <= k <= N) largest keys, with the per-chunk prefix counts and the
    per-group totals of the mask; ``None`` if the sampled bracket missed (the caller falls back).

    ``parallel``: find the bracket and the threshold among the candidates with :mod:`.radix` (10 more
    launches, each over many programs) instead of one program each (one SM)."""
    device = plan.device
    dtype = scores[0].dtype
    n_chunks = plan.n_chunks
    score_ptrs = pointer_table(scores, device)
    n_total = plan.n_total
    if n_total <= min(capacity, sample_size):  # as few keys as a sample: all are candidates, no sampling
        n_samples, rank_hi, rank_lo = 0, 0, 1
        cap = n_total
    else:
        n_samples = min(sample_size, n_total)
        rank_hi, rank_lo = bracket_ranks(n_total, k, n_samples)
        cap = candidate_capacity(n_total, n_samples, rank_hi, rank_lo, capacity, max(capacity, max_capacity))
    sample = torch.empty(max(n_samples, 1), dtype=torch.int32, device=device)
    params = torch.empty(4, dtype=torch.int32, device=device)
    info = torch.empty(2 + N_GROUPS, dtype=torch.int64, device=device)
    counts = torch.empty(3 * n_chunks, dtype=torch.int32, device=device)
    cand = torch.empty(max(cap, 1), dtype=torch.int32, device=device)
    quota = torch.empty(n_chunks, dtype=torch.int64, device=device)
    prefix = torch.empty(n_chunks, dtype=torch.int64, device=device)
    bits = torch.empty(mask_bytes, dtype=torch.uint8, device=device)
    tdt = triton_dtype(dtype)
    common = dict(DTYPE=tdt, SQUARE=bool(square), BLOCK=CHUNK)
    if parallel:
        hist = torch.zeros(3 * PASSES * 256, dtype=torch.int32, device=device)  # bracket: 2 x 4 passes; candidates: 4
        bracket_hist, cand_hist = hist[: 2 * PASSES * 256], hist[2 * PASSES * 256 :]
        rows = [int(rank_hi >= 1), rank_hi, _I32_MIN, _I32_MAX, int(rank_lo <= n_samples), rank_lo, _I32_MIN, _I32_MAX]
        bracket_sel = upload(torch.tensor(rows + [n_samples], dtype=torch.int64), device)
        cand_sel = torch.empty(5, dtype=torch.int64, device=device)
    if n_samples:
        _sample_kernel[(triton.cdiv(n_samples, CHUNK),)](
            score_ptrs, plan.elem_offsets, plan.n_tensors, n_total, n_samples, plan.n_search, sample, **common,
            num_warps=16)
    if parallel:
        if n_samples:
            launch_passes(sample, bracket_sel[8:], bracket_sel, bracket_hist, 2, plan.radix_grid(n_samples), CHUNK)
        _bracket_finish_kernel[(1,)](bracket_sel, bracket_hist, params, info)
    else:
        _bracket_kernel[(1,)](sample, n_samples, rank_hi, rank_lo, params, info, BLOCK=CHUNK, num_warps=16)
    grid = (n_chunks,)
    _count_kernel[grid](score_ptrs, plan.numels, plan.chunk_slot, plan.chunk_start, params, counts, n_chunks,
                        cand, info, cap, **common, num_warps=8)
    if parallel:
        _resolve_pre_kernel[(1,)](counts, n_chunks, info, cap, params, k, cand_sel, BLOCK=CHUNK, num_warps=16)
        launch_passes(cand, cand_sel[4:], cand_sel, cand_hist, 1, plan.radix_grid(cap), CHUNK)
        _candidate_finish_kernel[(1,)](cand_sel, cand_hist, params)
    else:
        _resolve_kernel[(1,)](counts, n_chunks, cand, info, cap, params, k, BLOCK=CHUNK, num_warps=16)
    _write_kernel[grid](score_ptrs, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start, params,
                        counts, n_chunks, bits, **common, num_warps=8)
    _scan_kernel[(1,)](counts, n_chunks, plan.chunk_group, k, quota, prefix, info, BLOCK=_SCAN_BLOCK,
                       N_GROUPS=N_GROUPS, num_warps=8)
    _fixup_kernel[grid](score_ptrs, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start, params,
                        quota, bits, **common, num_warps=8)
    host = info.tolist()  # the one synchronisation: status and the saved-buffer sizes
    if host[1] != 1:
        return None
    return bits, prefix, tuple(host[2:])


def mask_prefix_counts(plan: MaskedPlan, bits: torch.Tensor):
    """Per-chunk exclusive prefix counts of an existing mask within each chunk's group, and the
    per-group totals (what :func:`select_mask` returns alongside a mask it built)."""
    device = plan.device
    n_chunks = plan.n_chunks
    counts = torch.empty(2 * n_chunks, dtype=torch.int32, device=device)
    quota = torch.empty(n_chunks, dtype=torch.int64, device=device)
    prefix = torch.empty(n_chunks, dtype=torch.int64, device=device)
    info = torch.zeros(2 + N_GROUPS, dtype=torch.int64, device=device)
    if n_chunks:
        _popcount_kernel[(n_chunks,)](bits, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start,
                                      counts, n_chunks, BLOCK=CHUNK, num_warps=8)
    _scan_kernel[(1,)](counts, n_chunks, plan.chunk_group, 0, quota, prefix, info, BLOCK=_SCAN_BLOCK,
                       N_GROUPS=N_GROUPS, num_warps=8)
    return prefix, tuple(info.tolist()[2:])
