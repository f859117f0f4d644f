"""Masked perturbation ``w <- dtype(fl32(w) + e)`` with compact saved originals, and the exact restore.

Chunk ``c`` of a masked tensor keeps the originals of its selected elements at
``saved[dense_total + prefix[c] + rank]`` (``prefix`` from the mask's per-chunk counts, ``rank`` the
element's rank among the chunk's selected ones); a dense tensor's chunk stores all its elements at a
fixed offset. One saved buffer per weight dtype, sized by the mask's popcount: no dense copy of the
weights. The scale ``(1 / (norm + eps)) * rho`` is computed on the device from the norm tensor; when the
norm is not finite nothing is written, and the restore kernel (which reads the ``applied`` flag the
perturb kernel left) writes nothing back either.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import CHUNK, interpret_env
from .memory import _mask_bits, _on16
from .reductions import _cumsum, _sum
from .tables import triton_dtype

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)

# Launch shape of the perturbation and the restore: PERTURB_WARPS warps, each chunk taken as
# PERTURB_SPLIT sub-blocks of CHUNK / PERTURB_SPLIT elements one after the other (the saved position
# carried from one to the next). ptxas 12.8 (Triton 3.6), sm_90, perturbation: (16 warps, 1 sub-block)
# 102-106 registers, 1 block per SM; (8, 2) 128, 2 blocks of 8 warps; (16, 2) 64-73, 1-2 blocks of 16
# warps (fp32 spills 4 B); (8, 4) 64, 4 blocks of 8 warps; but (16, 2) and (8, 4) give a thread 4
# elements: no 128-bit loads for fp16 / bf16. (8, 2) is the shape with two blocks per SM and 128-bit
# loads for every dtype; which candidate streams fastest is for a GPU to measure (compile_check
# reports each of PERTURB_CANDIDATES).
PERTURB_WARPS = 8
PERTURB_SPLIT = 2
PERTURB_CANDIDATES = ((16, 1), (8, 2), (16, 2), (8, 4))


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even. Spelled out for bfloat16 because the Triton
    interpreter truncates there, and the tests compare its results with torch's bit for bit."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN stays NaN
    else:
        return x.to(DTYPE)


@triton.jit
def _chunk(chunk_slot, chunk_start, numels, bit_offsets, chunk_ref, aux_prefix, dense_total, c, BLOCK: tl.constexpr):
    """Chunk ``c``'s tensor, first element (a multiple of ``BLOCK``), the tensor's size and mask bit
    offset (-1: dense), and where the chunk's first saved original goes."""
    slot = tl.load(chunk_slot + c)
    start = tl.multiple_of(tl.load(chunk_start + c), BLOCK)
    bit_base = tl.load(bit_offsets + slot)
    ref = tl.load(chunk_ref + c)
    if bit_base >= 0:  # masked tensor: ref is the chunk's index among all masked chunks
        base = dense_total + tl.load(aux_prefix + ref)
    else:  # dense tensor: ref is the chunk's offset in the saved buffer
        base = ref
    return slot, start, tl.load(numels + slot), bit_base, base


@triton.jit
def _selection(mask, bit_base, sub_start, n, base, SUB: tl.constexpr):
    """The elements of the sub-block at ``sub_start``, which of them are perturbed, where each of
    those is saved (from ``base`` on), and how many there are."""
    offs = sub_start + tl.arange(0, SUB)
    inside = offs < n
    if bit_base >= 0:
        sel = _mask_bits(mask, bit_base, sub_start, n, SUB)
    else:
        sel = inside
    sel_i = sel.to(tl.int32)
    return offs, sel, base + _cumsum(sel_i, 0) - sel_i, _sum(sel_i, 0)


