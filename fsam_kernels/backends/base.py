"""The op interface every backend implements.

The optimizer calls these methods and nothing else; it never touches elements itself. Each op is
defined by its pure-torch reference in :mod:`fsam_kernels.reference` (the ``"torch"`` backend), and
every other backend must reproduce it: masks and restored weights bit for bit, perturbed weights and
norms within floating-point tolerance.

``grads`` lists follow ``layout.params`` (``None`` where a parameter has no gradient); ``scores``
lists follow ``layout.masked_index``, and are gradients when ``scores_are_grads`` (batch Fisher: the
key of ``g`` is ``fl32(g) * fl32(g)``), else Fisher values (the empirical accumulator). ``saved`` is backend-private: whatever ``perturb`` returns is
handed back to ``restore`` unchanged. ``aux`` is backend-private data derived from a mask (e.g.
per-block prefix counts); it is rebuilt with ``mask_aux`` whenever the mask changes or is loaded.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import torch

from .. import reference as ref
from ..layout import ParamLayout


class Backend:
    name: str = "abstract"

    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run ops on tensors of ``device``."""
        raise NotImplementedError

    # --- Fisher
    def fisher_accumulate(self, accum: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        raise NotImplementedError

    # --- mask
    def select_mask(
        self, layout: ParamLayout, scores: Sequence[torch.Tensor], k: int, scores_are_grads: bool
    ) -> torch.Tensor:
        """Packed uint8 mask (``layout.mask_bytes`` bytes) of the ``k`` largest Fisher scores."""
        raise NotImplementedError

    def mask_aux(self, layout: ParamLayout, bits: torch.Tensor) -> Any:
        return None

    # --- mask by radix histograms (sharded parameters; see fsam_kernels.distributed_select)
    def key_histogram(
        self,
        layout: ParamLayout,
        scores: Sequence[torch.Tensor],
        scores_are_grads: bool,
        prefix: int,
        shift: int,
        radix_bits: int,
    ) -> torch.Tensor:
        """int64 ``(n_masked_tensors, 2**radix_bits)`` digit counts of the keys under ``prefix``."""
        return ref.key_histogram_reference(layout, scores, scores_are_grads, prefix, shift, radix_bits)

    def mask_from_threshold(
        self,
        layout: ParamLayout,
        scores: Sequence[torch.Tensor],
        scores_are_grads: bool,
        threshold: int,
        quotas: Sequence[int],
    ) -> torch.Tensor:
        """Packed mask of the keys above ``threshold`` plus the first ``quotas[j]`` equal to it."""
        return ref.mask_from_threshold_reference(layout, scores, scores_are_grads, threshold, quotas)

    # --- N:M structured mask (see fsam_kernels.structured for which tensors take it)
    def select_nm_mask(
        self,
        layout: ParamLayout,
        scores: Sequence[torch.Tensor],
        n: int,
        m: int,
        scores_are_grads: bool,
        support: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Packed mask keeping the ``n`` largest keys of every ``m`` consecutive elements along the last
        dimension of each eligible masked tensor (0 bits elsewhere); ``support`` zeros are never kept."""
        return ref.select_nm_mask_reference(layout, scores, n, m, scores_are_grads, support)

    # --- perturb / restore
    def grad_norm(self, layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """0-dim device tensor in the norm dtype (fp64 when a tensor computes in fp64, else fp32; see
        :mod:`fsam_kernels.reference`); no host synchronisation."""
        raise NotImplementedError

    def perturb(
        self,
        layout: ParamLayout,
        grads: Sequence[Optional[torch.Tensor]],
        bits: Optional[torch.Tensor],
        aux: Any,
        norm: torch.Tensor,
        eps: float,
    ) -> Any:
        """Perturb in place and return the saved originals; leave weights untouched if ``norm`` is
        not finite (decided on the device). :meth:`prepare_perturb`, then :meth:`write_perturb`."""
        saved = self.prepare_perturb(layout, grads, bits, aux, norm, eps)
        self.write_perturb(saved)
        return saved

    def prepare_perturb(
        self,
        layout: ParamLayout,
        grads: Sequence[Optional[torch.Tensor]],
        bits: Optional[torch.Tensor],
        aux: Any,
        norm: torch.Tensor,
        eps: float,
    ) -> Any:
        """Check the arguments and allocate everything the perturbation needs, writing no weight; returns
        the ``saved`` object that :meth:`write_perturb` then fills. :meth:`restore` and
        :meth:`saved_originals` accept it at any point: before :meth:`write_perturb`, after it, or after
        it failed part way (an allocation, a kernel launch); restore then puts back exactly what was
        written over. A step is all or nothing because of this (see docs/guarantees.md)."""
        raise NotImplementedError

    def write_perturb(self, saved: Any) -> None:
        """Move the weights to ``w + e`` as prepared by :meth:`prepare_perturb` (once)."""
        raise NotImplementedError

    def restore(self, layout: ParamLayout, bits: Optional[torch.Tensor], aux: Any, saved: Any) -> None:
        raise NotImplementedError

    def saved_originals(
        self, layout: ParamLayout, bits: Optional[torch.Tensor], aux: Any, saved: Any
    ) -> Optional[list[Optional[torch.Tensor]]]:
        """The original values ``saved`` holds, in :func:`~fsam_kernels.reference.perturb_reference`'s
        format (``None`` when nothing was perturbed): what the optimizer writes back when the
        parameters' storage was replaced after ``perturb`` and :meth:`restore` no longer applies."""
        raise NotImplementedError

    def saved_nbytes(self, saved: Any) -> int:
        """Bytes held by a ``saved`` object (for memory accounting and tests)."""
        raise NotImplementedError


def tensors_nbytes(obj: Any) -> int:
    """Bytes of every tensor found in ``obj`` (nested lists, tuples, dicts, dataclasses such as a
    backend's mask aux)."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensors_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if isinstance(obj, dict):
        return sum(tensors_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensors_nbytes(v) for v in obj)
    return 0
