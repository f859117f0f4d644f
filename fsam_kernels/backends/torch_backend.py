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

    def perturb(self, layout, grads, bits, aux, norm, eps) -> Any:
        return ref.perturb_reference(layout, grads, bits, norm, eps)

    def restore(self, layout, bits, aux, saved) -> None:
        ref.restore_reference(layout, bits, saved)

    def saved_originals(self, layout, bits, aux, saved) -> Any:
        return saved

    def saved_nbytes(self, saved: Any) -> int:
        return tensors_nbytes(saved)