@triton.jit
def _perturb_kernel(w_ptrs, g_ptrs, numels, bit_offsets, rhos, adaptive, chunk_slot, chunk_start, chunk_ref,
                    mask, aux_prefix, dense_total, saved, norm_ptr, applied, eps,
                    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    c = tl.program_id(0)
    norm = tl.load(norm_ptr)
    finite = (norm - norm) == 0  # false for inf and nan
    if c == 0:
        tl.store(applied, finite.to(tl.int32))
    if finite:
        slot, start, n, bit_base, base = _chunk(chunk_slot, chunk_start, numels, bit_offsets, chunk_ref, aux_prefix,
                                                dense_total, c, BLOCK)
        w_address = tl.load(w_ptrs + slot)
        g_address = tl.load(g_ptrs + slot)
        wp = w_address.to(tl.pointer_type(W_DTYPE))
        gp = g_address.to(tl.pointer_type(G_DTYPE))
        vector = _on16(w_address | g_address)  # this tensor's full sub-blocks load in 128-bit accesses
        # davda54/sam's rounding, as the reference: a correctly rounded 1 / (norm + eps), times rho
        # (0 for a zero norm: an all-zero gradient perturbs by exactly 0)
        scale = tl.where(norm == 0, 0.0, tl.div_rn(1.0, norm + eps) * tl.load(rhos + slot))
        is_adaptive = tl.load(adaptive + slot) != 0
        SUB: tl.constexpr = BLOCK // SPLIT
        for h in tl.static_range(SPLIT):
            offs, sel, pos, count = _selection(mask, bit_base, start + h * SUB, n, base, SUB)
            if vector & (start + (h + 1) * SUB <= n):
                # a full sub-block: whole 128-bit loads (a sparse selection touches most sectors anyway)
                w_raw = tl.load(tl.multiple_of(wp, 16) + offs)
                g = tl.load(tl.multiple_of(gp, 16) + offs).to(tl.float32)
            else:
                w_raw = tl.load(wp + offs, mask=sel, other=0.0)
                g = tl.load(gp + offs, mask=sel, other=0.0).to(tl.float32)
            w = w_raw.to(tl.float32)
            # every product rounds on its own: the launch disables FMA contraction
            if is_adaptive:
                e = ((w * w) * g) * scale
            else:
                e = g * scale
            tl.store(saved + pos, w_raw, mask=sel)
            tl.store(wp + offs, _round_to(w + e, W_DTYPE), mask=sel)
            base += count


@triton.jit
def _restore_kernel(w_ptrs, numels, bit_offsets, chunk_slot, chunk_start, chunk_ref, mask, aux_prefix,
                    dense_total, saved, applied, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    c = tl.program_id(0)
    if tl.load(applied) != 0:
        slot, start, n, bit_base, base = _chunk(chunk_slot, chunk_start, numels, bit_offsets, chunk_ref, aux_prefix,
                                                dense_total, c, BLOCK)
        wp = tl.load(w_ptrs + slot).to(tl.pointer_type(W_DTYPE))
        SUB: tl.constexpr = BLOCK // SPLIT
        for h in tl.static_range(SPLIT):
            offs, sel, pos, count = _selection(mask, bit_base, start + h * SUB, n, base, SUB)
            tl.store(wp + offs, tl.load(saved + pos, mask=sel), mask=sel)
            base += count


# --------------------------------------------------------------------------- launchers
# ``group``: the perturbed tensors of one (weight dtype, gradient dtype) pair and their device tables
# (``backends.triton_backend._Group``); ``mask`` and ``aux_prefix``: the packed mask and its per-chunk
# prefix counts; ``saved``: the group's weight-dtype buffer of originals, dense tensors' first.
def perturb(group, mask: torch.Tensor, aux_prefix: torch.Tensor, dense_total: int, saved: torch.Tensor,
            norm32: torch.Tensor, applied: torch.Tensor, eps: float) -> None:
    """Perturb the group's chunks by ``(1 / (norm32 + eps)) * rho`` times the gradient; ``applied`` gets
    whether the norm was finite (nothing is written otherwise)."""
    _perturb_kernel[(group.n_chunks,)](
        group.w_ptrs, group.g_ptrs, group.numels, group.bit_offsets, group.rhos, group.adaptive, group.chunk_slot,
        group.chunk_start, group.chunk_ref, mask, aux_prefix, dense_total, saved, norm32, applied, float(eps),
        W_DTYPE=triton_dtype(group.w_dtype), G_DTYPE=triton_dtype(group.g_dtype), BLOCK=CHUNK,
        SPLIT=PERTURB_SPLIT, num_warps=PERTURB_WARPS, enable_fp_fusion=False,
    )


def restore(group, mask: torch.Tensor, aux_prefix: torch.Tensor, dense_total: int, saved: torch.Tensor,
            applied: torch.Tensor) -> None:
    """Write the group's saved originals back, where :func:`perturb` left ``applied`` set."""
    _restore_kernel[(group.n_chunks,)](
        group.w_ptrs, group.numels, group.bit_offsets, group.chunk_slot, group.chunk_start, group.chunk_ref, mask,
        aux_prefix, dense_total, saved, applied, W_DTYPE=triton_dtype(group.w_dtype), BLOCK=CHUNK,
        SPLIT=PERTURB_SPLIT, num_warps=PERTURB_WARPS,
    )
