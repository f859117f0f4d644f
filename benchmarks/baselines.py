"""What users would run without fsam_kernels: the baselines of every benchmark.

* :class:`LoopSAM` - dense SAM as davda54/sam does it: a per-tensor Python loop, a full copy of the
  weights kept in the optimizer state, restore by pointing ``p.data`` back at the copy.
* :class:`ForeachSAM` - dense SAM with ``torch._foreach_*`` ops (one multi-tensor launch per op) and a
  persistent copy of the weights.
* :class:`NaiveFSAM` - Fisher-masked SAM as the FSAM authors' code does it: ``torch.cat`` of every
  score, ``torch.topk``, a dense float mask per tensor (in the parameter dtype), a per-tensor loop.

All three compute the same perturbation as :mod:`fsam_kernels.reference` (the smoke tests check it):
``e = rho * g / (||g|| + eps)`` (times ``w*w`` for ASAM), on the masked elements for FSAM. They can
also drive training: ``first_step`` / ``second_step`` around a base optimizer, like davda54/sam.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _norm_loop(params: Sequence[torch.Tensor], adaptive: bool) -> torch.Tensor:
    # davda54/sam: the norm of the per-tensor norms.
    norms = [((p.abs() if adaptive else 1.0) * p.grad).norm(p=2) for p in params if p.grad is not None]
    return torch.norm(torch.stack(norms), p=2)


class _TwoStep:
    """first_step/second_step around a base optimizer; subclasses define perturb and restore."""

    def __init__(self, params, rho: float, adaptive: bool, eps: float,
                 base_optimizer: Optional[torch.optim.Optimizer]) -> None:
        if not rho > 0:
            raise ValueError(f"Invalid rho: {rho!r}; expected a number > 0")
        self.params = [p for p in params]
        self.rho, self.adaptive, self.eps = float(rho), bool(adaptive), float(eps)
        self.base_optimizer = base_optimizer

    @torch.no_grad()
    def first_step(self) -> torch.Tensor:
        return self.perturb()

    @torch.no_grad()
    def second_step(self) -> None:
        self.restore()
        if self.base_optimizer is not None:
            self.base_optimizer.step()

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def perturb(self) -> torch.Tensor:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def state_nbytes(self) -> int:
        """Bytes of optimizer state kept between steps (the base optimizer's not counted)."""
        raise NotImplementedError


class LoopSAM(_TwoStep):
    """Dense SAM, davda54/sam style."""

    def __init__(self, params, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12,
                 base_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(params, rho, adaptive, eps, base_optimizer)
        self.old_p: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def perturb(self) -> torch.Tensor:
        grad_norm = _norm_loop(self.params, self.adaptive)
        scale = self.rho / (grad_norm + self.eps)
        for p in self.params:
            if p.grad is None:
                continue
            self.old_p[id(p)] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        for p in self.params:
            if id(p) in self.old_p:
                p.data = self.old_p[id(p)]

    def state_nbytes(self) -> int:
        # After restore the "copies" are the live weights (p.data = old_p), so between steps they hold
        # no extra memory: count only tensors that do not share a parameter's storage.
        return _unaliased_nbytes(self.old_p.values(), self.params)


def _unaliased_nbytes(tensors, params) -> int:
    live = {p.untyped_storage().data_ptr() for p in params}
    return sum(t.numel() * t.element_size() for t in tensors if t.untyped_storage().data_ptr() not in live)


class ForeachSAM(_TwoStep):
    """Dense SAM with multi-tensor ``torch._foreach_*`` ops and a persistent copy of the weights."""

    def __init__(self, params, rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12,
                 base_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(params, rho, adaptive, eps, base_optimizer)
        self.copies = [torch.empty_like(p) for p in self.params]
        self._active: list[int] = []

    @torch.no_grad()
    def perturb(self) -> torch.Tensor:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in idx]
        grads = [p.grad for p in params]
        if self.adaptive:
            grads_for_norm = torch._foreach_mul(torch._foreach_abs(params), grads)
        else:
            grads_for_norm = grads
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads_for_norm)))
        scale = self.rho / (grad_norm + self.eps)
        torch._foreach_copy_([self.copies[i] for i in idx], params)
        e_w = torch._foreach_mul(grads, scale.to(params[0].dtype))
        if self.adaptive:
            torch._foreach_mul_(e_w, torch._foreach_mul(params, params))
        torch._foreach_add_(params, e_w)
        self._active = idx
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        if self._active:
            torch._foreach_copy_([self.params[i] for i in self._active], [self.copies[i] for i in self._active])
        self._active = []

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.copies)


class NaiveFSAM(_TwoStep):
    """Fisher-masked SAM as the authors' code does it: dense float masks from a global ``torch.topk``."""

    def __init__(self, params, rho: float = 0.05, sparsity: float = 0.9, adaptive: bool = False,
                 eps: float = 1e-12, base_optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        super().__init__(params, rho, adaptive, eps, base_optimizer)
        if not 0.0 <= sparsity <= 1.0:
            raise ValueError(f"Invalid sparsity: {sparsity!r}; expected a number in [0, 1]")
        self.sparsity = float(sparsity)
        self.masks: dict[int, torch.Tensor] = {}
        self.fisher: Optional[dict[int, torch.Tensor]] = None
        self.old_p: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def accumulate_fisher(self) -> None:
        """``F += g**2`` per tensor, in the parameter dtype (the authors' Fisher dict)."""
        if self.fisher is None:
            self.fisher = {id(p): torch.zeros_like(p) for p in self.params}
        for p in self.params:
            if p.grad is not None:
                self.fisher[id(p)] += torch.square(p.grad)

    @torch.no_grad()
    def update_mask(self, scores: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Keep the ``round((1 - sparsity) * N)`` largest scores (default: this step's ``g**2``)."""
        if scores is None:
            scores = [torch.square(p.grad) if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([torch.flatten(s) for s in scores])
        keep = int(round((1.0 - self.sparsity) * flat.numel()))
        _, index = torch.topk(flat, keep)
        mask_flat = torch.zeros_like(flat)
        mask_flat.scatter_(0, index, torch.ones_like(flat[:keep]))
        start = 0
        for p in self.params:
            self.masks[id(p)] = mask_flat[start:start + p.numel()].reshape(p.shape).to(p.dtype)
            start += p.numel()

    @torch.no_grad()
    def perturb(self) -> torch.Tensor:
        if not self.masks:
            self.update_mask()
        grad_norm = _norm_loop(self.params, self.adaptive)
        scale = self.rho / (grad_norm + self.eps)
        for p in self.params:
            if p.grad is None:
                continue
            self.old_p[id(p)] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w * self.masks[id(p)])
        return grad_norm

    @torch.no_grad()
    def restore(self) -> None:
        for p in self.params:
            if id(p) in self.old_p:
                p.data = self.old_p[id(p)]

    def state_nbytes(self) -> int:
        held = list(self.masks.values())
        if self.fisher is not None:
            held += list(self.fisher.values())
        return sum(t.numel() * t.element_size() for t in held) + _unaliased_nbytes(self.old_p.values(), self.params)
