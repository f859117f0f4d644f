"""N:M structured mask: keep the N largest Fisher keys of every M consecutive elements.

Reference: :func:`fsam_kernels.reference.select_nm_mask_reference`. One launch for all eligible
tensors (per pair of score and support dtypes): each program finds its tensor in a table of program
starts and writes ``BLOCK_BYTES`` whole mask bytes (8 elements each); every element computes its own
rank inside its group by comparing its key with the group's M keys (a loop over the M, read from the
cache), so groups may straddle programs and bytes without any communication.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..layout import ParamLayout
from ..reference import nm_eligible
from .reductions import _sum
from .tables import pointer_table, upload

BLOCK_BYTES = 64  # 512 elements per program: one mask alignment block


def _element_type(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]


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
    score_ptrs,
    support_ptrs,
    numels,
    byte_offsets,
    prog_start,
    n_tensors,
    n_search,
    bits_ptr,
    n,
    M: tl.constexpr,
    SQUARE: tl.constexpr,
    HAS_SUPPORT: tl.constexpr,
    S_DTYPE: tl.constexpr,
    W_DTYPE: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # The tensor of this program: prog_start[slot] <= pid < prog_start[slot + 1] (binary search).
    lo = pid * 0
    hi = lo + n_tensors
    it = lo * 0
    while it < n_search:
        mid = (lo + hi) // 2
        go = tl.load(prog_start + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
        it += 1
    numel = tl.load(numels + lo)
    score_ptr = tl.load(score_ptrs + lo).to(tl.pointer_type(S_DTYPE))
    support_ptr = tl.load(support_ptrs + lo).to(tl.pointer_type(W_DTYPE))
    byte = (pid - tl.load(prog_start + lo)) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    # The program's elements as a [bytes, 8] tile (bit b of byte j: element 8 j + b): each loads its own
    # key once, then the group's M keys one at a time in a loop that is not unrolled (a few registers
    # per element however large M: no spill), and the chosen bits are packed with shifts and a sum.
    bit = tl.arange(0, 8)
    elem = byte[:, None] * 8 + bit[None, :]
    inside = elem < numel
    group = (elem // M) * M
    pos = elem - group
    own = _key(score_ptr, support_ptr, elem, inside, SQUARE, HAS_SUPPORT)
    beaten = (pos * 0).to(tl.int32)
    for q in range(M):
        other = _key(score_ptr, support_ptr, group + q, inside, SQUARE, HAS_SUPPORT)
        # The lower index wins a tie.
        beats = (other > own) | ((other == own) & (pos > q))
        beaten += beats.to(tl.int32)
    chosen = inside & (beaten < n)
    if HAS_SUPPORT:
        w = tl.load(support_ptr + elem, mask=inside, other=0.0)
        chosen = chosen & (w != 0)
    packed = _sum(chosen.to(tl.int32) << bit[None, :], 1)
    tl.store(bits_ptr + tl.load(byte_offsets + lo) + byte, packed.to(tl.uint8), mask=byte * 8 < numel)

def select_nm_mask(
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    n: int,
    m: int,
    square: bool,
    support: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Packed N:M mask, bit-identical to the reference, of arguments the backend checked
    (:func:`fsam_kernels.reference.check_nm_args`). Tensors must be contiguous, on one device."""
    bits = layout.empty_mask()
    groups: dict[tuple, list[int]] = {}  # (score dtype, support dtype) -> masked positions: one launch each
    for j, i in enumerate(layout.masked_index):
        if layout.numel[i] == 0 or not nm_eligible(layout.params[i].shape, m):
            continue
        score = scores[j]
        sup = None if support is None else support[j]
        for name, t in (("scores", score), ("support", sup)):
            if t is not None and (not t.is_contiguous() or t.device != bits.device):
                raise ValueError(f"select_nm_mask: expected {name}[{j}] contiguous on {bits.device}, got {t.device}")
        groups.setdefault((score.dtype, None if sup is None else sup.dtype), []).append(j)
    device = bits.device
    for (s_dtype, w_dtype), js in groups.items():
        numels = [layout.numel[layout.masked_index[j]] for j in js]
        prog_start = [0, *itertools.accumulate(triton.cdiv(triton.cdiv(x, 8), BLOCK_BYTES) for x in numels)]
        score_list = [scores[j].detach() for j in js]
        support_list = score_list if support is None else [support[j].detach() for j in js]
        _nm_mask_kernel[(prog_start[-1],)](
            pointer_table(score_list, device),
            pointer_table(support_list, device),
            upload(torch.tensor(numels, dtype=torch.int64), device),
            upload(torch.tensor([layout.bit_offset[j] // 8 for j in js], dtype=torch.int64), device),
            upload(torch.tensor(prog_start, dtype=torch.int64), device),
            len(js),
            max(1, math.ceil(math.log2(len(js)))) + 1,
            bits,
            n,
            M=m,
            SQUARE=bool(square),
            HAS_SUPPORT=support is not None,
            S_DTYPE=_element_type(s_dtype),
            W_DTYPE=_element_type(s_dtype if w_dtype is None else w_dtype),
            BLOCK_BYTES=BLOCK_BYTES,
        )
    return bits
