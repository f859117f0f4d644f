"""N:M structured mask: keep the N largest Fisher keys of every M consecutive elements.

Reference: :func:`fsam_kernels.structured.select_nm_mask_reference`. One launch per eligible tensor
(the op runs only when the mask is rebuilt). Each program writes ``BLOCK_BYTES`` whole mask bytes
(8 elements each); every element computes its own rank inside its group by comparing its key with the
group's M keys, so groups may straddle programs and bytes without any communication.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..layout import ParamLayout
from ..structured import _check_nm_op, nm_eligible

BLOCK_BYTES = 64  # 512 elements per program: one mask alignment block


@triton.jit
def _key(score_ptr, support_ptr, idx, inside, SQUARE: tl.constexpr, HAS_SUPPORT: tl.constexpr):
    f = tl.load(score_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    if SQUARE:
        f = f * f
    key = f.to(tl.int32, bitcast=True)
    if HAS_SUPPORT:
        w = tl.load(support_ptr + idx, mask=inside, other=0.0)
        key = tl.where(w != 0, key, -1)  # zeros rank below every score
    return key


@triton.jit
def _nm_mask_kernel(
    score_ptr,
    support_ptr,
    bits_ptr,
    numel,
    n,
    M: tl.constexpr,
    SQUARE: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    # Plain element-wise ops only (no tl.zeros / tl.sum): the kernel then also runs in the interpreter
    # when Triton itself was imported before TRITON_INTERPRET=1 was set.
    packed = (byte * 0).to(tl.int32)
    for bit in tl.static_range(8):
        elem = byte * 8 + bit
        inside = elem < numel
        group = (elem // M) * M
        pos = elem - group
        own = _key(score_ptr, support_ptr, elem, inside, SQUARE, HAS_SUPPORT)
        beaten = (pos * 0).to(tl.int32)
        for q in tl.static_range(M):
            other = _key(score_ptr, support_ptr, group + q, inside, SQUARE, HAS_SUPPORT)
            # The lower index wins a tie.
            beats = (other > own) | ((other == own) & (pos > q))
            beaten += beats.to(tl.int32)
        chosen = inside & (beaten < n)
        if HAS_SUPPORT:
            w = tl.load(support_ptr + elem, mask=inside, other=0.0)
            chosen = chosen & (w != 0)
        packed = packed | (chosen.to(tl.int32) << bit)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte * 8 < numel)


def select_nm_mask(
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    n: int,
    m: int,
    square: bool,
    support: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Packed N:M mask, bit-identical to the reference. Tensors must be contiguous, on one device."""
    _check_nm_op("select_nm_mask", layout, scores, n, m, support)
    bits = layout.empty_mask()
    for j, i in enumerate(layout.masked_index):
        numel = layout.numel[i]
        if numel == 0 or not nm_eligible(layout.params[i].shape, m):
            continue
        score = scores[j].detach()
        sup = None if support is None else support[j].detach()
        for name, t in (("scores", score), ("support", sup)):
            if t is not None and (not t.is_contiguous() or t.device != bits.device):
                raise ValueError(f"select_nm_mask: expected {name}[{j}] contiguous on {bits.device}, got {t.device}")
        out = bits[layout.bit_offset[j] // 8 :]
        grid = (triton.cdiv(triton.cdiv(numel, 8), BLOCK_BYTES),)
        _nm_mask_kernel[grid](
            score,
            score if sup is None else sup,
            out,
            numel,
            n,
            M=m,
            SQUARE=bool(square),
            HAS_SUPPORT=sup is not None,
            BLOCK_BYTES=BLOCK_BYTES,
        )
    return bits
