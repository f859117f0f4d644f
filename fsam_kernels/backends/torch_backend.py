"""The ``"torch"`` backend: the pure-PyTorch reference ops, on any device."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .. import reference as ref
from ..layout import ParamLayout
from .base import Backend, tensors_nbytes


class TorchBackend(Backend):
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def fisher_accumulate(self, accum, grads) -> None:
        ref.fisher_accumulate_reference(accum, grads)

    def select_mask(self, layout: ParamLayout, scores, k: int, scores_are_grads: bool) -> torch.Tensor:
        return ref.select_mask_reference(layout, scores, k, scores_are_grads)

    def grad_norm(self, layout: ParamLayout, grads) -> torch.Tensor:
        return ref.grad_norm_reference(layout, grads)

    def prepare_perturb(self, layout, grads, bits, aux, norm, eps) -> Any:
        # Every original is copied before any weight is written: a failure while writing (an
        # allocation, an interrupt) leaves what restore needs.
        if not bool(torch.isfinite(norm)):
            return None
        saved = _Originals(ref.originals_reference(layout, grads, bits))
        saved.write = (layout, list(grads), bits, norm, eps)
        return saved

    def write_perturb(self, saved) -> None:
        if saved is not None and saved.write is not None:
            args, saved.write = saved.write, None
            ref.write_perturbation_reference(*args)

    def restore(self, layout, bits, aux, saved) -> None:
        ref.restore_reference(layout, bits, saved)

    def saved_originals(self, layout, bits, aux, saved) -> Any:
        return saved

    def saved_nbytes(self, saved: Any) -> int:
        return tensors_nbytes(saved)


class _Originals(list):
    """The reference's saved list (what ``restore_reference`` takes), with the pending write's arguments."""

    write: Any = None
