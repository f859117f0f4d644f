"""Global top-k by radix histograms: the mask selection that works when the scores are sharded.

The unsharded :func:`~fsam_kernels.reference.select_mask_reference` sees every key at once. When the
parameters are split across ranks (FSDP2), no rank may gather the scores, so the threshold is found
digit by digit instead:

1. Each rank counts its keys per digit (``RADIX_BITS`` bits, most significant first) among the keys
   whose higher digits equal the prefix found so far (the op ``key_histogram``, defined by
   :func:`~fsam_kernels.reference.key_histogram_reference`).
2. The counts are summed over ranks (one all-reduce of ``2**RADIX_BITS`` int64 per pass: 2 KiB), and
   every rank picks the same next digit. After ``32 / RADIX_BITS`` passes the prefix *is* the
   threshold key, and the number ``need`` of keys equal to it that still have to be taken is known.
3. Ties are resolved as unsharded: lowest global index first. Each rank counts its keys equal to the
   threshold per tensor (the last pass's per-tensor rows give them for free); one all-gather of these
   counts lets every rank compute its per-tensor quotas (:func:`tie_quotas`).
4. Each rank builds the mask of its own shard from the threshold and its quotas
   (the op ``mask_from_threshold``, defined by :func:`~fsam_kernels.reference.mask_from_threshold_reference`).

Keys are the int32 bit patterns of non-negative fp32 scores (:func:`~fsam_kernels.reference.fisher_key`),
so the sign bit is always 0 and the order of keys is the order of scores.

With one process (no collectives) :func:`select_mask_by_histogram` gives exactly the mask of
``select_mask``; the tests use that as an oracle for the histogram ops.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .layout import ParamLayout
from .reference import KEY_BITS, RADIX_BITS

PASS_SHIFTS = tuple(range(KEY_BITS - RADIX_BITS, -1, -RADIX_BITS))  # (24, 16, 8, 0)


# --------------------------------------------------------------------------- the driver
def next_digit(hist: torch.Tensor, remaining: int) -> tuple[int, int]:
    """The digit holding the ``remaining``-th largest key of a global histogram, and how many keys
    of that digit are still needed (``1 <= need <= hist[digit]``)."""
    counts = hist.tolist()
    above = 0
    for d in range(len(counts) - 1, -1, -1):
        if above + counts[d] >= remaining:
            return d, remaining - above
        above += counts[d]
    raise RuntimeError(
        f"select_mask: the histograms hold {above} keys, fewer than the {remaining} still needed; "
        "the ranks disagree on the scores or on k"
    )


def tie_quotas(tie_counts: torch.Tensor, need: int) -> torch.Tensor:
    """Per (rank, tensor) quotas of threshold-equal keys, lowest global index first.

    ``tie_counts[r, j]`` is how many keys equal to the threshold rank ``r`` holds in masked tensor
    ``j``. Shard(0) puts rank ``r``'s rows of a tensor after those of ranks ``< r``, and tensors follow
    each other in param_group order, so the global order of the (rank, tensor) blocks is tensor-major.
    """
    order = tie_counts.t().reshape(-1)  # tensor-major, rank-minor
    before = torch.cumsum(order, 0) - order
    quota = (need - before).clamp(min=0).minimum(order)
    return quota.view(tie_counts.shape[1], tie_counts.shape[0]).t()


AllReduce = Callable[[torch.Tensor], torch.Tensor]
AllGather = Callable[[torch.Tensor], torch.Tensor]


def select_mask_by_histogram(
    backend,
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    k: int,
    scores_are_grads: bool,
    *,
    n_global: Optional[int] = None,
    all_reduce_sum: Optional[AllReduce] = None,
    all_gather: Optional[AllGather] = None,
    rank: int = 0,
) -> torch.Tensor:
    """Packed mask of the ``k`` largest keys over every rank's ``scores``, this rank's shard only.

    ``backend`` supplies ``key_histogram`` and ``mask_from_threshold``. ``all_reduce_sum(t)`` returns
    the sum of ``t`` over ranks and ``all_gather(t)`` stacks ``t`` of every rank (rank order) along a
    new dim 0; both default to one process. ``n_global`` is the number of masked elements over all
    ranks (default: this rank's).
    """
    n = layout.n_masked if n_global is None else n_global
    if not 0 <= k <= n:
        raise ValueError(f"select_mask: expected 0 <= k <= {n}, got k={k}")
    if k == 0:
        return layout.empty_mask()
    all_reduce_sum = all_reduce_sum or (lambda t: t)
    all_gather = all_gather or (lambda t: t.unsqueeze(0))
    prefix, remaining, rows = 0, k, None
    for shift in PASS_SHIFTS:
        rows = backend.key_histogram(layout, scores, scores_are_grads, prefix, shift, RADIX_BITS)
        hist = all_reduce_sum(rows.sum(dim=0)).cpu()
        digit, remaining = next_digit(hist, remaining)
        prefix = (prefix << RADIX_BITS) | digit
    # keys equal to the threshold, per local tensor; gathered on the device (NCCL takes no CPU tensors)
    local_ties = rows[:, digit].contiguous()
    quotas = tie_quotas(all_gather(local_ties).cpu(), remaining)[rank]
    return backend.mask_from_threshold(layout, scores, scores_are_grads, prefix, quotas.tolist())
