"""The ``"torch"`` backend: the pure-PyTorch reference ops, on any device.

The norm, the perturbation and the restore take the reference's values without its host reads (a
plain step never waits for the device): the norm's fp64 fallback is computed every step and chosen on
the device, the weights keep their values where the norm is not finite (``torch.where``), and the
masked elements are addressed through ``nonzero_static`` with the per-tensor counts of the mask, read
once per mask (:meth:`TorchBackend.mask_aux`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .. import reference as ref
from ..layout import ParamLayout
from .base import Backend, tensors_nbytes


@dataclass
class TorchMaskAux:
    counts: list[int]  # set bits of each masked tensor, in masked order (host ints)
    tensors_key: object  # ParamLayout.tensors_key of the layout they follow


def _masked_indices(layout: ParamLayout, bits: torch.Tensor, j: int, count: int) -> torch.Tensor:
    """Positions of the set bits of the ``j``-th masked tensor (there are ``count``), without a host read."""
    return torch.nonzero_static(ref.mask_of(layout, bits, j), size=count).view(-1)


class TorchBackend(Backend):
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def fisher_accumulate(self, accum, grads) -> None:
        ref.fisher_accumulate_reference(accum, grads)

    def select_mask(self, layout: ParamLayout, scores, k: int, scores_are_grads: bool) -> torch.Tensor:
        return ref.select_mask_reference(layout, scores, k, scores_are_grads)

    def mask_aux(self, layout: ParamLayout, bits: torch.Tensor) -> TorchMaskAux:
        """The set bits of each masked tensor: one host read per mask."""
        sums = [ref.mask_of(layout, bits, j).sum() for j in range(len(layout.masked_index))]
        return TorchMaskAux(torch.stack(sums).tolist() if sums else [], layout.tensors_key)

    def grad_norm(self, layout: ParamLayout, grads) -> torch.Tensor:
        if layout.device.type not in ("cpu", "cuda"):  # e.g. MPS, without fp64: the reference's host read
            return ref.grad_norm_reference(layout, grads)
        davda = ref.davda_norm(layout, grads)
        if davda is None:
            return torch.zeros((), dtype=ref.norm_dtype(layout, grads), device=layout.device)
        fallback = ref.grad_sumsq_reference(layout, grads).sqrt().to(davda.dtype)
        return torch.where(ref.davda_norm_fits(davda), davda, fallback)

    def prepare_perturb(self, layout, grads, bits, aux, norm, eps) -> Any:
        """:func:`~fsam_kernels.reference.perturb_reference`'s values and saved originals, computed (every
        buffer allocated) before :meth:`write_perturb` writes the first weight: a failure while writing
        (an allocation, an interrupt) leaves what restore needs."""
        if layout.masked_index and any(grads[i] is not None for i in layout.masked_index):
            if not isinstance(aux, TorchMaskAux) or aux.tensors_key is not layout.tensors_key:
                aux = self.mask_aux(layout, bits)
        finite = torch.isfinite(norm.reshape(()))
        norm = norm.reshape(())
        # A zero norm (an all-zero gradient) perturbs by exactly 0, whatever rho and eps (0 * inf is NaN).
        inverse = torch.where(norm == 0, torch.zeros_like(norm), (norm + eps).reciprocal())
        masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
        saved: list[Optional[torch.Tensor]] = [None] * len(layout.params)
        writes = []
        for i, (p, g) in enumerate(zip(layout.params, grads)):
            if g is None:
                continue
            c = ref.compute_dtype(p, g)
            scale = (inverse * layout.rho[i]).to(c)  # fl(1 / (norm + eps)) * fl(rho) in the norm dtype
            flat = p.detach().view(-1)
            gc = g.reshape(-1).to(c)
            j = masked_pos.get(i)
            idx = None if j is None else _masked_indices(layout, bits, j, aux.counts[j])
            orig = flat.clone() if idx is None else flat.index_select(0, idx)
            if layout.adaptive[i]:
                wc = orig.to(c)
                e = ((wc * wc) * (gc if idx is None else gc.index_select(0, idx))) * scale
            else:
                e = (gc if idx is None else gc.index_select(0, idx)) * scale
            new = torch.where(finite, (orig.to(c) + e).to(p.dtype), orig)  # a non-finite norm moves nothing
            saved[i] = orig
            writes.append((flat, idx, new))
        saved = _Originals(saved)
        saved.write = writes
        return saved

    def write_perturb(self, saved) -> None:
        if saved is None or saved.write is None:
            return
        writes, saved.write = saved.write, None
        for flat, idx, new in writes:
            if idx is None:
                flat.copy_(new)
            else:
                flat.index_copy_(0, idx, new)

    def restore(self, layout, bits, aux, saved) -> None:
        if saved is None:
            return
        masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
        for i, (p, s) in enumerate(zip(layout.params, saved)):
            if s is None:
                continue
            flat = p.detach().view(-1)
            j = masked_pos.get(i)
            if j is None:
                flat.copy_(s)
            else:
                flat.index_copy_(0, _masked_indices(layout, bits, j, s.numel()), s)

    def saved_originals(self, layout, bits, aux, saved) -> Any:
        return saved

    def saved_nbytes(self, saved: Any) -> int:
        return tensors_nbytes(saved)


class _Originals(list):
    """The saved originals (one entry per parameter, as the reference saves them), with the pending writes."""

    write: Any = None
