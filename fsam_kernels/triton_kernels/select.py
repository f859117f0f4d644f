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

Exact whatever the data and the size, and never through the reference: ties at ``lo``/``hi`` are
counted, never compacted, so the candidate buffer is bounded by the sample's rank spacing; if the
bracket misses the k-th key (a > 5-sigma sample) or the candidates overflow the buffer, the resolve
step writes a repair row (rank, key range) and sets a flag. The host reads the flag at its one
synchronisation; then four radix passes over the scores themselves (``_repair_pass_kernel``, a
persistent grid, 256 int64 bins per program, no other memory) find ``T`` in that range and the
mask is written again: exact in a few more streaming reads. Seven launches (six when N fits the
candidate buffer: no sampling), one host synchronisation (repair flag and buffer sizes).
Sizes and the memory bound (64 MiB + N / 64 bytes) come from :mod:`.select_plan`; counts and
offsets that can pass 2**31 are int64 (int32 only for counts within one 4096-element chunk).

The parallel variant (``SelectPlan.parallel``, what the backend uses for large models): steps 2 and
4 run as four radix passes each over a persistent grid (:mod:`.radix`) with small finishing
kernels, since one program (one SM) takes milliseconds over millions of candidates at 256-bin
``tl.histogram`` speed; the count totals are summed by torch and the scan runs over blocks of
chunks in three launches (``_scan_sums_kernel``, ``_scan_carry_kernel``, ``_scan_chunks_kernel``)
instead of one program's loop over all N / 4096 chunks. Nineteen launches instead of seven.

