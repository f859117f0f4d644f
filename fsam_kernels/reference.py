"""Pure-PyTorch reference of every FSAM op.

These functions define the semantics. They are the CPU fallback (the ``"torch"`` backend), the oracle
every kernel backend is tested against, and the baseline of the benchmarks. They favour clarity over
speed; nothing here is allowed to be clever.

Exact definitions (what "bit-for-bit" means for the other backends):

* Fisher score of an element: ``F = fl32(g) * fl32(g)`` (one fp32 rounding) in ``fisher="batch"``
  mode, the fp32 accumulator value in ``fisher="empirical"`` mode. Scores are non-negative, so they
  order like their int32 bit patterns; that bit pattern is the selection key.
* Fisher accumulation: ``F <- F + fl32(g * g)`` (two roundings, no fused multiply-add).
* Mask: exactly ``k`` elements; every selected key >= every unselected key; among equal keys at the
  threshold the lowest global bit index (see :mod:`fsam_kernels.layout`) wins.
* Dtypes: a tensor's *compute dtype* is fp64 when its weight or gradient is fp64, else fp32. The
  *norm dtype* is fp64 when any perturbed tensor with a gradient computes in fp64, else fp32. So fp64
  models get davda54/sam's fp64 arithmetic; fp32/bf16/fp16 ones its fp32 arithmetic (bf16/fp16
  rounded once at the end, where davda54/sam computes in the parameter dtype).
* Gradient norm: ``||(||a_i * g_i||_2 for each tensor i)||_2`` (davda54/sam's order, each inner norm in
  its compute dtype, the outer one in the norm dtype) with ``a_i = |w_i|`` for adaptive groups, else 1.
  It must not overflow where the exact norm fits the norm dtype: when that fp32 arithmetic overflows,
  the value is ``fl(sqrt(S))`` with ``S`` the sum of squares taken element by element in fp64: finite
  for any finite fp32/bf16/fp16 input (the largest square, ASAM's ``(|w| * g)**2``, is about
  ``(3.4e38)**4 ~ 1.3e154``; fp64 holds 1.8e308). Backends may sum in another order
  (within tolerance).
* **Skip rule** (every backend takes the same decision): nothing is perturbed when
  ``fl(sqrt(S))`` in the norm dtype is not finite, that is when a gradient (or, for ASAM, ``|w| * g``)
  is inf/NaN, or the norm exceeds the norm dtype's largest value (3.4e38 for fp32), or, for fp64,
  ``S`` overflows (elements beyond ~1.3e154). ``S`` is a sum of non-negative terms, so no summation
  order overflows before another; decisions can differ only for a norm within rounding of that
  largest value.
* Perturbation: ``scale = fl(1 / (norm + eps)) * fl(rho_i)`` in the norm dtype (davda54/sam's
  rounding; ``scale = 0`` when ``norm == 0``, so an all-zero gradient perturbs by exactly 0), rounded to the tensor's compute dtype; ``e = g * scale``, or ``e = ((w*w) * g) * scale``
  for adaptive groups (ASAM), in the compute dtype; ``w <- dtype(w + e)`` on the masked (or dense)
  elements.
* Restore: the saved original values are written back; bit-exact by construction.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .layout import ParamLayout

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_bit_weights_on: dict = {}  # per device: a copy to a GPU made at every call would wait for the device


def _bit_weights(device: torch.device) -> torch.Tensor:
    w = _bit_weights_on.get(device)
    if w is None:
        w = _bit_weights_on[device] = _BIT_WEIGHTS.to(device)
    return w


# --------------------------------------------------------------------------- mask packing
def pack_bits(flat_bools: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool tensor (length a multiple of 8) into uint8, least significant bit first."""
    w = _bit_weights(flat_bools.device)
    return (flat_bools.view(-1, 8).to(torch.uint8) * w).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, start_bit: int, count: int) -> torch.Tensor:
    """Bits ``[start_bit, start_bit + count)`` of a packed buffer as a 1-D bool tensor."""
    first, last = start_bit // 8, (start_bit + count + 7) // 8
    chunk = bits[first:last]
    w = _bit_weights(bits.device)
    flat = (chunk.unsqueeze(1) & w).ne(0).reshape(-1)
    s = start_bit - first * 8
    return flat[s : s + count]


