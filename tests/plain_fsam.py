"""Independent, deliberately naive FSAM and SAM used as oracles by the tests.

Written from the paper and davda54/sam, not from the package: dense bool masks, a full sort of all
Fisher values, a full copy of the weights, one tensor at a time.
"""
from __future__ import annotations

import torch


def plain_topk_masks(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Bool masks of the k largest values over all tensors; ties: lowest global flat index first."""
    flat = torch.cat([s.reshape(-1).double() for s in scores])
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[:k]] = True
    out, start = [], 0
    for s in scores:
        out.append(chosen[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return out


class PlainFSAM:
    """FSAM as a plain loop over tensors, with optional param-group options.

    ``groups`` is a list of dicts with keys params, rho, adaptive, fisher_mask, perturb (like FSAM's).
    """

    def __init__(self, groups, base_cls, sparsity, interval, eps=1e-12, **base_kwargs):
        self.groups = groups
        self.base = base_cls([{"params": g["params"]} for g in groups], **base_kwargs)
        self.sparsity, self.interval, self.eps = sparsity, interval, eps
        self.step_count = 0
        self.masks = None
        self.old = None

    def _perturbed(self):
        for g in self.groups:
            if g.get("perturb", True):
                for p in g["params"]:
                    yield g, p

    @torch.no_grad()
    def first_step(self):
        masked = [p for g, p in self._perturbed() if g.get("fisher_mask", True)]
        if masked and (self.masks is None or self.step_count % self.interval == 0):
            n = sum(p.numel() for p in masked)
            k = int(round((1 - self.sparsity) * n))
            scores = [
                (p.grad.float() * p.grad.float()) if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                for p in masked
            ]
            self.masks = dict(zip(map(id, masked), plain_topk_masks(scores, k)))
        norms = []
        for g, p in self._perturbed():
            if p.grad is None:
                continue
            v = p.grad.float()
            if g.get("adaptive", False):
                v = p.float().abs() * v
            norms.append(v.norm(p=2))
        norm = torch.stack(norms).norm(p=2)
        self.old = {}
        for g, p in self._perturbed():
            if p.grad is None:
                continue
            self.old[p] = p.clone()
            scale = (norm + self.eps).reciprocal() * g["rho"]
            g32 = p.grad.float()
            e = ((p.float() * p.float()) * g32) * scale if g.get("adaptive", False) else g32 * scale
            if g.get("fisher_mask", True):
                e = torch.where(self.masks[id(p)], e, torch.zeros_like(e))
                new = torch.where(self.masks[id(p)], (p.float() + e).to(p.dtype), p)
            else:
                new = (p.float() + e).to(p.dtype)
            p.copy_(new)
        self.step_count += 1

    @torch.no_grad()
    def second_step(self):
        for p, old in self.old.items():
            p.copy_(old)
        self.base.step()


class DavdaSAM:
    """davda54/sam's SAM (and ASAM), as published, for fp32 comparisons."""

    def __init__(self, params, base_cls, rho, adaptive=False, **kw):
        self.params = list(params)
        self.rho, self.adaptive = rho, adaptive
        self.base = base_cls(self.params, **kw)

    @torch.no_grad()
    def first_step(self):
        norm = torch.norm(
            torch.stack([((torch.abs(p) if self.adaptive else 1.0) * p.grad).norm(p=2) for p in self.params if p.grad is not None]),
            p=2,
        )
        scale = self.rho / (norm + 1e-12)
        self.old = {}
        for p in self.params:
            if p.grad is None:
                continue
            self.old[p] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)

    @torch.no_grad()
    def second_step(self):
        for p, old in self.old.items():
            p.data = old
        self.base.step()
