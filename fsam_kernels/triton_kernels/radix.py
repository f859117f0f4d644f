"""Order statistics of a device buffer of int32 keys, by a radix select spread over many programs.

:func:`.select._kth_largest` runs a whole radix select in one program, so on one SM: fine for a few
thousand keys, slow for the millions of candidates (or the 2**18 samples) of a large model, since a
256-bin ``tl.histogram`` is several times slower than a streaming read. Here each 8-bit pass is one
launch over a persistent grid: every program histograms its share of the keys that match the
prefix found so far and adds its 256 counts to ``hist[pass]`` with atomics. The prefix is never
stored: each program of a later pass replays the earlier passes' picks from their histograms (a few
hundred integer operations), and so does the caller's finishing kernel (:func:`selected_key`).

Selections live in an int64 table ``sel`` of ``R`` rows ``(active, rank, lo, hi)``: the ``rank``-th
largest (1-based) of the keys, all of which lie in ``[lo, hi]``; inactive rows are skipped. As in
``_kth_largest``, the passes over a digit that ``lo`` and ``hi`` share cost nothing, and keys are
ordered as ``key + 2**31`` (the signed order). ``hist`` (int32, ``4 * R * 256``) must be zero before
the first pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpret_env
from .reductions import _cumsum, _min, _sum

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)

PASSES = 4
SEL_COLUMNS = 4  # active, rank, lo, hi


@triton.jit
def _replay(sel, hist, r, R: tl.constexpr, DONE: tl.constexpr):
    """Prefix (in the unsigned order, as int64) and remaining rank of selection ``r`` after ``DONE`` passes."""
    rank = tl.load(sel + r * 4 + 1)
    lo_u = tl.load(sel + r * 4 + 2) + 2147483648
    hi_u = tl.load(sel + r * 4 + 3) + 2147483648
    prefix = tl.full([], 0, tl.int64)
    bins = tl.arange(0, 256)
    for q in tl.static_range(DONE):
        shift = 24 - 8 * q
        if (lo_u >> shift) == (hi_u >> shift):
            prefix = (lo_u >> shift) << shift
        else:
            h = tl.load(hist + (q * R + r) * 256 + bins).to(tl.int64)
            above = _sum(h, 0) - _cumsum(h, 0)  # keys in higher bins
            b = _min(tl.where(above < rank, bins, 256), 0)
            rank = rank - _sum(tl.where(bins == b, above, 0), 0)
            prefix = prefix + (b.to(tl.int64) << shift)
    return prefix, rank, lo_u, hi_u


@triton.jit
def _radix_hist_kernel(keys, n_ptr, sel, hist, R: tl.constexpr, PASS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass ``PASS`` of every active selection: this program's keys ``pid*BLOCK + j*grid*BLOCK + ...``."""
    pid = tl.program_id(0).to(tl.int64)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    n = tl.load(n_ptr)
    shift = 24 - 8 * PASS
    bins = tl.arange(0, 256)
    for r in tl.static_range(R):
        if tl.load(sel + r * 4) != 0:
            prefix, rank, lo_u, hi_u = _replay(sel, hist, r, R, PASS)
            if (lo_u >> shift) != (hi_u >> shift):
                local = tl.full([256], 0, tl.int32)
                i = pid * BLOCK
                while i < n:
                    offs = i + tl.arange(0, BLOCK)
                    valid = offs < n
                    u = tl.load(keys + offs, mask=valid, other=0).to(tl.int64) + 2147483648
                    match = valid & ((u >> (shift + 8)) == (prefix >> (shift + 8)))
                    local += tl.histogram(((u >> shift) & 255).to(tl.int32), 256, mask=match)
                    i += step
                tl.atomic_add(hist + (PASS * R + r) * 256 + bins, local, mask=local > 0)


@triton.jit
def selected_key(sel, hist, r, R: tl.constexpr):
    """The key selection ``r`` selected, once the four passes have run (int32)."""
    prefix, rank, lo_u, hi_u = _replay(sel, hist, r, R, 4)
    return (prefix - 2147483648).to(tl.int32)


@triton.jit
def _store_selected_kernel(sel, hist, out, R: tl.constexpr):
    """``out[r]`` = the key of every active selection ``r`` (after the passes)."""
    for r in tl.static_range(R):
        if tl.load(sel + r * 4) != 0:
            tl.store(out + r, selected_key(sel, hist, r, R))


def launch_passes(keys, n_ptr, sel, hist, n_rows: int, grid: int, block: int) -> None:
    """The four histogram passes of the ``n_rows`` selections of ``sel`` (no finish)."""
    for p in range(PASSES):
        _radix_hist_kernel[(grid,)](keys, n_ptr, sel, hist, R=n_rows, PASS=p, BLOCK=block, num_warps=8)