def mask_of(layout: ParamLayout, bits: torch.Tensor, j: int) -> torch.Tensor:
    """Bool mask (flat) of the ``j``-th masked tensor."""
    i = layout.masked_index[j]
    return unpack_bits(bits, layout.bit_offset[j], layout.numel[i])


def unpack_mask(layout: ParamLayout, bits: torch.Tensor) -> list[torch.Tensor]:
    """Bool masks shaped like the masked parameters, in param_group order."""
    return [
        mask_of(layout, bits, j).view(layout.params[i].shape)
        for j, i in enumerate(layout.masked_index)
    ]


def pack_mask(layout: ParamLayout, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`unpack_mask`: bool masks (one per masked tensor) to the packed buffer."""
    flat = torch.zeros(layout.mask_bytes * 8, dtype=torch.bool, device=layout.device)
    for j, m in enumerate(masks):
        o = layout.bit_offset[j]
        flat[o : o + m.numel()] = m.reshape(-1).to(device=flat.device, dtype=torch.bool)
    return pack_bits(flat)


def mask_popcount(bits: torch.Tensor) -> int:
    w = _bit_weights(bits.device)
    return int((bits.unsqueeze(1) & w).ne(0).sum())


# --------------------------------------------------------------------------- Fisher
def fisher_accumulate_reference(accum: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """``accum[i] += fl32(g_i * g_i)`` with fp32 accumulators, whatever the gradient dtype."""
    for a, g in zip(accum, grads):
        g32 = g.float()
        a.add_(g32 * g32)


def fisher_key(score: torch.Tensor, scores_are_grads: bool) -> torch.Tensor:
    """int32 selection key of each element: the bit pattern of its non-negative fp32 Fisher score,
    ``fl32(g) * fl32(g)`` when the score is a gradient ``g`` (batch Fisher), else the score itself."""
    f = score.float()
    if scores_are_grads:
        f = f * f
    return f.reshape(-1).view(torch.int32)


# --------------------------------------------------------------------------- global top-k
def select_mask_reference(
    layout: ParamLayout, scores: Sequence[torch.Tensor], k: int, scores_are_grads: bool
) -> torch.Tensor:
    """Packed mask of the ``k`` largest Fisher scores over all masked tensors (tie: lowest index).

    ``scores[j]`` belongs to the ``j``-th masked tensor: its gradient when ``scores_are_grads`` (batch
    Fisher, the key is ``g*g``), else its fp32 Fisher accumulator. Keys are the scores' fp32 bit patterns, so
    the order is defined for every finite value and for inf; NaN scores have no defined place (torch's
    own fp16-to-fp32 conversion of a NaN keeps or drops its sign depending on the tensor's length),
    and the optimizer never passes any: it refuses non-finite gradients and Fisher scores.
    """
    n = layout.n_masked
    if not 0 <= k <= n:
        raise ValueError(f"select_mask: expected 0 <= k <= {n}, got k={k}")
    keys = torch.cat([fisher_key(s, scores_are_grads) for s in scores]) if scores else torch.empty(0, dtype=torch.int32)
    if k == 0:
        chosen = torch.zeros(n, dtype=torch.bool, device=keys.device)
    elif k == n:
        chosen = torch.ones(n, dtype=torch.bool, device=keys.device)
    else:
        threshold = torch.topk(keys, k, sorted=False).values.min()
        above = keys > threshold
        need = k - int(above.sum())
        ties = keys == threshold
        chosen = above | (ties & (torch.cumsum(ties, 0) <= need))
    masks, start = [], 0
    for j, i in enumerate(layout.masked_index):
        masks.append(chosen[start : start + layout.numel[i]])
        start += layout.numel[i]
    return pack_mask(layout, masks)


# --------------------------------------------------------------------------- top-k by radix histograms
# The sharded global top-k (fsam_kernels.distributed_select) finds the threshold key digit by digit.
RADIX_BITS = 8  # digit width of each pass: 2**8 int64 counts to all-reduce
KEY_BITS = 32


def check_digit(shift: int, radix_bits: int) -> None:
    if not (0 < radix_bits <= 16 and 0 <= shift and shift + radix_bits <= KEY_BITS):
        raise ValueError(
            f"key_histogram: expected 0 < radix_bits <= 16 and 0 <= shift <= {KEY_BITS} - radix_bits, "
            f"got shift={shift}, radix_bits={radix_bits}"
        )


def key_histogram_reference(
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    scores_are_grads: bool,
    prefix: int,
    shift: int,
    radix_bits: int = RADIX_BITS,
) -> torch.Tensor:
    """Per-tensor digit counts of the keys whose bits above ``shift + radix_bits`` equal ``prefix``.

    Returns an int64 tensor of shape ``(len(layout.masked_index), 2**radix_bits)``: row ``j``,
    column ``d`` counts the keys of the ``j``-th masked tensor with ``key >> (shift + radix_bits) ==
    prefix`` and ``(key >> shift) & (2**radix_bits - 1) == d``.
    """
    check_digit(shift, radix_bits)
    bins = 1 << radix_bits
    rows = []
    for s in scores:
        keys = fisher_key(s, scores_are_grads).to(torch.int64)
        in_prefix = keys[(keys >> (shift + radix_bits)) == prefix]
        rows.append(torch.bincount((in_prefix >> shift) & (bins - 1), minlength=bins))
    if not rows:
        return torch.zeros((0, bins), dtype=torch.int64, device=layout.device)
    return torch.stack(rows)


def mask_from_threshold_reference(
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    scores_are_grads: bool,
    threshold: int,
    quotas: Sequence[int],
) -> torch.Tensor:
    """Packed mask: keys above ``threshold``, plus the first ``quotas[j]`` keys equal to it (row-major)
    in the ``j``-th masked tensor."""
    if len(quotas) != len(scores):
        raise ValueError(f"mask_from_threshold: expected {len(scores)} quotas (one per masked tensor), got {len(quotas)}")
    masks = []
    for s, q in zip(scores, quotas):
        keys = fisher_key(s, scores_are_grads).to(torch.int64)
        ties = keys == threshold
        masks.append((keys > threshold) | (ties & (torch.cumsum(ties, 0) <= int(q))))
    return pack_mask(layout, masks)


# --------------------------------------------------------------------------- N:M structured mask
MAX_M = 16  # an in-group index fits in 4 bits; the kernels unroll over M


def nm_eligible(shape: Sequence[int], m: int) -> bool:
    """Whether a tensor of ``shape`` gets the N:M pattern (else it falls back to unstructured top-k)."""
    return len(shape) >= 2 and shape[-1] % m == 0


def check_nm_args(
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    n: int,
    m: int,
    support: Optional[Sequence[torch.Tensor]],
) -> None:
    """The arguments of ``select_nm_mask`` (every backend checks them before its kernels run)."""
    op = "select_nm_mask"
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise TypeError(f"{op}: expected int n and m, got {n!r} and {m!r}")
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"{op}: expected 1 <= n < m <= {MAX_M}, got n={n}, m={m}")
    n_masked = len(layout.masked_index)
    if len(scores) != n_masked:
        raise ValueError(f"{op}: expected {n_masked} scores (one per masked tensor), got {len(scores)}")
    if support is not None and len(support) != n_masked:
        raise ValueError(f"{op}: expected {n_masked} support tensors (one per masked tensor), got {len(support)}")
    for j, i in enumerate(layout.masked_index):
        numel = layout.numel[i]
        if scores[j].numel() != numel:
            raise ValueError(f"{op}: expected scores[{j}] with {numel} elements, got {scores[j].numel()}")
        if support is not None and support[j].numel() != numel:
            raise ValueError(f"{op}: expected support[{j}] with {numel} elements, got {support[j].numel()}")


def select_nm_mask_reference(
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    n: int,
    m: int,
    scores_are_grads: bool,
    support: Optional[Sequence[torch.Tensor]] = None,
) -> torch.Tensor:
    """Packed mask keeping, in every group of ``m`` consecutive elements along the last dimension of each
    eligible masked tensor (:func:`nm_eligible`), the ``n`` largest Fisher keys (tie: lowest index).
    Bits of ineligible tensors are 0.

    ``scores`` follow ``layout.masked_index`` (gradients when ``scores_are_grads``, fp32 Fisher
    otherwise). ``support`` (optional, same order, e.g. the weights): elements where it is zero get key
    -1, so they rank below every other element, and are never selected.
    """
    check_nm_args(layout, scores, n, m, support)
    masks = []
    for j, i in enumerate(layout.masked_index):
        shape = layout.params[i].shape
        if not nm_eligible(shape, m):
            masks.append(torch.zeros(layout.numel[i], dtype=torch.bool, device=layout.device))
            continue
        keys = fisher_key(scores[j], scores_are_grads).view(-1, m)
        alive = None
        if support is not None:
            alive = support[j].reshape(-1, m) != 0
            keys = torch.where(alive, keys, torch.full_like(keys, -1))
        # A stable descending sort keeps equal keys in index order: the lowest index wins ties.
        top = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :n]
        chosen = torch.zeros_like(keys, dtype=torch.bool).scatter_(1, top, True)
        if alive is not None:
            chosen &= alive
        masks.append(chosen.reshape(-1))
    return pack_mask(layout, masks)


# --------------------------------------------------------------------------- perturb / restore
def compute_dtype(weight: torch.Tensor, grad: torch.Tensor) -> torch.dtype:
    """fp64 when the weight or its gradient is fp64, else fp32 (see the module doc)."""
    return torch.float64 if torch.float64 in (weight.dtype, grad.dtype) else torch.float32


def norm_dtype(layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> torch.dtype:
    """fp64 when any perturbed tensor with a gradient computes in fp64, else fp32."""
    fp64 = any(g is not None and compute_dtype(p, g) == torch.float64 for p, g in zip(layout.params, grads))
    return torch.float64 if fp64 else torch.float32


def grad_sumsq_reference(layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``S``: the sum of ``(a_i * g_i)**2`` over every element, each squared and summed in fp64; 0-dim fp64."""
    total = torch.zeros((), dtype=torch.float64, device=layout.device)
    for p, g, adaptive in zip(layout.params, grads, layout.adaptive):
        if g is None:
            continue
        v = g.reshape(-1).double()
        if adaptive:
            v = p.detach().reshape(-1).double().abs() * v
        total = total + torch.dot(v, v)
    return total


def grad_norm_reference(layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """Global L2 norm of the (ASAM-weighted) gradient of every perturbed parameter; 0-dim, in the norm
    dtype. davda54/sam's value where it is finite, else ``fl(sqrt(S))`` (the skip rule). ``S`` costs a
    pass in fp64, so it is computed only then: one host read (the optimizer reads the norm anyway)."""
    davda = davda_norm(layout, grads)
    if davda is None:
        return torch.zeros((), dtype=norm_dtype(layout, grads), device=layout.device)
    if bool(davda_norm_fits(davda)):
        return davda
    return grad_sumsq_reference(layout, grads).sqrt().to(davda.dtype)


def davda_norm(layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """davda54/sam's norm in the norm dtype (``None`` when no tensor has a gradient)."""
    dtype = norm_dtype(layout, grads)
    norms = []
    for p, g, adaptive in zip(layout.params, grads, layout.adaptive):
        if g is None:
            continue
        v = g.to(compute_dtype(p, g))
        if adaptive:
            v = p.detach().to(v.dtype).abs() * v
        norms.append(torch.linalg.vector_norm(v).to(dtype))
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def davda_norm_fits(davda: torch.Tensor) -> torch.Tensor:
    """Whether :func:`davda_norm`'s value is the norm (a bool tensor): else ``fl(sqrt(S))`` is. In fp64,
    davda54's value can be finite where S is not: vector_norm returns |x| for one element."""
    return torch.isfinite(davda * davda if davda.dtype == torch.float64 else davda)


def perturb_reference(
    layout: ParamLayout,
    grads: Sequence[Optional[torch.Tensor]],
    bits: Optional[torch.Tensor],
    norm: torch.Tensor,
    eps: float,
) -> Optional[list[Optional[torch.Tensor]]]:
    """Move the weights to ``w + e`` on masked (and dense) elements; return their original values.

    ``norm`` is a 0-dim tensor in the norm dtype (what :func:`grad_norm_reference` returns); the scale
    is computed in its dtype. Returns ``None`` (weights untouched) when ``norm`` is not finite, else one
    compact 1-D tensor of saved originals per parameter (``None`` where the parameter had no gradient).
    Every original is saved before any weight is written (:func:`originals_reference`, then
    :func:`write_perturbation_reference`), so a failure while writing leaves what undoes it.
    """
    if not bool(torch.isfinite(norm)):
        return None
    saved = originals_reference(layout, grads, bits)
    write_perturbation_reference(layout, grads, bits, norm, eps)
    return saved


def originals_reference(
    layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]], bits: Optional[torch.Tensor]
) -> list[Optional[torch.Tensor]]:
    """The values :func:`write_perturbation_reference` overwrites, in :func:`perturb_reference`'s format."""
    saved: list[Optional[torch.Tensor]] = [None] * len(layout.params)
    masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
    for i, (p, g) in enumerate(zip(layout.params, grads)):
        if g is None:
            continue
        flat = p.detach().view(-1)
        saved[i] = flat[mask_of(layout, bits, masked_pos[i])].clone() if i in masked_pos else flat.clone()
    return saved


def write_perturbation_reference(
    layout: ParamLayout,
    grads: Sequence[Optional[torch.Tensor]],
    bits: Optional[torch.Tensor],
    norm: torch.Tensor,
    eps: float,
) -> None:
    """The writes of :func:`perturb_reference` (``norm`` finite)."""
    masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
    norm = norm.reshape(())
    # A zero norm (an all-zero gradient) perturbs by exactly 0, whatever rho and eps (0 * inf is NaN).
    inverse = torch.where(norm == 0, torch.zeros_like(norm), (norm + eps).reciprocal())
    for i, (p, g) in enumerate(zip(layout.params, grads)):
        if g is None:
            continue
        c = compute_dtype(p, g)
        scale = (inverse * torch.tensor(layout.rho[i], dtype=inverse.dtype, device=p.device)).to(c)
        flat = p.detach().view(-1)
        gc = g.reshape(-1).to(c)
        if layout.adaptive[i]:
            wc = flat.to(c)
            e = ((wc * wc) * gc) * scale
        else:
            e = gc * scale
        if i in masked_pos:
            m = mask_of(layout, bits, masked_pos[i])
            flat[m] = (flat[m].to(c) + e[m]).to(p.dtype)
        else:
            flat.copy_((flat.to(c) + e).to(p.dtype))


def restore_reference(
    layout: ParamLayout, bits: Optional[torch.Tensor], saved: Sequence[Optional[torch.Tensor]]
) -> None:
    """Write the saved originals back (exact)."""
    masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
    for i, (p, s) in enumerate(zip(layout.params, saved)):
        if s is None:
            continue
        flat = p.detach().view(-1)
        if i in masked_pos:
            flat[mask_of(layout, bits, masked_pos[i])] = s
        else:
            flat.copy_(s)
