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
from .reductions import _cumsum
from .tables import triton_dtype

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)

# 16 warps (8 elements a thread): the perturbation needs 98 registers a thread there against 172-187 at
# 8 warps, so twice the warps stay resident per SM (compile_check reports both kernels' occupancy).
PERTURB_WARPS = 16


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
def _selection(chunk_slot, chunk_start, numels, mask, bit_offsets, chunk_ref, aux_prefix, dense_total, c,
               BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    """Chunk ``c``'s tensor, its elements, which of them are perturbed, where each of those is saved,
    and whether the chunk is a full block (``ALIGNED``: chunks start at multiples of ``BLOCK``)."""
    slot = tl.load(chunk_slot + c)
    start = tl.load(chunk_start + c)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    n = tl.load(numels + slot)
    inside = offs < n
    bit_base = tl.load(bit_offsets + slot)
    ref = tl.load(chunk_ref + c)
    if bit_base >= 0:  # masked tensor: ref is the chunk's index among all masked chunks
        b = bit_base + offs
        byte = tl.load(mask + (b >> 3), mask=inside, other=0).to(tl.int32)
        sel = inside & (((byte >> (b & 7).to(tl.int32)) & 1) != 0)
        base = dense_total + tl.load(aux_prefix + ref)
    else:  # dense tensor: ref is the chunk's offset in the saved buffer
        sel = inside
        base = ref
    sel_i = sel.to(tl.int32)
    return slot, offs, sel, base + _cumsum(sel_i, 0) - sel_i, start + BLOCK <= n


@triton.jit
def _perturb_kernel(w_ptrs, g_ptrs, numels, bit_offsets, rhos, adaptive, chunk_slot, chunk_start, chunk_ref,
                    mask, aux_prefix, dense_total, saved, norm_ptr, applied, eps,
                    W_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    c = tl.program_id(0)
    norm = tl.load(norm_ptr)
    finite = (norm - norm) == 0  # false for inf and nan
    if c == 0:
        tl.store(applied, finite.to(tl.int32))
    if finite:
        slot, offs, sel, pos, full = _selection(chunk_slot, chunk_start, numels, mask, bit_offsets, chunk_ref,
                                                aux_prefix, dense_total, c, BLOCK, ALIGNED)
        wp = tl.load(w_ptrs + slot).to(tl.pointer_type(W_DTYPE))
        gp = tl.load(g_ptrs + slot).to(tl.pointer_type(G_DTYPE))
        if ALIGNED:  # every tensor starts on 16 bytes (checked on the host), every chunk on BLOCK elements
            wp = tl.multiple_of(wp, 16)
            gp = tl.multiple_of(gp, 16)
        if ALIGNED and full:
            # a full block: whole-block 128-bit loads (a sparse selection touches most sectors anyway)
            w_raw = tl.load(wp + offs)
            g = tl.load(gp + offs).to(tl.float32)
        else:
            w_raw = tl.load(wp + offs, mask=sel, other=0.0)
            g = tl.load(gp + offs, mask=sel, other=0.0).to(tl.float32)
        w = w_raw.to(tl.float32)
        # davda54/sam's rounding, as the reference: a correctly rounded 1 / (norm + eps), times rho
        scale = tl.div_rn(1.0, norm + eps) * tl.load(rhos + slot)
        # every product rounds on its own: the launch disables FMA contraction
        if tl.load(adaptive + slot) != 0:
            e = ((w * w) * g) * scale
        else:
            e = g * scale
        tl.store(saved + pos, w_raw, mask=sel)
        tl.store(wp + offs, _round_to(w + e, W_DTYPE), mask=sel)


@triton.jit
def _restore_kernel(w_ptrs, numels, bit_offsets, chunk_slot, chunk_start, chunk_ref, mask, aux_prefix,
                    dense_total, saved, applied, W_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    if tl.load(applied) != 0:
        slot, offs, sel, pos, _ = _selection(chunk_slot, chunk_start, numels, mask, bit_offsets, chunk_ref,
                                             aux_prefix, dense_total, c, BLOCK, False)
        wp = tl.load(w_ptrs + slot).to(tl.pointer_type(W_DTYPE))
        tl.store(wp + offs, tl.load(saved + pos, mask=sel), mask=sel)


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
        W_DTYPE=triton_dtype(group.w_dtype), G_DTYPE=triton_dtype(group.g_dtype), BLOCK=CHUNK, ALIGNED=group.aligned,
        num_warps=PERTURB_WARPS, enable_fp_fusion=False,
    )


def restore(group, mask: torch.Tensor, aux_prefix: torch.Tensor, dense_total: int, saved: torch.Tensor,
            applied: torch.Tensor) -> None:
    """Write the group's saved originals back, where :func:`perturb` left ``applied`` set."""
    _restore_kernel[(group.n_chunks,)](
        group.w_ptrs, group.numels, group.bit_offsets, group.chunk_slot, group.chunk_start, group.chunk_ref, mask,
        aux_prefix, dense_total, saved, applied, W_DTYPE=triton_dtype(group.w_dtype), BLOCK=CHUNK,
        num_warps=PERTURB_WARPS,
    )
