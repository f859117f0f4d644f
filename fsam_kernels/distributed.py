"""FSAM with DistributedDataParallel: identical masks on every replica.

Two ways to run the first pass under DDP (the second pass is always a normal, synchronized backward,
so every replica steps its base optimizer with the same averaged ``g_SAM``):

* **Synchronized** (a plain ``loss.backward()``, what the FSAM authors' code did): every replica sees
  the averaged gradient, so the perturbation, the mask and the final step are those of one process
  on the combined batch. Use the ordinary ``opt.first_step()``.
* **Per-replica** (the first backward under ``ddp_model.no_sync()``): each replica perturbs along its
  own gradient (the original SAM's m-sharpness, m = the per-replica batch) and the first pass costs
  no communication. The replicas' gradients differ, so their Fisher masks would too; use
  :func:`first_step` below, which builds the mask from the all-reduced (averaged) gradient on the
  steps where the mask is refreshed, and keeps the replicas' step counters in lock step by skipping
  the perturbation everywhere when any replica's gradient is not finite.

Either way the weights stay bit-identical across replicas: the perturbation is undone exactly and
the base step uses the synchronized second gradient. (Not GSAM's per replica: its surrogate-gap step
uses the first gradient too, each replica's own; its masks still agree.) :func:`check_masks_consistent` verifies the
masks agree (a debugging aid: it communicates the whole mask).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .optimizer import FSAM
from .param_groups import perturbed_params

__all__ = ["first_step", "check_masks_consistent"]


def _masked_params(optimizer: FSAM) -> list[torch.Tensor]:
    # Same order as the optimizer's layout: perturbed groups with fisher_mask=True, param_group order.
    return [
        p
        for g in optimizer.param_groups
        if g.get("perturb", True) and g.get("fisher_mask", True)
        for p in g["params"]
    ]


def _check(optimizer: Any) -> None:
    if not isinstance(optimizer, FSAM):
        raise TypeError(f"Invalid optimizer: expected an fsam_kernels.FSAM, got {type(optimizer).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fsam_kernels.distributed: torch.distributed is not initialized (init_process_group first)")


@torch.no_grad()
def first_step(optimizer: FSAM, zero_grad: bool = False, process_group: Optional[Any] = None) -> torch.Tensor:
    """:meth:`FSAM.first_step` for a first backward run under ``no_sync()``.

    The perturbation uses this replica's own gradient; the mask (when due, ``fisher="batch"``) is
    built from the gradient averaged over ``process_group``, i.e. the mask one process would build on
    the combined batch. One scalar all-reduce per step (finiteness), plus one gradient all-reduce on
    mask-refresh steps. In ``fisher="empirical"`` mode the Fisher comes from the optimizer's
    accumulator: fill it from synchronized backward passes (outside ``no_sync``) so it agrees.
    Returns this replica's gradient norm.
    """
    _check(optimizer)
    params = perturbed_params(optimizer.param_groups)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        raise RuntimeError("first_step: no perturbed parameter has a gradient; call loss.backward() before first_step()")
    device = grads[0].device
    # FSAM's own skip rule (see fsam_kernels.reference): this replica's norm, in the norm dtype, by
    # the optimizer's backend, so a replica never skips alone (a finite gradient can still skip: an
    # fp64 one whose squares overflow, an fp32 one whose norm exceeds fp32).
    local_finite = torch.isfinite(optimizer.grad_norm())
    flag = local_finite.to(device=device, dtype=torch.int32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=process_group)
    if not bool(flag.item()):
        # Some replica overflowed: every replica skips (FSAM leaves its weights, mask and step count
        # alone on a non-finite norm). The poisoned first-pass gradient is discarded anyway.
        if bool(local_finite):
            grads[0].view(-1)[0] = float("nan")
        norm = optimizer.first_step(zero_grad=zero_grad)
        optimizer._settle()  # the decision was read here already: SKIPPED (and the warning) now, not at second_step
        return norm

    if optimizer.fisher != "batch" or not optimizer.mask_update_due or optimizer.sparsity in (0.0, 1.0):
        # No mask refresh from gradients this step (or the mask is all/none: identical anyway).
        return optimizer.first_step(zero_grad=zero_grad)
    masked = _masked_params(optimizer)
    if not masked:
        return optimizer.first_step(zero_grad=zero_grad)
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(torch.float32) for p in masked
    ])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    flat /= dist.get_world_size(process_group)
    scores = [(g * g).view_as(p) for g, p in zip(flat.split([p.numel() for p in masked]), masked)]
    return optimizer.first_step(zero_grad=zero_grad, mask_scores=scores)


@torch.no_grad()
def check_masks_consistent(optimizer: FSAM, process_group: Optional[Any] = None) -> bool:
    """Whether every replica of ``process_group`` holds the same mask (collective: all must call it)."""
    _check(optimizer)
    masks = optimizer.masks()
    if not masks:
        flat = torch.zeros(1, dtype=torch.int32)
    else:
        flat = torch.cat([m.reshape(-1) for m in masks]).to(torch.int32)
    if dist.get_backend(process_group) == "nccl":
        flat = flat.cuda()
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=process_group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=process_group)
    return bool(torch.equal(lo, hi))
