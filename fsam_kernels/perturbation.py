"""A pending perturbation: the weights moved to ``w + e`` by ``first_step``, and what undoes it bit for bit."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from . import param_groups, storage
from .backends.base import Backend
from .layout import ParamLayout, storage_signature


@dataclass
class Perturbation:
    layout: ParamLayout  # the layout perturbed with (its rho may be a variant's)
    bits: Optional[torch.Tensor]
    aux: Any
    backend: Backend  # the backend that perturbed, and saved the originals in its own format
    saved: Any
    signature: tuple  # layout.storage_signature of the perturbed tensors at first_step

    @classmethod
    def apply(cls, backend: Backend, plan: tuple, grads: Sequence[Optional[torch.Tensor]], norm: torch.Tensor,
              eps: float, signature: tuple) -> "Perturbation":
        """Perturb the weights along ``grads`` with ``plan`` = (layout, packed mask, aux)."""
        layout, bits, aux = plan
        return cls(layout, bits, aux, backend, backend.perturb(layout, grads, bits, aux, norm, eps), signature)

    def nbytes(self) -> int:
        return self.backend.saved_nbytes(self.saved)

    def undo(self, tensors: Sequence[torch.Tensor], groups: Sequence[dict]) -> Optional[ValueError]:
        """Put the originals back into ``tensors`` (the perturbed parameters' tensors now). Returns the
        error to raise once the optimizer is idle when some could not be put back."""
        if storage_signature(tensors) == self.signature:
            self.backend.restore(self.layout, self.bits, self.aux, self.saved)
            return None
        # Storage replaced since first_step (model.to(...), p.data = ...): the backend's restore would
        # write into the old one; put the originals into the current one instead.
        originals = self.backend.saved_originals(self.layout, self.bits, self.aux, self.saved)
        if originals is None:
            return None
        shapes = self.layout.shapes
        moved = storage.restore_into(tensors, self.layout, self.bits, originals, shapes)
        if not moved:
            return None
        changes = ", ".join(f"{param_groups.perturbed_label(groups, i)} from {tuple(shapes[i])} to "
                            f"{tuple(tensors[i].shape)}" for i in moved)
        return ValueError(
            f"restore: parameters changed shape between first_step and restore ({changes}); their perturbed "
            "values could not be undone and they still hold w + e (every other parameter was restored)")
