"""FSAM: sharpness-aware minimization with a Fisher mask, wrapping any torch optimizer."""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Optional

import torch

from . import checkpoint, options, param_groups, perturbation, settings, storage
from . import reference as ref
from .backends.base import Backend, tensors_nbytes
from .fsdp import ShardedParams
from .layout import CheckedGrads, ParamLayout, grad_signature, storage_signature
from .mask_policy import MaskPolicy, Scores
from .norm_check import NormCheck
from .perturbation import Perturbation
from .protocol import Phase, TwoStepOptimizer, _check_scaler, _hooked_step, outside_inference_mode
from .settings import FISHER_MODES


def _per_param(per_group: list[tuple[int, Any]], values: Optional[list] = None) -> list:
    """Expand per-group ``(count, value)`` pairs (or ``values``, one per group) to one entry per parameter."""
    out: list = []
    for (n, flag), value in zip(per_group, per_group if values is None else values):
        out += [flag if values is None else value] * n
    return out


class FSAM(TwoStepOptimizer):
    r"""Fisher-masked SAM (Zhong et al., EMNLP Findings 2022) around any ``torch.optim.Optimizer``.

    Each step perturbs only the ``1 - sparsity`` fraction of weights with the largest Fisher
    information (chosen globally over all masked parameters and refreshed every
    ``mask_update_interval`` steps) by :math:`\epsilon = \rho\,(g \odot m) / (\lVert g\rVert_2 + perturb\_eps)`,
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
        adaptive: ASAM's scale-invariant perturbation. ``rho`` and ``adaptive`` may be given by position,
            as davda54/sam's ``SAM(params, base_optimizer, rho, adaptive, **kwargs)``.
        perturb_eps: added to the gradient norm (> 0, and at least the smallest normal number of the
            norm's dtype, 1.1754944e-38 for fp32: below it 1/perturb_eps overflows). A zero norm
            perturbs by exactly 0. (Named as in pytorch_optimizer; ``eps`` is the base optimizer's.)
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"native"``.
        **base_optimizer_kwargs: passed to ``base_optimizer`` (``lr``, ``eps``, ``betas``,
            ``weight_decay``, ...).

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
        adaptive: bool = False,
        *,
        sparsity: float = 0.9,
        mask_update_interval: int = 100,
        fisher: str = "batch",
        structure: Optional[str] = None,
        preserve_zeros: Optional[bool] = None,
        keep_pruned: bool = False,
        perturb_eps: float = 1e-12,
        backend: str = "auto",
        **base_optimizer_kwargs: Any,
    ) -> None:
        preserve_zeros = settings.check_keep_pruned(keep_pruned, preserve_zeros)
        args = settings.check_constructor(rho, sparsity, mask_update_interval, fisher, structure, preserve_zeros,
                                          perturb_eps, backend, base_optimizer)
        rho = args["rho"]
        defaults = dict(rho=rho, adaptive=adaptive, fisher_mask=True, perturb=True, **base_optimizer_kwargs)
        super().__init__(params, defaults)  # validates each group in add_param_group
        if not any(g["perturb"] and g["params"] for g in self.param_groups):
            raise ValueError("FSAM: no parameter to perturb (every param group has perturb=False)")

        # From here on param_groups, state and defaults are the base optimizer's (see TwoStepOptimizer).
        self._share_base_optimizer(base_optimizer(self.param_groups, **base_optimizer_kwargs))

        # Users may change these between steps; _check_settings checks them again where a step reads them.
        self.sparsity, self.mask_update_interval = args["sparsity"], args["mask_update_interval"]
        self.fisher, self.perturb_eps = args["fisher"], args["perturb_eps"]
        settings.check_perturb_eps(self.perturb_eps, settings.norm_dtype_of(self.param_groups))

        self._step_count = 0  # completed (perturbed) first steps
        self._layout: Optional[ParamLayout] = None
        self._layout_key: Optional[tuple] = None
        self._checked_grads: Optional[tuple] = None  # (tensors_key, grad_signature) of the last checked gradients
        self._layout_rho: Optional[list[float]] = None  # each perturbed group's rho in self._layout
        self._pending: Optional[Perturbation] = None
        self._phase = Phase.IDLE
        self._closure_first = False  # step(closure) computes the first gradient too (torch.optim convention)
        self._norm_ahead: Optional[tuple] = None  # (layout, gradient signature, norm) of _gradient_is_zero
        self._norm_check = NormCheck()  # the norm's finiteness, read when the step needs the decision
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
        self._settle()
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
        params, masked, rho, adaptive = [], [], [], []  # per group here (a step reads every option once)
        for gi, group in enumerate(self.param_groups):
            param_groups.check_options(group, gi)
            if not group.get("perturb", True):
                continue
            group_params = group["params"]
            params += group_params
            masked.append((len(group_params), group.get("fisher_mask", True)))
            adaptive.append((len(group_params), group["adaptive"]))
            rho.append(group["rho"])
        if self._shards is not None:
            params = self._shards.local_tensors(params)
        # Addresses, dtypes, sizes and contiguity are part of the key: model.to(...) and p.data = ... keep the
        # Parameter objects. (A move to another device changes the addresses.)
        key = (tuple(map(id, params)), tuple(masked), tuple(adaptive), storage_signature(params),
               tuple(map(torch.Tensor.is_contiguous, params)))
        if self._layout is not None and key == self._layout_key:
            if rho != self._layout_rho:  # a rho schedule: same tensors, so the mask and its aux still apply
                self._layout = self._layout.with_rho(_per_param(masked, rho))
                self._layout_rho = rho
            return self._layout
        masked, adaptive, rho_per_group, rho = _per_param(masked), _per_param(adaptive), rho, _per_param(masked, rho)
        if not params:
            raise ValueError("FSAM: no parameter to perturb (every param group has perturb=False)")
        storage.check_disjoint(self.param_groups, param_groups.local_tensor)  # p.data = q.data may have made them share
        param_groups.check_perturbed(params)
        new_layout = ParamLayout(params, masked, rho, adaptive)
        old, self._layout, self._layout_key, self._layout_rho = self._layout, new_layout, key, rho_per_group
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
        """The gradients, checked once per :func:`~fsam_kernels.layout.grad_signature`: a step whose
        gradients have the last step's addresses, dtypes and sizes skips the checks."""
        if self._shards is not None:
            return param_groups.checked_grads(layout.params, self._shards)
        with torch._C.DisableTorchFunctionSubclass():  # Parameter.grad without the subclass dispatch
            grads = CheckedGrads([p.grad for p in layout.params])
        grads.signature = grad_signature(grads)
        grads.complete = grads.signature is not None and grads.signature[0] != "missing" and bool(grads)
        key = (layout.tensors_key, grads.signature)
        if grads.signature is None or key != self._checked_grads:
            param_groups.checked_grads(layout.params, None)
            self._checked_grads = key
        return grads

    def _has_any_grad(self) -> bool:
        return any(g is not None for g in self._grads(self._current_layout()))

    def _gradient_is_zero(self) -> bool:
        # Read through a pinned copy, as the step's own decision: waits for the norm, not a blocking op.
        layout = self._current_layout()
        grads = self._grads(layout)
        norm = self._norm_of(layout, grads)
        check = self.__dict__.setdefault("_zero_check", NormCheck())
        check.record(norm)
        zero = check.value() == 0
        # The first_step this step(closure) calls next perturbs with these same gradients: it takes this
        # norm instead of computing it again (step() drops it however it ends).
        signature = getattr(grads, "signature", None)
        self._norm_ahead = None if zero or signature is None else (layout, signature, norm)
        return zero

    @outside_inference_mode
    @torch.no_grad()
    def grad_norm(self) -> torch.Tensor:
        """The norm of the current gradients that :meth:`first_step` would perturb with (0-dim tensor)."""
        layout = self._current_layout()
        return self._norm_of(layout, self._grads(layout))

    def _norm_of(self, layout: ParamLayout, grads: list[Optional[torch.Tensor]]) -> torch.Tensor:
        norm = self._mask.backend_for(layout).grad_norm(layout, grads)
        return norm if self._shards is None else self._shards.global_norm(norm)

    # ------------------------------------------------------------------ mask
    @property
    def mask_update_due(self) -> bool:
        """Whether the next :meth:`first_step` rebuilds the mask (no mask yet, or the interval is up)."""
        interval = options.count(self.mask_update_interval, "mask_update_interval")
        return self._mask.bits is None or self._step_count % interval == 0

    @outside_inference_mode
    @torch.no_grad()
    def accumulate_fisher(self) -> None:
        """Add the current gradients, squared, to the fp32 Fisher accumulator.

        Call it after each backward pass on a Fisher sample or micro-batch; :meth:`update_mask` (or
        the next mask-update step) builds the mask from the accumulated sum and clears it.
        """
        self._require_idle("accumulate_fisher")
        layout = self._current_layout()
        self._mask.accumulate(layout, self._grads(layout))

    @outside_inference_mode
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

    @outside_inference_mode
    def masks(self) -> list[torch.Tensor]:
        """Current masks as bool tensors shaped like the masked parameters (param_group order)."""
        layout = self._current_layout()  # first: a changed masked set drops the mask
        if self._mask.bits is None:
            return []
        return ref.unpack_mask(layout, self._mask.bits)

    def memory_stats(self) -> dict[str, int]:
        """Bytes of every tensor FSAM itself holds (the base optimizer's state is not counted): ``mask``
        (packed, 1 bit per masked value, each masked tensor's bits starting on a 64-byte boundary: a
        tensor costs at least 64 bytes, so a model of 3-value tensors pays 21 B/param, not 0.125),
        ``mask_aux`` (the backend's data derived from the mask: native's per-512-bit-block int64 prefix
        counts, Triton's per-chunk prefix counts; none on torch), ``fisher`` (the fp32 accumulator),
        ``saved`` (the pending step's compact originals) and ``persistent`` (all but ``saved``). The
        backends' device tables (pointers, offsets; cached per set of tensors and shared by optimizers)
        are not counted."""
        stats = {"mask": tensors_nbytes(self._mask.bits), "mask_aux": tensors_nbytes(self._mask.aux),
                 "fisher": tensors_nbytes(self._mask.fisher), "saved": self._pending.nbytes() if self._pending else 0}
        stats["persistent"] = stats["mask"] + stats["mask_aux"] + stats["fisher"]
        stats["support"] = tensors_nbytes(self._mask.support)  # keep_pruned's, 1 bit per masked element
        stats["persistent"] += stats["support"]
        return stats


    # ------------------------------------------------------------------ the step protocol
    @_hooked_step
    @outside_inference_mode
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
        ``SKIPPED``), a warning is issued (on a step without a mask update, when the step reads the
        decision: at :meth:`second_step` or :meth:`restore`, so that no step waits for the device; see
        docs/backends.md), and the caller may skip the step or call
        :meth:`second_step`, which then steps the base optimizer from the unperturbed weights (with a
        scaler it lets the scaler back off instead).
        """
        if self.phase is Phase.PERTURBED:
            raise RuntimeError("first_step called twice: call second_step() or restore() before the next first_step()")
        _check_scaler(scaler)
        layout = self.check_options()
        if scaler is not None:
            scaler.unscale_(self)  # a no-op when the scaler is disabled
            self._set_aside_first_unscale(scaler)  # so that the caller may unscale_(self) the second pass
        grads = self._grads(layout)
        if not getattr(grads, "complete", False) and all(g is None for g in grads):
            raise RuntimeError(
                "first_step: no perturbed parameter has a gradient; call loss.backward() before first_step()"
            )
        if self.fisher == "empirical" and self._mask.bits is None and self._mask.fisher is None and layout.masked_index:
            raise RuntimeError(
                "first_step with fisher='empirical': no mask yet; call accumulate_fisher() after backward "
                "passes on Fisher samples, or update_mask(fisher=...), before the first step"
            )
        backend = self._mask.backend_for(layout)
        # step(closure)'s norm of these gradients (see _gradient_is_zero); not after a scaler's unscale_,
        # which changed them in place
        ahead, self._norm_ahead = self._norm_ahead, None
        if (scaler is None and ahead is not None and ahead[0] is layout
                and ahead[1] == getattr(grads, "signature", None)):
            norm = ahead[2]
        else:
            norm = self._norm_of(layout, grads)
        settings.check_perturb_eps(self.perturb_eps, norm.dtype)  # before anything changes
        perturbation.check_unclaimed(self, layout.params, lambda i: param_groups.perturbed_label(self.param_groups, i))
        # The skip decision (see fsam_kernels.norm_check): a mask update takes it now; a plain step leaves
        # it to its end, the kernels moving nothing on a non-finite norm meanwhile.
        self._norm_check.record(norm, quiet=scaler is not None)
        refresh = bool(layout.masked_index) and self.mask_update_due
        if refresh and self._settle():
            if zero_grad:
                self.zero_grad()
            return norm
        if refresh:
            self._mask.refresh(layout, grads, self.sparsity, self.fisher, mask_scores, scheduled=True)
        pending = Perturbation.prepare(backend, self._perturbation_plan(layout, backend), grads, norm,
                                       self.perturb_eps, self._layout_key[3])  # the storage signature of layout.params
        # Recorded before any weight moves: whatever stops the write (an interrupt, an allocation, a hook)
        # leaves a pending step that restore() undoes bit for bit; this method undoes it before raising.
        self._phase = Phase.PERTURBED
        self._pending = pending
        perturbation.register(self)
        try:
            pending.write()
            self._after_perturbation()
        except BaseException:
            self.restore()
            raise
        self._step_count += 1
        if zero_grad:
            self.zero_grad()
        return norm

    @outside_inference_mode
    @torch.no_grad()
    def restore(self) -> None:
        """Undo a pending perturbation, bit for bit. Idempotent; a no-op when nothing is perturbed."""
        self._settle()
        error = None
        pending = self._pending  # set only after first_step's phase: PERTURBED with none pending is possible
        if pending is not None:
            tensors = pending.layout.params if self._shards is None else self._shards.local_tensors(
                param_groups.perturbed_params(self.param_groups))
            error = pending.undo(tensors, self.param_groups)
        self._pending, self._phase = None, Phase.IDLE
        perturbation.unregister(self)
        self._after_restore()
        if error is not None:
            raise error

    def _settle(self) -> bool:
        """Take the skip decision first_step recorded, if not taken yet. A non-finite norm skips the step:
        the kernels moved nothing, so its pending perturbation is dropped. Returns whether this call skipped."""
        check = self._norm_check
        if not check.unread:
            return False
        if check.finite():
            if check.last == 0:
                warnings.warn("FSAM.first_step: the gradient is zero everywhere (zero_grad(set_to_none=False) after "
                              "the last backward?); the perturbation is zero, and a mask built now scores every "
                              "weight 0", RuntimeWarning, stacklevel=4)
            return False
        if not check.quiet:
            warnings.warn(f"FSAM.first_step: non-finite gradient norm ({check.last}); weights left unchanged "
                          "and the mask not updated", RuntimeWarning, stacklevel=4)
        if self._phase is Phase.PERTURBED:  # a plain step: it moved nothing
            self._pending = None
            perturbation.unregister(self)
            self._step_count -= 1
            self._after_restore()
        self._phase = Phase.SKIPPED
        return True

    def _snapshot(self) -> tuple:
        return self._step_count, self._mask.snapshot()

    def _rewind(self, state: tuple) -> None:
        self._step_count = state[0]
        self._mask.rewind(state[1])

    def _release(self) -> None:
        self._mask.release()

    # ------------------------------------------------------------------ checkpoints and copies
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus FSAM's ``"fsam"`` entry. torch.optim's state-dict
        pre-hooks and post-hooks registered on this optimizer fire as torch's ``state_dict`` fires them."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = checkpoint.state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    @outside_inference_mode
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of :meth:`state_dict` (this version's or version 1's). It must fit these
        parameters (shapes, mask, Fisher accumulator, ``structure`` and ``preserve_zeros``; see
        :func:`fsam_kernels.checkpoint.check_loadable`); if it does not, or loading fails, a ValueError
        names what differs and nothing has changed.

        A plain state dict of the base optimizer (no ``"fsam"`` entry) is a warm start: the base
        optimizer's state and hyperparameters are loaded (each group keeps its FSAM options), FSAM's own
        state starts afresh (step count 0, no mask: it is built at the next step, no Fisher
        accumulator). torch.optim's load-state-dict pre-hooks and post-hooks fire as torch fires them."""
        self._require_idle("load_state_dict")
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        checkpoint.load_state_dict(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _loaded(self, step_count: int) -> None:
        self._step_count, self._pending, self._phase = step_count, None, Phase.IDLE

    # Derived from the rest and rebuilt on first use (see checkpoint.copy_state).
    _REBUILT_ON_USE: tuple[str, ...] = ("_layout", "_layout_key", "_layout_rho", "_checked_grads")

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)``: everything a copy needs to continue
        exactly like this optimizer (mask, step count, Fisher accumulator, base optimizer state, closure
        mode, ...). Copy the model and the optimizer in one call (``copy.deepcopy((model, opt))``) so the
        copy's optimizer holds the copy's parameters."""
        return checkpoint.copy_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(checkpoint.renamed_state(state))  # copies pickled before perturb_eps still load

    @property
    def eps(self) -> float:
        """Deprecated alias of :attr:`perturb_eps` (``eps`` is the base optimizer's option now)."""
        settings.warn_eps_alias()
        return self.perturb_eps

    @eps.setter
    def eps(self, value: float) -> None:
        settings.warn_eps_alias()
        self.perturb_eps = value

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