Where the time should go on a GPU (to be measured): the count and write passes stream all keys
once each; the two single-program stages cost ~8 histogram passes over the sample and up to 4 over
the candidates (fewer when ``lo`` and ``hi`` share their leading bytes), which is what the sample
size and the candidate capacity trade against each other.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from . import CHUNK, N_GROUPS, interpret_env
from .radix import PASSES, _replay, _store_selected_kernel, launch_passes, selected_key
from .reductions import _cumsum, _min, _sum
from .select_plan import SelectPlan
from .memory import _mask_bits, _on16
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
    """Chunk ``c``'s keys (a full block of a tensor on 16 bytes loads without a bounds mask, in 128-bit
    accesses)."""
    slot = tl.load(chunk_slot + c)
    start = tl.multiple_of(tl.load(chunk_start + c), BLOCK)
    n = tl.load(numels + slot)
    address = tl.load(score_ptrs + slot)
    src = address.to(tl.pointer_type(DTYPE))
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    if _on16(address) & (start + BLOCK <= n):
        key = _key(tl.load(tl.multiple_of(src, 16) + offs), SQUARE)
    else:
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
    # pos = ((2s + 1) N) // (2S), the middle of the s-th of S equal slices, without forming (2s + 1) N
    # (2**63 and more at 2**36 values): with N = qS + r and a = (2s + 1) q, it is a // 2 + ((a % 2) S
    # + (2s + 1) r) // (2S), whose terms stay below 2N + 2S**2.
    a = (2 * s + 1) * (n_total // n_samples)
    pos = a // 2 + ((a % 2) * n_samples + (2 * s + 1) * (n_total % n_samples)) // (2 * n_samples)
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
def _chunk_totals(counts, n_chunks, BLOCK: tl.constexpr):
    """Keys ``> hi``, ``== hi`` and ``== lo`` over all chunks, summed by one program (small models)."""
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
    return n_gt, n_hi, n_lo


@triton.jit
def _threshold_case(n_gt, n_hi, n_lo, info, capacity, params, k, repair):
    """From the count pass's totals: the threshold when it is a bracket key (``t``), or ``inside``
    when it lies strictly between them (its rank among the candidates is ``rank``). When the bracket
    missed the k-th key or the candidates overflowed, ``info[1]`` = 1 and ``repair`` gets the
    selection row (active, rank, lo, hi) that radix passes over the scores finish exactly."""
    n_inner = tl.load(info + 0)
    lo = tl.load(params + 0)
    hi = tl.load(params + 1)
    k = tl.full([], 0, tl.int64) + k  # a tensor even when the launcher specialised it
    above = n_gt + n_hi
    t = hi
    inside = tl.full([], 0, tl.int64)
    active = tl.full([], 0, tl.int64)
    rank = k
    bound_lo = tl.full([], -2147483648, tl.int64)
    bound_hi = tl.full([], 2147483647, tl.int64)
    if k <= n_gt:  # above the bracket
        active = tl.full([], 1, tl.int64)
        bound_lo = hi.to(tl.int64) + 1
    elif k <= above:
        t = hi
    elif k <= above + n_inner:
        if n_inner <= capacity:
            inside = tl.full([], 1, tl.int64)
        else:  # inside, but not every candidate was kept
            active = tl.full([], 1, tl.int64)
            rank = k - above
            bound_lo = lo.to(tl.int64) + 1
            bound_hi = hi.to(tl.int64) - 1
    elif k <= above + n_inner + n_lo:
        t = lo
    else:  # below the bracket
        active = tl.full([], 1, tl.int64)
        rank = k - above - n_inner - n_lo
        bound_hi = lo.to(tl.int64) - 1
    tl.store(repair + 0, active)
    tl.store(repair + 1, rank)
    tl.store(repair + 2, bound_lo)
    tl.store(repair + 3, bound_hi)
    tl.store(info + 1, active)
    return t, inside, k - above, n_inner, lo, hi


@triton.jit
def _resolve_kernel(counts, n_chunks, cand, info, capacity, params, k, sel, BLOCK: tl.constexpr):
    """One program: the threshold into ``params[2]``, or the repair row into ``sel[0:4]``."""
    n_gt, n_hi, n_lo = _chunk_totals(counts, n_chunks, BLOCK)
    t, inside, rank, n_inner, lo, hi = _threshold_case(n_gt, n_hi, n_lo, info, capacity, params, k, sel)
    if inside != 0:
        t = _kth_largest(cand, n_inner, rank, lo, hi, BLOCK)
    tl.store(params + 2, t)


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
def _resolve_pre_kernel(totals, info, capacity, params, k, sel):
    """As ``_resolve_kernel`` from the totals of the count pass (summed by torch over many programs),
    except that a threshold strictly inside the bracket is left to the parallel radix select over
    the candidates: its selection row (active, rank, lo, hi) goes to ``sel[0:4]`` and the number of
    candidates to ``sel[4]``; the repair row goes to ``sel[5:9]``."""
    t, inside, rank, n_inner, lo, hi = _threshold_case(tl.load(totals + 0), tl.load(totals + 1),
                                                       tl.load(totals + 2), info, capacity, params, k, sel + 5)
    tl.store(sel + 0, inside)
    tl.store(sel + 1, rank)
    tl.store(sel + 2, lo.to(tl.int64))
    tl.store(sel + 3, hi.to(tl.int64))
    tl.store(sel + 4, tl.minimum(n_inner, capacity))  # how many candidates the passes read
    tl.store(params + 2, t)


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
    sel = _mask_bits(mask, tl.load(bit_offsets + slot), start, n, BLOCK)
    tl.store(counts + c, _sum(sel.to(tl.int32), 0))
    tl.store(counts + n_chunks + c, 0)


# ----------------------------------------------------------------------------- the repair
@triton.jit
def _repair_pass_kernel(score_ptrs, numels, chunk_slot, chunk_start, n_chunks, sel, hist, PASS: tl.constexpr,
                        DTYPE: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass ``PASS`` of the radix select of the row ``sel`` (active, rank, lo, hi) over the scores
    themselves: the keys in ``[lo, hi]`` under the prefix so far, histogrammed by a persistent grid
    (one int64 flush per program), as :mod:`.radix` does over a buffer. No memory beyond ``hist``."""
    if tl.load(sel + 0) != 0:
        prefix, rank, lo_u, hi_u = _replay(sel, hist, 0, 1, PASS)
        shift = 24 - 8 * PASS
        if (lo_u >> shift) != (hi_u >> shift):
            local = tl.full([256], 0, tl.int64)
            c = tl.program_id(0)
            while c < n_chunks:
                slot, start, n, inside, key = _load_keys(score_ptrs, numels, chunk_slot, chunk_start, c, DTYPE,
                                                         SQUARE, BLOCK)
                u = key.to(tl.int64) + 2147483648
                match = inside & (u >= lo_u) & (u <= hi_u) & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
                local += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match).to(tl.int64)
                c += tl.num_programs(0)
            bins = tl.arange(0, 256)
            tl.atomic_add(hist + PASS * 256 + bins, local, mask=local > 0)


# ----------------------------------------------------------------------------- multi-program scan
# What ``_scan_kernel`` does in one program, for large models, over blocks of ``BLOCK`` chunks:
# per-block sums (many programs), the block carries (one program, over N / (4096 BLOCK) blocks),
# then every block's chunks (many programs). ``sums``: the per-group sums of the keys > T
# (rows 0..G-1) and == T (rows G..2G-1) per block; ``carry``: per-group exclusive prefix of the kept
# counts at each block (rows 0..G-1) and the block's tie quota (row G).
@triton.jit
def _chunk_counts(counts, n_chunks, chunk_group, offs):
    """Keys ``> T`` and ``== T`` (int64) and the group of chunks ``offs`` (group -1 past the end)."""
    valid = offs < n_chunks
    gt = tl.load(counts + offs, mask=valid, other=0).to(tl.int64)
    eq = tl.load(counts + n_chunks + offs, mask=valid, other=0).to(tl.int64)
    return gt, eq, tl.load(chunk_group + offs, mask=valid, other=-1)


@triton.jit
def _block_ties(sums, n_blocks, offs, N_GROUPS: tl.constexpr):
    """Keys ``== T`` of blocks ``offs``, all groups together."""
    eq = tl.full(offs.shape, 0, tl.int64)
    for g in tl.static_range(N_GROUPS):
        eq += tl.load(sums + (N_GROUPS + g) * n_blocks + offs, mask=offs < n_blocks, other=0)
    return eq


@triton.jit
def _scan_sums_kernel(counts, n_chunks, chunk_group, sums, n_blocks, BLOCK: tl.constexpr, N_GROUPS: tl.constexpr):
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    gt, eq, grp = _chunk_counts(counts, n_chunks, chunk_group, offs)
    for g in tl.static_range(N_GROUPS):
        tl.store(sums + g * n_blocks + b, _sum(tl.where(grp == g, gt, 0), 0))
        tl.store(sums + (N_GROUPS + g) * n_blocks + b, _sum(tl.where(grp == g, eq, 0), 0))


@triton.jit
def _scan_carry_kernel(counts, n_chunks, chunk_group, sums, n_blocks, k, carry, info, BLOCK: tl.constexpr,
                       N_GROUPS: tl.constexpr):
    lanes = tl.arange(0, BLOCK)
    gids = tl.arange(0, N_GROUPS)
    n_gt = tl.full([], 0, tl.int64)
    i = tl.full([], 0, tl.int64)
    while i < n_blocks:
        offs = i + lanes
        for g in tl.static_range(N_GROUPS):
            n_gt += _sum(tl.load(sums + g * n_blocks + offs, mask=offs < n_blocks, other=0), 0)
        i += BLOCK
    need = k - n_gt  # ties taken, lowest global index first
    # Block tie quotas; at most one block takes only part of its ties (the "partial" one).
    eq_before = tl.full([], 0, tl.int64)
    partial = tl.full([], -1, tl.int64)
    i = tl.full([], 0, tl.int64)
    while i < n_blocks:
        offs = i + lanes
        valid = offs < n_blocks
        eq = _block_ties(sums, n_blocks, offs, N_GROUPS)
        q = tl.minimum(tl.maximum(need - (eq_before + _cumsum(eq, 0) - eq), 0), eq)
        tl.store(carry + N_GROUPS * n_blocks + offs, q, mask=valid)
        partial += _sum(tl.where(valid & (q > 0) & (q < eq), offs + 1, 0), 0)
        eq_before += _sum(eq, 0)
        i += BLOCK
    # The partial block's kept counts per group, from its chunks.
    partial_kept = tl.full([N_GROUPS], 0, tl.int64)
    if partial >= 0:
        quota_b = tl.load(carry + N_GROUPS * n_blocks + partial)
        offs = partial * BLOCK + lanes
        gt, eq, grp = _chunk_counts(counts, n_chunks, chunk_group, offs)
        kept = gt + tl.minimum(tl.maximum(quota_b - (_cumsum(eq, 0) - eq), 0), eq)
        for g in tl.static_range(N_GROUPS):
            partial_kept = tl.where(gids == g, _sum(tl.where(grp == g, kept, 0), 0), partial_kept)
    # Per-group exclusive prefix of the kept counts over blocks.
    carries = tl.full([N_GROUPS], 0, tl.int64)
    i = tl.full([], 0, tl.int64)
    while i < n_blocks:
        offs = i + lanes
        valid = offs < n_blocks
        eq = _block_ties(sums, n_blocks, offs, N_GROUPS)
        full = tl.load(carry + N_GROUPS * n_blocks + offs, mask=valid, other=0) == eq
        for g in tl.static_range(N_GROUPS):
            kept = tl.load(sums + g * n_blocks + offs, mask=valid, other=0)
            kept += tl.where(full, tl.load(sums + (N_GROUPS + g) * n_blocks + offs, mask=valid, other=0), 0)
            kept = tl.where(offs == partial, _sum(tl.where(gids == g, partial_kept, 0), 0), kept)
            kept = tl.where(valid, kept, 0)
            c = _sum(tl.where(gids == g, carries, 0), 0)
            tl.store(carry + g * n_blocks + offs, c + _cumsum(kept, 0) - kept, mask=valid)
            carries = tl.where(gids == g, c + _sum(kept, 0), carries)
        i += BLOCK
    tl.store(info + 2 + gids, carries)


@triton.jit
def _scan_chunks_kernel(counts, n_chunks, chunk_group, carry, n_blocks, quota, prefix, BLOCK: tl.constexpr,
                        N_GROUPS: tl.constexpr):
    b = tl.program_id(0)
    offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_chunks
    gt, eq, grp = _chunk_counts(counts, n_chunks, chunk_group, offs)
    q = tl.minimum(tl.maximum(tl.load(carry + N_GROUPS * n_blocks + b) - (_cumsum(eq, 0) - eq), 0), eq)
    tl.store(quota + offs, q, mask=valid)
    kept = gt + q
    pre = tl.full([BLOCK], 0, tl.int64)
    for g in tl.static_range(N_GROUPS):
        v = tl.where(grp == g, kept, 0)
        pre = tl.where(grp == g, tl.load(carry + g * n_blocks + b) + _cumsum(v, 0) - v, pre)
    tl.store(prefix + offs, pre, mask=valid)


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


def _launch_scan(plan: MaskedPlan, counts, k: int, quota, prefix, info, scan_block: int, parallel: bool) -> None:
    """Tie quotas and per-group prefix counts from the per-chunk counts ``> T`` / ``== T``: one
    program for small models, three launches over blocks of ``scan_block`` chunks for large ones."""
    n_chunks = plan.n_chunks
    if not parallel:
        _scan_kernel[(1,)](counts, n_chunks, plan.chunk_group, k, quota, prefix, info, BLOCK=_SCAN_BLOCK,
                           N_GROUPS=N_GROUPS, num_warps=8)
        return
    n_blocks = triton.cdiv(n_chunks, scan_block)
    sums = torch.empty(2 * N_GROUPS * n_blocks, dtype=torch.int64, device=plan.device)
    carry = torch.empty((N_GROUPS + 1) * n_blocks, dtype=torch.int64, device=plan.device)
    shape = dict(BLOCK=scan_block, N_GROUPS=N_GROUPS, num_warps=8)
    _scan_sums_kernel[(n_blocks,)](counts, n_chunks, plan.chunk_group, sums, n_blocks, **shape)
    _scan_carry_kernel[(1,)](counts, n_chunks, plan.chunk_group, sums, n_blocks, k, carry, info, **shape)
    _scan_chunks_kernel[(n_blocks,)](counts, n_chunks, plan.chunk_group, carry, n_blocks, quota, prefix, **shape)


def select_mask(plan: MaskedPlan, scores: Sequence[torch.Tensor], k: int, square: bool, mask_bytes: int,
                sp: SelectPlan):
    """Packed mask of the ``k`` (1 <= k <= N) largest keys, with the per-chunk prefix counts, the
    per-group totals of the mask, and whether the bracket had to be repaired; exact on every path.

    ``sp`` (:func:`.select_plan.plan_select`) gives the sample and buffer sizes; ``sp.parallel``:
    find the bracket, the threshold among the candidates and the scan with many programs each
    (:mod:`.radix`, :func:`_launch_scan`) instead of one program each (one SM)."""
    device = plan.device
    n_chunks = plan.n_chunks
    score_ptrs = pointer_table(scores, device)
    n_total, n_samples, cap, parallel = plan.n_total, sp.n_samples, sp.capacity, sp.parallel
    sample = torch.empty(max(n_samples, 1), dtype=torch.int32, device=device)
    params = torch.empty(4, dtype=torch.int32, device=device)
    info = torch.empty(2 + N_GROUPS, dtype=torch.int64, device=device)  # every field written before it is read
    counts = torch.empty(3 * n_chunks, dtype=torch.int32, device=device)
    cand = torch.empty(max(cap, 1), dtype=torch.int32, device=device)
    quota = torch.empty(n_chunks, dtype=torch.int64, device=device)
    prefix = torch.empty(n_chunks, dtype=torch.int64, device=device)
    bits = torch.empty(mask_bytes, dtype=torch.uint8, device=device)
    # rows: the candidates' selection (active, rank, lo, hi), their count, the repair's selection
    sel = torch.empty(9, dtype=torch.int64, device=device)  # written by the resolve kernel
    cand_sel, repair_sel = sel[:5], sel[5:]
    common = dict(DTYPE=triton_dtype(scores[0].dtype), SQUARE=bool(square), BLOCK=CHUNK)
    if parallel:
        hist = torch.zeros(3 * PASSES * 256, dtype=torch.int32, device=device)  # bracket: 2 x 4 passes; candidates: 4
        bracket_hist, cand_hist = hist[: 2 * PASSES * 256], hist[2 * PASSES * 256 :]
        rows = [int(sp.rank_hi >= 1), sp.rank_hi, _I32_MIN, _I32_MAX, int(sp.rank_lo <= n_samples), sp.rank_lo,
                _I32_MIN, _I32_MAX]
        bracket_sel = upload(torch.tensor(rows + [n_samples], dtype=torch.int64), device)
    if n_samples:
        _sample_kernel[(triton.cdiv(n_samples, CHUNK),)](
            score_ptrs, plan.elem_offsets, plan.n_tensors, n_total, n_samples, plan.n_search, sample, **common,
            num_warps=16)
    if parallel:
        if n_samples:
            launch_passes(sample, bracket_sel[8:], bracket_sel, bracket_hist, 2, plan.radix_grid(n_samples), CHUNK)
        _bracket_finish_kernel[(1,)](bracket_sel, bracket_hist, params, info)
    else:
        _bracket_kernel[(1,)](sample, n_samples, sp.rank_hi, sp.rank_lo, params, info, BLOCK=CHUNK, num_warps=16)
    grid = (n_chunks,)
    _count_kernel[grid](score_ptrs, plan.numels, plan.chunk_slot, plan.chunk_start, params, counts, n_chunks,
                        cand, info, cap, **common, num_warps=8)
    if parallel:
        totals = counts.view(3, n_chunks).sum(1, dtype=torch.int64)
        _resolve_pre_kernel[(1,)](totals, info, cap, params, k, sel, num_warps=4)
        launch_passes(cand, cand_sel[4:], cand_sel, cand_hist, 1, plan.radix_grid(cap), CHUNK)
        _candidate_finish_kernel[(1,)](cand_sel, cand_hist, params)
    else:
        _resolve_kernel[(1,)](counts, n_chunks, cand, info, cap, params, k, repair_sel, BLOCK=CHUNK, num_warps=16)

    def write() -> list[int]:
        _write_kernel[grid](score_ptrs, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start, params,
                            counts, n_chunks, bits, **common, num_warps=8)
        _launch_scan(plan, counts, k, quota, prefix, info, sp.scan_block, parallel)
        _fixup_kernel[grid](score_ptrs, plan.numels, plan.bit_offsets, plan.chunk_slot, plan.chunk_start, params,
                            quota, bits, **common, num_warps=8)
        return info.tolist()  # the synchronisation: repair flag and the saved-buffer sizes

    host = write()
    repaired = host[1] != 0
    if repaired:
        # The bracket missed the k-th key or the candidates overflowed (rare: a 5-sigma bracket, a
        # buffer sized for its expected count): radix passes over the scores find the threshold
        # among the keys of the repair row's range, and the mask is written again.
        repair_hist = torch.zeros(PASSES * 256, dtype=torch.int64, device=device)
        for p in range(PASSES):
            _repair_pass_kernel[(plan.radix_grid(n_total),)](
                score_ptrs, plan.numels, plan.chunk_slot, plan.chunk_start, n_chunks, repair_sel, repair_hist,
                PASS=p, **common, num_warps=8)
        _store_selected_kernel[(1,)](repair_sel, repair_hist, params[2:], R=1)
        host = write()
    return bits, prefix, tuple(host[2:]), repaired


def mask_prefix_counts(plan: MaskedPlan, bits: torch.Tensor, scan_block: int, parallel: bool):
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
        _launch_scan(plan, counts, 0, quota, prefix, info, scan_block, parallel)
    return prefix, tuple(info.tolist()[2:])
