"""The Fisher mask of one optimizer: the packed mask, its backend data, the Fisher accumulator, and how
the mask is built.

:class:`MaskPolicy` chooses its route once, at construction, from what never changes afterwards:

* ``structure="N:M"`` or ``preserve_zeros``: :func:`fsam_kernels.structured.build_mask` (its top-k
  global over the ranks for FSDP2-sharded parameters);
* FSDP2-sharded parameters: the global radix-histogram top-k (:class:`fsam_kernels.fsdp.ShardedParams`);
* otherwise the backend's global top-k; for ESAM and GSAM at ``sparsity=0`` (``full_at_zero_sparsity``)
  the mask that keeps every element, without a selection.

Where the scores come from is decided in one place, :meth:`MaskPolicy.refresh`:

1. scores given by the caller (``update_mask(fisher=...)``, ``first_step(mask_scores=...)``);
2. the accumulator of :meth:`MaskPolicy.accumulate` (freed once used), except at a scheduled refresh
   in ``fisher="batch"`` mode, which follows the step's gradient;
3. in ``fisher="batch"`` mode, the squares of the current gradients (a missing gradient scores 0).

A non-finite accumulator (e.g. an overflowed fp16 gradient was accumulated) is never used: it is
discarded and the mask left as it is. That is an error when the caller needs a new mask (an explicit
``update_mask()``, or no mask yet); at a scheduled refresh with a mask to keep, a ``RuntimeWarning``,
and the step goes on with the kept mask.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from . import sparsity, structured
from .backends import get_backend
from .backends.base import Backend
from .layout import ParamLayout

Scores = Union[Sequence[torch.Tensor], Mapping[torch.Tensor, torch.Tensor]]


class MaskPolicy:
    """Owns the mask (``bits``, packed), its backend data (``aux``), the fp32 Fisher accumulator
    (``fisher``, ``fisher_count``) and the backend (``backend``, resolved from ``requested``)."""

    def __init__(
        self,
        requested: str,
        shards: Any,
        structure: Optional[tuple[int, int]],
        preserve_zeros: bool,
        full_at_zero_sparsity: bool,
        keep_pruned: bool = False,
    ) -> None:
        self.requested = requested
        self.shards = shards
        self.structure = structure
        self.preserve_zeros = preserve_zeros
        # keep_pruned: the weights' packed support, read with the mask (see fsam_kernels.sparsity), and
        # the positions of the masked weights holding a zero.
        self.keep_pruned = keep_pruned
        self.support: Optional[torch.Tensor] = None
        self.support_positions: tuple[int, ...] = ()
        if structure is not None or preserve_zeros:
            self.route = "structured"  # sharded or not (see structured.build_mask)
        elif shards is not None:
            self.route = "sharded"
        else:
            self.route = "top-k or all" if full_at_zero_sparsity else "top-k"
        self.backend: Optional[Backend] = None
        self._backend_serves: object = None  # the tensors_key of the layout ``backend`` was checked for
        self._masked_set: Optional[list[tuple[int, int]]] = None  # of the layout followed (see follow_layout)
        self.bits: Optional[torch.Tensor] = None
        self.aux: Any = None
        self.fisher: Optional[list[torch.Tensor]] = None
        self.fisher_count = 0
        self._fisher_shared = False  # a step's snapshot holds ``fisher``: copy it before adding to it

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # Backends keep device tables (pointers, offsets) in ``aux``: a copy that took them over would
        # write into the original's weights. Both are rebuilt on first use.
        return dict(self.__dict__, backend=None, aux=None)

    # ------------------------------------------------------------------ backend and layout
    def backend_for(self, layout: ParamLayout) -> Backend:
        if self.backend is not None and self._backend_serves is layout.tensors_key:
            return self.backend  # checked for these tensors already (asked several times a step)
        if self.backend is None or not self.backend.supports(layout.device):
            self.backend = get_backend(self.requested, layout.device)
            if self.bits is not None:
                self.aux = self.backend.mask_aux(layout, self.bits)
        self._backend_serves = layout.tensors_key
        return self.backend

    def follow_layout(self, old: Optional[ParamLayout], new: ParamLayout) -> None:
        """The parameters' layout changed: the mask follows it, or is dropped when the masked set changed."""
        masked_set, self._masked_set = self._masked_set, self._masked_tensors(new)
        if old is not None and masked_set != self._masked_set:
            # The masked set changed (add_param_group, fisher_mask moved to other parameters, p.data = ... of
            # another size): the old mask no longer applies.
            self.bits, self.aux, self.fisher, self.fisher_count = None, None, None, 0
            self.support = None
        elif old is not None and old.device != new.device:
            # The model moved (model.to(device)): the mask and the accumulator follow it.
            if self.bits is not None:
                self.bits = self.bits.to(new.device)
            if self.fisher is not None:
                self.fisher = [f.to(new.device) for f in self.fisher]
            if self.support is not None:
                self.support = self.support.to(new.device)
            if self.requested == "auto":
                self.backend = None
        if self.keep_pruned and self.support is None:
            self.read_support(new)  # the first layout's, or the new masked set's
        if self.bits is not None and self.backend is not None:
            # Backend data derived from the mask depends on the layout (dtypes, offsets).
            self.aux = self.backend_for(new).mask_aux(new, self.bits)

    def _masked_tensors(self, layout: ParamLayout) -> list[tuple[int, int]]:
        """Which parameters are masked, and the sizes the layout recorded for them (not the live tensors':
        the old layout holds the same Parameter objects, resized by ``p.data = ...``)."""
        owner = (lambda t: t) if self.shards is None else self.shards.param_of  # FSDP2: the DTensor, not its view
        return [(id(owner(layout.params[i])), layout.numel[i]) for i in layout.masked_index]

    def load(self, layout: ParamLayout, bits: Optional[torch.Tensor], fisher: Optional[list[torch.Tensor]],
             fisher_count: int) -> None:
        """Take a checked mask and accumulator (from a checkpoint)."""
        aux = None if bits is None else self.backend_for(layout).mask_aux(layout, bits)
        self.bits, self.aux, self.fisher, self.fisher_count = bits, aux, fisher, fisher_count
        self._fisher_shared = False

    # ------------------------------------------------------------------ keep_pruned
    def read_support(self, layout: ParamLayout) -> None:
        self.support, self.support_positions = sparsity.support_bits(layout)

    def load_support(self, layout: ParamLayout, support: torch.Tensor) -> None:
        """Take a checked support (from a checkpoint)."""
        self.support, self.support_positions = support, sparsity.pruned_positions(layout, support)

    def keep_support(self, layout: ParamLayout) -> None:
        """Set the masked weights outside the support back to zero (after the base optimizer's step)."""
        if self.support is not None:
            sparsity.keep_support_(layout, self.support, self.support_positions)

    # ------------------------------------------------------------------ undoing a step
    def snapshot(self) -> tuple:
        """What a step may replace; the accumulator is copied before the next addition to it while a
        snapshot may still be rewound to (see :meth:`release`)."""
        self._fisher_shared = self.fisher is not None
        return self.bits, self.aux, self.fisher, self.fisher_count, self.support, self.support_positions

    def rewind(self, state: tuple) -> None:
        self.bits, self.aux, self.fisher, self.fisher_count = state[:4]
        self.support, self.support_positions = state[4:]
        self._fisher_shared = False

    def release(self) -> None:
        """No snapshot will be rewound to any more."""
        self._fisher_shared = False

    # ------------------------------------------------------------------ Fisher information
    @torch.no_grad()
    def accumulate(self, layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> None:
        pairs = [(j, grads[i]) for j, i in enumerate(layout.masked_index) if grads[i] is not None]
        if not pairs:
            raise RuntimeError("accumulate_fisher: no masked parameter has a gradient; call backward() first")
        if self.fisher is None:
            self.fisher = [torch.zeros_like(p, dtype=torch.float32) for p in layout.masked_params]
        elif self._fisher_shared:
            self.fisher = [f.clone() for f in self.fisher]
            self._fisher_shared = False
        self.backend_for(layout).fisher_accumulate([self.fisher[j] for j, _ in pairs], [g for _, g in pairs])
        self.fisher_count += 1

    @torch.no_grad()
    def refresh(
        self,
        layout: ParamLayout,
        grads: Sequence[Optional[torch.Tensor]],
        sparsity: float,
        fisher_mode: str,
        given: Optional[Scores] = None,
        *,
        scheduled: bool,
    ) -> None:
        """Rebuild the mask from the scores' source (see the module docstring). ``scheduled``: the
        refresh of a mask-update ``first_step`` (else an explicit ``update_mask``)."""
        what = "first_step" if scheduled else "update_mask"
        if given is not None:
            self._build(layout, self._given_scores(given, layout), sparsity, square=False)
        elif self.fisher is not None and not (scheduled and fisher_mode == "batch"):
            accum = self.fisher
            finite = self._finite_everywhere(accum, layout)
            if finite:
                self._build(layout, accum, sparsity, square=False)
            self.fisher, self.fisher_count = None, 0  # used or discarded, never used twice
            if not finite and scheduled and self.bits is not None:
                warnings.warn("FSAM.first_step: the accumulated Fisher is not finite (a gradient overflowed?); "
                              "discarded, the mask is kept", RuntimeWarning, stacklevel=4)
            elif not finite:
                raise RuntimeError(
                    f"{what}: the accumulated Fisher is not finite (a gradient overflowed?); it was discarded"
                    f"{' and there is no mask to perturb with' if scheduled else ''}; the mask and the weights "
                    "were left unchanged; accumulate_fisher() again")
        elif fisher_mode == "batch":
            if all(g is None for g in grads):
                raise RuntimeError(f"{what}: no gradient and no accumulated Fisher to build the mask from")
            # A parameter without a gradient has zero Fisher information this step.
            scores = [grads[i] if grads[i] is not None else torch.zeros_like(layout.params[i])
                      for i in layout.masked_index]
            # At a scheduled refresh the gradient norm was finite, hence every gradient.
            if not scheduled and not self._finite_everywhere(scores, layout):
                raise ValueError(f"{what}: the gradients hold NaN or inf; the mask was left unchanged")
            self._build(layout, scores, sparsity, square=True)
        elif not scheduled:  # at a scheduled refresh with nothing accumulated the mask is kept
            raise RuntimeError(
                "update_mask: no Fisher information; call accumulate_fisher() after backward passes on "
                "Fisher samples, or pass fisher=empirical_fisher(...)"
            )

    def _given_scores(self, given: Scores, layout: ParamLayout) -> list[torch.Tensor]:
        """Check Fisher scores given by the caller; fp32, contiguous, one per masked parameter. Sharded,
        every rank raises when one rank's shards are refused (the others would wait in the selection's
        collectives)."""
        if self.shards is None:
            return self._checked_given(given, layout)
        return self.shards.on_every_rank(lambda: self._checked_given(self.shards.local_fisher(given), layout),
                                         "update_mask", layout.device)

    def _checked_given(self, given: Scores, layout: ParamLayout) -> list[torch.Tensor]:
        masked = layout.masked_params
        if isinstance(given, Mapping):
            missing = [tuple(p.shape) for p in masked if p not in given]
            if missing:
                raise ValueError(f"update_mask: fisher has no entry for masked parameters of shapes {missing}")
            values = [given[p] for p in masked]
        else:
            values = list(given)
            if len(values) != len(masked):
                raise ValueError(f"update_mask: expected fisher to hold {len(masked)} tensors (one per masked parameter), got {len(values)}")
        out = []
        for j, (f, p) in enumerate(zip(values, masked)):
            if not isinstance(f, torch.Tensor) or f.shape != p.shape:
                raise ValueError(f"update_mask: fisher[{j}] must be a tensor of shape {tuple(p.shape)}, got {getattr(f, 'shape', type(f))}")
            if not f.is_floating_point() or bool((f < 0).any()) or not bool(torch.isfinite(f).all()):
                raise ValueError(f"update_mask: fisher[{j}] must hold finite, non-negative floating-point values")
            # + 0.0 turns -0.0 into +0.0: keys compare as int32 bit patterns.
            out.append(f.detach().to(device=p.device, dtype=torch.float32).contiguous() + 0.0)
        return out

    def _finite_everywhere(self, tensors: Sequence[torch.Tensor], layout: ParamLayout) -> bool:
        """Whether every element of ``tensors`` is finite, on every rank when sharded (so all ranks take
        the same branch); one host synchronisation."""
        nonempty = [t for t in tensors if t.numel()]
        largest = (torch.stack([n.float() for n in torch._foreach_norm(nonempty, float("inf"))]).max() if nonempty
                   else torch.zeros((), device=layout.device))
        if self.shards is not None:
            largest = self.shards.global_norm(largest)  # non-finite on any rank -> on every rank
        return math.isfinite(largest.item())

    # ------------------------------------------------------------------ the routes
    def _build(self, layout: ParamLayout, scores: Sequence[torch.Tensor], sparsity: float, square: bool) -> None:
        """``square``: the scores are gradients, whose squares are the Fisher scores."""
        backend = self.backend_for(layout)
        bits = self._ROUTES[self.route](self, backend, layout, scores, sparsity, square)
        self.bits, self.aux = bits, backend.mask_aux(layout, bits)
        if self.keep_pruned:
            self.read_support(layout)  # the weights that are zero when the mask is built stay zero

    def _select_top_k(self, backend: Backend, layout: ParamLayout, scores, sparsity: float, square: bool):
        return backend.select_mask(layout, scores, layout.k_for(sparsity), square)

    def _select_top_k_or_all(self, backend: Backend, layout: ParamLayout, scores, sparsity: float, square: bool):
        if sparsity == 0.0:  # every element is kept: no selection needed
            return layout.full_mask()
        return self._select_top_k(backend, layout, scores, sparsity, square)

    def _select_structured(self, backend: Backend, layout: ParamLayout, scores, sparsity: float, square: bool):
        return structured.build_mask(backend, layout, scores, square, sparsity, self.structure, self.preserve_zeros,
                                     self.shards)

    def _select_sharded(self, backend: Backend, layout: ParamLayout, scores, sparsity: float, square: bool):
        return self.shards.select_mask(backend, layout, scores, sparsity, square)

    _ROUTES = {"top-k": _select_top_k, "top-k or all": _select_top_k_or_all, "structured": _select_structured,
               "sharded": _select_sharded}
