"""FSAM: sharpness-aware minimization with a Fisher mask, wrapping any torch optimizer."""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Optional

import torch

from . import checkpoint, options, param_groups, settings, storage
from . import reference as ref
from .backends.base import Backend, tensors_nbytes
from .fsdp import ShardedParams
from .layout import ParamLayout
from .mask_policy import MaskPolicy, Scores
from .perturbation import Perturbation
from .protocol import Phase, TwoStepOptimizer, _check_scaler
from .settings import FISHER_MODES


class FSAM(TwoStepOptimizer):
    r"""Fisher-masked SAM (Zhong et al., EMNLP Findings 2022) around any ``torch.optim.Optimizer``.

    Each step perturbs only the ``1 - sparsity`` fraction of weights with the largest Fisher
    information (chosen globally over all masked parameters and refreshed every
    ``mask_update_interval`` steps) by :math:`\epsilon = \rho\,(g \odot m) / (\lVert g\rVert_2 + eps)`,
    takes the caller's second gradient there, restores the weights bit for bit and steps the base
    optimizer with that gradient.

    Args:
        params: parameters or param groups. Group options: ``rho``, ``adaptive``,
            ``fisher_mask`` (False: the group is perturbed densely) and ``perturb`` (False: never
            perturbed, still stepped), plus any option of the base optimizer.
        base_optimizer: a ``torch.optim.Optimizer`` subclass, built on the same param groups.
        rho: neighbourhood size (> 0).
        sparsity: fraction of masked weights *not* perturbed, in [0, 1]. 0 is dense SAM, 1 the base
            optimizer.
        mask_update_interval: rebuild the mask every this many steps (the first step included).
        fisher: ``"batch"`` (Fisher = g*g of the step's first gradient) or ``"empirical"`` (an fp32
            accumulator filled by :meth:`accumulate_fisher` or a Fisher given to :meth:`update_mask`).
        structure: ``None`` (unstructured) or ``"N:M"`` (1 <= N < M <= 16, e.g. ``"2:4"``): keep the N
            largest-Fisher elements of every M consecutive ones along the last dimension of each masked
            weight with >= 2 dimensions and a last dimension divisible by M; other masked tensors fall
            back to the unstructured top-k at ``sparsity`` among themselves (see
            :mod:`fsam_kernels.structured`).
        preserve_zeros: never perturb weights that are exactly zero (mask intersected with the weights'
            support, read when the mask is built). Default: on with a ``structure`` or ``keep_pruned``,
            else off.
        keep_pruned: keep pruned weights pruned: the masked weights (>= 2 dimensions; not biases and
            norms) that are zero when the mask is built (and at construction) are set back to exactly
            zero after every base optimizer step, whatever the base optimizer (weight decay, momentum)
            and with a GradScaler or accumulated gradients. Needs ``preserve_zeros`` (so they are
            never perturbed either); the support is 1 bit per element, saved in checkpoints. See
            :mod:`fsam_kernels.sparsity`.
        adaptive: ASAM's scale-invariant perturbation.
        eps: added to the gradient norm.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        **base_optimizer_kwargs: passed to ``base_optimizer``.

    Numbers may be any real number (Python, numpy scalar, 0-dim tensor; not bool) and are stored as
    Python floats. Options may be changed between steps; each step checks what it reads and raises
    before anything changes. No two parameters may share memory (the same tensor twice, tied weights
    listed twice, overlapping views): refused with a ``ValueError`` naming both, at construction,
    ``add_param_group`` and the next step after ``p.data = q.data``. If the parameters' storage is
    replaced between the two passes (``model.to(torch.float64)``, ``p.data = ...``), the restore
    writes the originals into the new storage, cast to its dtype. ``structure``, ``preserve_zeros``
    and ``backend`` are fixed at construction (they choose how the mask is built and by what).

    The step protocol: :meth:`first_step` (phase ``PERTURBED``, or ``SKIPPED`` on a non-finite gradient
    norm), the caller's second backward, :meth:`second_step` (or :meth:`restore`); :meth:`step` runs it
    with a closure. A ``torch.amp.GradScaler`` is an argument of all three (see :mod:`fsam_kernels.amp`).
    Integrations running their own passes wrap them in :meth:`undo_on_error`. Subclasses change a step
    through the hooks at the end of the class, never by overriding the protocol's methods.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        rho: float = 0.05,
        *,
        sparsity: float = 0.9,
        mask_update_interval: int = 100,
        fisher: str = "batch",
        structure: Optional[str] = None,
        preserve_zeros: Optional[bool] = None,
        keep_pruned: bool = False,
        adaptive: bool = False,
        eps: float = 1e-12,
        backend: str = "auto",
        **base_optimizer_kwargs: Any,
    ) -> None:
        preserve_zeros = settings.check_keep_pruned(keep_pruned, preserve_zeros)
        args = settings.check_constructor(rho, sparsity, mask_update_interval, fisher, structure, preserve_zeros,
                                          eps, backend, base_optimizer)
        rho = args["rho"]
        defaults = dict(rho=rho, adaptive=adaptive, fisher_mask=True, perturb=True, **base_optimizer_kwargs)
        super().__init__(params, defaults)  # validates each group in add_param_group
        if not any(g["perturb"] and g["params"] for g in self.param_groups):
            raise ValueError("FSAM: no parameter to perturb (every param group has perturb=False)")

        self.base_optimizer = base_optimizer(self.param_groups, **base_optimizer_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

        # Users may change these between steps; _check_settings checks them again where a step reads them.
        self.sparsity, self.mask_update_interval = args["sparsity"], args["mask_update_interval"]
        self.fisher, self.eps = args["fisher"], args["eps"]

        self._step_count = 0  # completed (perturbed) first steps
        self._layout: Optional[ParamLayout] = None
        self._layout_key: Optional[tuple] = None
        self._pending: Optional[Perturbation] = None
        self._phase = Phase.IDLE
        self._closure_first = False  # step(closure) computes the first gradient too (torch.optim convention)
        # FSDP2 (DTensor) parameters: the layout holds their local shards; norm and mask are global.
        self._shards = ShardedParams.detect(p for g in self.param_groups for p in g["params"])
        self._mask = MaskPolicy(backend, self._shards, args["structure"], args["preserve_zeros"],
                                self._FULL_MASK_AT_ZERO_SPARSITY, keep_pruned=keep_pruned)
        if keep_pruned:  # the support is read now (and again whenever the mask is built)
            try:
                self._current_layout()
            except ValueError:
                pass
        if backend != "auto":  # a requested backend that cannot run raises here, not in the middle of training
            try:
                layout = self._current_layout()
            except ValueError:
                return
            self._mask.backend_for(layout)

    @property
    def structure(self) -> Optional[tuple[int, int]]:
        """``(N, M)`` of an N:M mask, or ``None``."""
        return self._mask.structure

    @property
    def preserve_zeros(self) -> bool:
        return self._mask.preserve_zeros

    @property
    def keep_pruned(self) -> bool:
        return self._mask.keep_pruned

    @property
    def backend(self) -> str:
        """Name of the backend in use (resolved on first use when ``backend="auto"``)."""
        return self._mask.backend_for(self._current_layout()).name

    @property
    def step_count(self) -> int:
        return self._step_count

    # ------------------------------------------------------------------ options and layout
    def check_options(self) -> ParamLayout:
        """Check every option a step reads; first_step does it itself, what acts before it (a closure's
        first pass, a scaler's unscale_) calls this first, so that a bad option changes nothing.
        Returns the current layout (building it checks each param group's options)."""
        self._check_settings()
        return self._current_layout()

    def _current_layout(self) -> ParamLayout:
        param_groups.adopt_added_groups(self)
        params, masked, rho, adaptive = [], [], [], []
        for gi, group in enumerate(self.param_groups):
            param_groups.check_options(group, gi)
            if not group.get("perturb", True):
                continue
            group_params = group["params"]
            n = len(group_params)
            params += group_params
            masked += [group.get("fisher_mask", True)] * n
            rho += [group["rho"]] * n
            adaptive += [group["adaptive"]] * n
        if self._shards is not None:
            params = self._shards.local_tensors(params)
        # Addresses, dtypes, shapes and strides are part of the key: model.to(...) and p.data = ... keep the
        # Parameter objects. (A move to another device changes the addresses.)
        key = (tuple(map(id, params)), tuple(masked), tuple(adaptive), storage.signature(params),
               tuple([p.stride() for p in params]))
        if self._layout is not None and key == self._layout_key:
            if rho != self._layout.rho:  # a rho schedule: same tensors, so the mask and its aux still apply
                self._layout = self._layout.with_rho(rho)
            return self._layout
        if not params:
            raise ValueError("FSAM: no parameter to perturb (every param group has perturb=False)")
        storage.check_disjoint(self.param_groups, param_groups.local_tensor)  # p.data = q.data may have made them share
        param_groups.check_perturbed(params)
        new_layout = ParamLayout(params, masked, rho, adaptive)
        old, self._layout, self._layout_key = self._layout, new_layout, key
        self._mask.follow_layout(old, new_layout)
        return new_layout

    def add_param_group(self, param_group: dict) -> None:
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        param_groups.check_options(param_group, len(self.param_groups))
        param_group["params"] = param_groups.checked_params(param_group, len(self.param_groups))
        storage.check_disjoint([*self.param_groups, param_group], param_groups.local_tensor)
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # called by torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    def _grads(self, layout: ParamLayout) -> list[Optional[torch.Tensor]]:
        return param_groups.checked_grads(layout.params, self._shards)

    def _has_any_grad(self) -> bool:
        return any(g is not None for g in self._grads(self._current_layout()))

    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The norm of the current gradients that :meth:`first_step` would perturb with (0-dim tensor)."""
        layout = self._current_layout()
        norm = self._mask.backend_for(layout).grad_norm(layout, self._grads(layout))
        return norm if self._shards is None else self._shards.global_norm(norm)

    # ------------------------------------------------------------------ mask
    @property
    def mask_update_due(self) -> bool:
        """Whether the next :meth:`first_step` rebuilds the mask (no mask yet, or the interval is up)."""
        interval = options.count(self.mask_update_interval, "mask_update_interval")
        return self._mask.bits is None or self._step_count % interval == 0

    @torch.no_grad()
    def accumulate_fisher(self) -> None:
        """Add the current gradients, squared, to the fp32 Fisher accumulator.

        Call it after each backward pass on a Fisher sample or micro-batch; :meth:`update_mask` (or
        the next mask-update step) builds the mask from the accumulated sum and clears it.
        """
        self._require_idle("accumulate_fisher")
        layout = self._current_layout()
        self._mask.accumulate(layout, self._grads(layout))

    @torch.no_grad()
    def update_mask(self, fisher: Optional[Scores] = None) -> None:
        """Rebuild the mask now.

        ``fisher`` may give the Fisher scores directly (a list following the masked parameters in
        param_group order, or a dict parameter -> tensor, e.g. from :func:`empirical_fisher`).
        Without it the accumulator of :meth:`accumulate_fisher` is used and then freed (one that is
        not finite is discarded and an error raised); in ``fisher="batch"`` mode with an empty
        accumulator the current gradients are used. See :mod:`fsam_kernels.mask_policy`.
        """
        self._require_idle("update_mask")
        self._check_settings()
        layout = self._current_layout()
        self._mask.refresh(layout, self._grads(layout), self.sparsity, self.fisher, fisher, scheduled=False)

    def masks(self) -> list[torch.Tensor]:
        """Current masks as bool tensors shaped like the masked parameters (param_group order)."""
        if self._mask.bits is None:
            return []
        return ref.unpack_mask(self._current_layout(), self._mask.bits)

    def memory_stats(self) -> dict[str, int]:
        """Bytes FSAM itself holds (the base optimizer's state is not counted)."""
        stats = {"mask": tensors_nbytes(self._mask.bits), "mask_aux": tensors_nbytes(self._mask.aux),
                 "fisher": tensors_nbytes(self._mask.fisher), "saved": self._pending.nbytes() if self._pending else 0}
        stats["persistent"] = stats["mask"] + stats["mask_aux"] + stats["fisher"]
        stats["support"] = tensors_nbytes(self._mask.support)  # keep_pruned's, 1 bit per masked element
        stats["persistent"] += stats["support"]
        return stats

    # ------------------------------------------------------------------ the step protocol
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, mask_scores: Optional[Scores] = None,
                   scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
        """Move the weights to ``w + e``. Returns the gradient norm (a 0-dim tensor).

        ``mask_scores`` (optional, same forms as ``update_mask(fisher=...)``) replaces this step's
        Fisher scores when the mask is rebuilt — e.g. squares of gradients averaged over replicas, so
        every replica builds the same mask (see :mod:`fsam_kernels.distributed`). ``scaler``: the
        gradients are loss-scaled; ``scaler.unscale_(self)`` first, and an overflow is routine (no
        warning).

        If that norm is not finite nothing changes (no mask update, no perturbation; phase
        ``SKIPPED``), a warning is issued, and the caller may skip the step or call
        :meth:`second_step`, which then steps the base optimizer from the unperturbed weights (with a
        scaler it lets the scaler back off instead).
        """
        if self._phase is Phase.PERTURBED:
            raise RuntimeError("first_step called twice: call second_step() or restore() before the next first_step()")
        _check_scaler(scaler)
        layout = self.check_options()
        if scaler is not None:
            scaler.unscale_(self)  # a no-op when the scaler is disabled
        grads = self._grads(layout)
        if all(g is None for g in grads):
            raise RuntimeError(
                "first_step: no perturbed parameter has a gradient; call loss.backward() before first_step()"
            )
        if self.fisher == "empirical" and self._mask.bits is None and self._mask.fisher is None and layout.masked_index:
            raise RuntimeError(
                "first_step with fisher='empirical': no mask yet; call accumulate_fisher() after backward "
                "passes on Fisher samples, or update_mask(fisher=...), before the first step"
            )
        backend = self._mask.backend_for(layout)
        norm = backend.grad_norm(layout, grads)
        if self._shards is not None:
            norm = self._shards.global_norm(norm)
        if not math.isfinite(norm.item()):  # one sync; torch.isfinite would add 4 kernel launches
            if scaler is None:
                warnings.warn(f"FSAM.first_step: non-finite gradient norm ({float(norm)}); weights left unchanged "
                              "and the mask not updated", RuntimeWarning, stacklevel=2)
            self._phase = Phase.SKIPPED
            if zero_grad:
                self.zero_grad()
            return norm
        if layout.masked_index and self.mask_update_due:
            self._mask.refresh(layout, grads, self.sparsity, self.fisher, mask_scores, scheduled=True)
        self._pending = Perturbation.apply(backend, self._perturbation_plan(layout, backend), grads, norm, self.eps,
                                           self._layout_key[3])  # the storage signature of layout.params
        self._phase = Phase.PERTURBED
        self._step_count += 1
        self._after_perturbation()
        if zero_grad:
            self.zero_grad()
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a pending perturbation, bit for bit. Idempotent; a no-op when nothing is perturbed."""
        error = None
        if self._phase is Phase.PERTURBED:
            tensors = self._pending.layout.params if self._shards is None else self._shards.local_tensors(
                param_groups.perturbed_params(self.param_groups))
            error = self._pending.undo(tensors, self.param_groups)
        self._pending, self._phase = None, Phase.IDLE
        self._after_restore()
        if error is not None:
            raise error

    def _snapshot(self) -> tuple:
        return self._step_count, self._mask.snapshot()

    def _rewind(self, state: tuple) -> None:
        self._step_count = state[0]
        self._mask.rewind(state[1])

    def _release(self) -> None:
        self._mask.release()

    # ------------------------------------------------------------------ checkpoints and copies
    def state_dict(self) -> dict[str, Any]:
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of :meth:`state_dict` (this version's or version 1's). It must fit these
        parameters (shapes, mask, Fisher accumulator; see :func:`fsam_kernels.checkpoint.check_loadable`);
        if it does not, or loading fails, a ValueError names what differs and nothing has changed."""
        self._require_idle("load_state_dict")
        checkpoint.load_state_dict(self, state_dict)

    def _loaded(self, step_count: int) -> None:
        self._step_count, self._pending, self._phase = step_count, None, Phase.IDLE

    # Derived from the rest and rebuilt on first use (see checkpoint.copy_state).
    _REBUILT_ON_USE: tuple[str, ...] = ("_layout", "_layout_key")

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)``: everything a copy needs to continue
        exactly like this optimizer (mask, step count, Fisher accumulator, base optimizer state, closure
        mode, ...). Copy the model and the optimizer in one call (``copy.deepcopy((model, opt))``) so the
        copy's optimizer holds the copy's parameters."""
        return checkpoint.copy_state(self)

    # ------------------------------------------------------------------ hooks for the SAM family
    _FULL_MASK_AT_ZERO_SPARSITY = False  # the mask route at sparsity 0 (see MaskPolicy)

    def _check_settings(self) -> None:
        """Check the optimizer-wide options a step reads (users may change them between steps), before
        anything changes. Subclasses add their own options."""
        param_groups.adopt_added_groups(self)  # first: subclasses check every group's options too
        settings.check_step_settings(self)

    def _has_fsam_options(self, group: dict) -> bool:
        return group.keys() >= self.defaults.keys()

    def _after_base_step(self) -> None:
        if self._mask.keep_pruned:
            self._mask.keep_support(self._current_layout())

    def _perturbation_plan(self, layout: ParamLayout, backend: Backend) -> tuple[ParamLayout, Any, Any]:
        """The (layout, packed mask, aux) this step perturbs with: ESAM and GSAM change the mask or the
        per-tensor rho of one step here without touching the Fisher mask."""
        return layout, self._mask.bits, self._mask.aux

