"""FSAM: sharpness-aware minimization with a Fisher mask, wrapping any torch optimizer."""
from __future__ import annotations

import bisect
import itertools
import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import options, storage, structured
from . import reference as ref
from .backends import backend_names, get_backend, requested_backend
from .backends.base import Backend, tensors_nbytes
from .fsdp import ShardedParams, _dtensor_type
from .layout import MASK_ALIGN_BITS, ParamLayout, align_up, full_mask

FISHER_MODES = ("batch", "empirical")
_STATE_VERSION = 2  # 2 added every parameter's shape
_LOADABLE_VERSIONS = (1, 2)


def _local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``p``'s values in this process (its local shard when FSDP2 shards it)."""
    dtensor = _dtensor_type()
    return p.to_local() if dtensor is not None and isinstance(p, dtensor) else p


class FSAM(torch.optim.Optimizer):
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
            support, read when the mask is built). Default: on with a ``structure``, else off.
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
    writes the originals into the new storage, cast to its dtype.
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
        adaptive: bool = False,
        eps: float = 1e-12,
        backend: str = "auto",
        **base_optimizer_kwargs: Any,
    ) -> None:
        rho = options.positive(rho, "rho")
        sparsity = options.fraction(sparsity, "sparsity")
        mask_update_interval = options.count(mask_update_interval, "mask_update_interval")
        if fisher not in FISHER_MODES:
            raise ValueError(f"Invalid fisher: {fisher!r}; expected one of {FISHER_MODES}")
        nm = structured.parse_structure(structure)
        if preserve_zeros is not None and not isinstance(preserve_zeros, bool):
            raise TypeError(f"Invalid preserve_zeros: {preserve_zeros!r}; expected None, True or False")
        eps = options.positive(eps, "eps")  # > 0: a zero gradient would give 0/0
        if not isinstance(backend, str) or backend not in ("auto", *backend_names()):
            raise ValueError(f"Invalid backend: {backend!r}; expected 'auto' or one of {backend_names()}")
        requested_backend(backend)  # a misspelt FSAM_BACKEND fails here, not at the first step
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                f"Invalid base_optimizer: {base_optimizer!r}; expected a torch.optim.Optimizer subclass "
                "(the class, e.g. torch.optim.AdamW, not an instance)"
            )
        defaults = dict(rho=rho, adaptive=adaptive, fisher_mask=True, perturb=True, **base_optimizer_kwargs)
        super().__init__(params, defaults)  # validates each group in add_param_group
        if not any(g["perturb"] and g["params"] for g in self.param_groups):
            raise ValueError("FSAM: no parameter to perturb (every param group has perturb=False)")

        self.base_optimizer = base_optimizer(self.param_groups, **base_optimizer_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

        # Users may change these between steps; _check_settings checks them again where a step reads them.
        self.sparsity = sparsity
        self.mask_update_interval = mask_update_interval
        self.fisher = fisher
        self.structure = nm  # (N, M) or None
        self.preserve_zeros = (nm is not None) if preserve_zeros is None else preserve_zeros
        self.eps = eps
        self.backend_name = backend

        self._step_count = 0  # completed (perturbed) first steps
        self._layout: Optional[ParamLayout] = None
        self._layout_key: Optional[tuple] = None
        self._backend: Optional[Backend] = None
        self._bits: Optional[torch.Tensor] = None  # packed mask
        self._aux: Any = None  # backend data derived from the mask
        self._fisher_accum: Optional[list[torch.Tensor]] = None
        self._fisher_count = 0
        self._saved: Any = None
        self._pending: Any = None  # (layout, bits, aux) of the pending perturbation, for restore
        self._perturbed_by: Optional[Backend] = None  # the backend that made ``_saved``
        self._perturbed_storage: Optional[tuple] = None  # storage.signature of the perturbed tensors
        self._phase = "idle"  # idle | perturbed | skipped
        self._closure_first = False  # step(closure) computes the first gradient too (torch.optim convention)
        # FSDP2 (DTensor) parameters: the layout holds their local shards; norm and mask are global.
        self._shards = ShardedParams.detect(p for g in self.param_groups for p in g["params"])
        if self._shards is not None and (self.structure is not None or self.preserve_zeros):
            raise ValueError("FSAM: structure and preserve_zeros are not supported with FSDP2-sharded parameters")
        self._resolve_backend_early()

    # ------------------------------------------------------------------ layout and backend
    def _resolve_backend_early(self) -> None:
        # An explicitly requested backend that cannot run raises here, not in the middle of training.
        if self.backend_name != "auto":
            try:
                layout = self._current_layout()
            except ValueError:
                return
            self._backend_for(layout)

    def _check_group(self, group: dict, gi: int) -> None:
        """Check the FSAM options of ``param_groups[gi]`` (the numbers stored as Python floats): at
        add_param_group, and again at every read, since users may change them (e.g. a rho schedule)."""
        where = f" in param_groups[{gi}]"
        group["rho"] = options.positive(group["rho"], "rho", where)
        for flag in ("adaptive", "fisher_mask", "perturb"):
            if flag in group:
                options.flag(group[flag], flag, where)

    def _check_settings(self) -> None:
        """Check the optimizer-wide options a step reads (users may change them between steps), before
        anything changes."""
        self._adopt_groups_added_to_base()  # first: subclasses check every group's options too
        self.sparsity = options.fraction(self.sparsity, "sparsity")
        self.mask_update_interval = options.count(self.mask_update_interval, "mask_update_interval")
        self.eps = options.positive(self.eps, "eps")
        if self.fisher not in FISHER_MODES:
            raise ValueError(f"Invalid fisher: {self.fisher!r}; expected one of {FISHER_MODES}")

    def _check_options(self) -> None:
        """Check every option a step reads. first_step does it itself; what acts before it (step's
        closure, amp's unscale_) calls this first, so a bad option changes nothing."""
        self._check_settings()
        self._current_layout()  # checks each param group's options

    def _current_layout(self) -> ParamLayout:
        self._adopt_groups_added_to_base()
        params, masked, rho, adaptive = [], [], [], []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
            if not group.get("perturb", True):
                continue
            for p in group["params"]:
                params.append(p)
                masked.append(group.get("fisher_mask", True))
                rho.append(group["rho"])
                adaptive.append(group["adaptive"])
        if self._shards is not None:
            params = self._shards.local_tensors(params)
        # Addresses, dtypes, shapes and strides are part of the key: model.to(...) and p.data = ... keep the
        # Parameter objects. (A move to another device changes the addresses.)
        key = (tuple(id(p) for p in params), tuple(masked), tuple(adaptive), storage.signature(params),
               tuple(p.stride() for p in params))
        if self._layout is not None and key == self._layout_key:
            if rho != self._layout.rho:  # a rho schedule: same tensors, so the mask and its aux still apply
                self._layout = self._layout.with_rho(rho)
            return self._layout
        if not params:
            raise ValueError("FSAM: no parameter to perturb (every param group has perturb=False)")
        storage.check_disjoint(self.param_groups, _local_tensor)  # p.data = q.data may have made them share
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"FSAM: all perturbed parameters must be on one device, got {sorted(map(str, devices))}")
        for p in params:
            if not p.is_contiguous():
                raise ValueError(
                    f"FSAM: parameters must be contiguous, got one of shape {tuple(p.shape)} with strides "
                    f"{p.stride()} (e.g. channels_last); keep parameters in the default memory format"
                )
        new_layout = ParamLayout(params, masked, rho, adaptive)
        old = self._layout
        if old is not None and [p.numel() for p in old.masked_params] != [p.numel() for p in new_layout.masked_params]:
            # The masked set changed (e.g. add_param_group): the old mask no longer applies.
            self._bits, self._aux, self._fisher_accum, self._fisher_count = None, None, None, 0
        elif old is not None and old.device != new_layout.device:
            # The model moved (model.to(device)): FSAM's own state follows it.
            if self._bits is not None:
                self._bits = self._bits.to(new_layout.device)
            if self._fisher_accum is not None:
                self._fisher_accum = [f.to(new_layout.device) for f in self._fisher_accum]
            if self.backend_name == "auto":
                self._backend = None
        self._layout, self._layout_key = new_layout, key
        if self._bits is not None and self._backend is not None:
            # Backend data derived from the mask depends on the layout (dtypes, offsets).
            self._aux = self._backend_for(new_layout).mask_aux(new_layout, self._bits)
        return new_layout

    def _backend_for(self, layout: ParamLayout) -> Backend:
        if self._backend is None or not self._backend.supports(layout.device):
            self._backend = get_backend(self.backend_name, layout.device)
            if self._bits is not None:
                self._aux = self._backend.mask_aux(layout, self._bits)
        return self._backend

    @property
    def backend(self) -> str:
        """Name of the backend in use (resolved on first use when ``backend="auto"``)."""
        return self._backend_for(self._current_layout()).name

    def add_param_group(self, param_group: dict) -> None:
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        where = f"param_groups[{len(self.param_groups)}]"
        self._check_group(param_group, len(self.param_groups))
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(f"Invalid params in {where}: a set has no order; use a list")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        param_group["params"] = params
        for pi, p in enumerate(params):
            if p.is_complex():
                raise TypeError(
                    f"Invalid params: {where}['params'][{pi}] is complex ({p.dtype}); FSAM supports real "
                    "floating-point parameters only"
                )
            if not p.is_floating_point():
                raise TypeError(f"Invalid params: {where}['params'][{pi}] has dtype {p.dtype}; expected a floating-point parameter")
            if p.device.type == "meta":  # model.to_empty(...) replaces meta parameters: this one would never train
                raise ValueError(f"Invalid params: {where}['params'][{pi}] is on the meta device (no data); create the "
                                 "optimizer after materializing the model (e.g. model.to_empty(device=...))")
        storage.check_disjoint([*self.param_groups, param_group], _local_tensor)
        if hasattr(self, "base_optimizer"):
            self.base_optimizer.add_param_group(param_group)
        else:  # called by torch.optim.Optimizer.__init__
            super().add_param_group(param_group)

    def _has_fsam_options(self, group: dict) -> bool:
        return all(k in group for k in self.defaults)

    def _adopt_groups_added_to_base(self) -> None:
        """Groups added with ``base_optimizer.add_param_group`` (which knows none of FSAM's options;
        the two optimizers share ``param_groups``) get FSAM's defaults and checks here, at the first
        read, as if added with :meth:`add_param_group`; an invalid one raises and stays as it was."""
        groups = self.param_groups
        for gi, group in enumerate(groups):
            if self._has_fsam_options(group):
                continue
            checked = dict(group)
            del groups[gi]
            try:
                self.add_param_group(checked)  # appended at the end
            except BaseException:
                groups.insert(gi, group)
                raise
            groups.pop()
            group.update(checked)  # the same dict, back in its place: references to it stay valid
            groups.insert(gi, group)

    # ------------------------------------------------------------------ gradients
    def _grads(self, layout: ParamLayout) -> list[Optional[torch.Tensor]]:
        grads = []
        for p in layout.params:
            g = p.grad if self._shards is None else self._shards.local_grad(p)
            if g is not None and (g.is_sparse or g.layout != torch.strided):
                raise ValueError(
                    f"FSAM: sparse gradients are not supported (parameter of shape {tuple(p.shape)} has a "
                    f"{g.layout} gradient); use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            if g is not None and (g.shape != p.shape or g.device != p.device):
                raise ValueError(
                    f"FSAM: a gradient of shape {tuple(g.shape)} on {g.device} does not match its parameter "
                    f"({tuple(p.shape)} on {p.device})"
                )
            grads.append(g)
        return grads

    @property
    def mask_update_due(self) -> bool:
        """Whether the next :meth:`first_step` rebuilds the mask (no mask yet, or the interval is up)."""
        interval = options.count(self.mask_update_interval, "mask_update_interval")
        return self._bits is None or self._step_count % interval == 0

    # ------------------------------------------------------------------ mask
    @torch.no_grad()
    def _build_mask(self, layout: ParamLayout, scores: Sequence[torch.Tensor], square: bool) -> None:
        backend = self._backend_for(layout)
        if self._shards is not None:
            bits = self._shards.select_mask(backend, layout, scores, self.sparsity, square)
        elif self.structure is not None or self.preserve_zeros:
            bits = structured.build_mask(
                backend, layout, scores, square, self.sparsity, self.structure, self.preserve_zeros
            )
        else:
            bits = backend.select_mask(layout, scores, layout.k_for(self.sparsity), square)
        self._bits, self._aux = bits, backend.mask_aux(layout, bits)

    @torch.no_grad()
    def accumulate_fisher(self) -> None:
        """Add the current gradients, squared, to the fp32 Fisher accumulator.

        Call it after each backward pass on a Fisher sample or micro-batch; :meth:`update_mask` (or
        the next mask-update step) builds the mask from the accumulated sum and clears it.
        """
        self._require_idle("accumulate_fisher")
        layout = self._current_layout()
        masked = layout.masked_params
        grads = self._grads(layout)
        pairs = [(j, grads[i]) for j, i in enumerate(layout.masked_index) if grads[i] is not None]
        if not pairs:
            raise RuntimeError("accumulate_fisher: no masked parameter has a gradient; call backward() first")
        if self._fisher_accum is None:
            self._fisher_accum = [torch.zeros_like(p, dtype=torch.float32) for p in masked]
        self._backend_for(layout).fisher_accumulate([self._fisher_accum[j] for j, _ in pairs], [g for _, g in pairs])
        self._fisher_count += 1

    @torch.no_grad()
    def update_mask(
        self, fisher: Union[None, Sequence[torch.Tensor], Mapping[torch.Tensor, torch.Tensor]] = None
    ) -> None:
        """Rebuild the mask now.

        ``fisher`` may give the Fisher scores directly (a list following the masked parameters in
        param_group order, or a dict parameter -> tensor, e.g. from :func:`empirical_fisher`).
        Without it the accumulator of :meth:`accumulate_fisher` is used and then freed; in
        ``fisher="batch"`` mode with an empty accumulator the current gradients are used.
        """
        self._require_idle("update_mask")
        self._check_settings()
        layout = self._current_layout()
        masked = layout.masked_params
        if fisher is not None:
            if self._shards is not None:
                fisher = self._shards.local_fisher(fisher)
            scores = self._fisher_from_argument(fisher, masked)
            self._build_mask(layout, scores, square=False)
        elif self._fisher_accum is not None:
            if not self._finite_everywhere(self._fisher_accum):
                self._fisher_accum, self._fisher_count = None, 0
                raise RuntimeError(
                    "update_mask: the accumulated Fisher is not finite (a gradient overflowed?); it was discarded "
                    "and the mask left unchanged; accumulate_fisher() again")
            self._build_mask(layout, self._fisher_accum, square=False)
            self._fisher_accum, self._fisher_count = None, 0
        elif self.fisher == "batch":
            grads = self._grads(layout)
            if all(g is None for g in grads):
                raise RuntimeError("update_mask: no gradient and no accumulated Fisher to build the mask from")
            scores = [self._score_or_zero(layout, i, grads) for i in layout.masked_index]
            if not self._finite_everywhere(scores):
                raise ValueError("update_mask: the gradients hold NaN or inf; the mask was left unchanged")
            self._build_mask(layout, scores, square=True)
        else:
            raise RuntimeError(
                "update_mask: no Fisher information; call accumulate_fisher() after backward passes on "
                "Fisher samples, or pass fisher=empirical_fisher(...)"
            )

    @staticmethod
    def _fisher_from_argument(fisher, masked: list[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(fisher, Mapping):
            missing = [tuple(p.shape) for p in masked if p not in fisher]
            if missing:
                raise ValueError(f"update_mask: fisher has no entry for masked parameters of shapes {missing}")
            values = [fisher[p] for p in masked]
        else:
            values = list(fisher)
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

    def _finite_everywhere(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether every element of ``tensors`` is finite, on every rank when sharded (so all ranks take
        the same branch); one host synchronisation."""
        nonempty = [t for t in tensors if t.numel()]
        largest = (torch.stack([n.float() for n in torch._foreach_norm(nonempty, float("inf"))]).max() if nonempty
                   else torch.zeros((), device=self._layout.device))
        if self._shards is not None:
            largest = self._shards.global_norm(largest)  # non-finite on any rank -> on every rank
        return math.isfinite(largest.item())

    @staticmethod
    def _score_or_zero(layout: ParamLayout, i: int, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        # A parameter without a gradient has zero Fisher information this step.
        g = grads[i]
        return g if g is not None else torch.zeros_like(layout.params[i])

    # ------------------------------------------------------------------ the two steps
    def _require_idle(self, what: str) -> None:
        if self._phase == "perturbed":
            raise RuntimeError(f"{what}: the weights are perturbed; call second_step() or restore() first")

    @torch.no_grad()
    def first_step(
        self,
        zero_grad: bool = False,
        *,
        mask_scores: Union[None, Sequence[torch.Tensor], Mapping[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """Move the weights to ``w + e``. Returns the gradient norm (a 0-dim tensor).

        ``mask_scores`` (optional, same forms as ``update_mask(fisher=...)``) replaces this step's
        Fisher scores when the mask is rebuilt — e.g. squares of gradients averaged over replicas, so
        every replica builds the same mask (see :mod:`fsam_kernels.distributed`).

        If that norm is not finite nothing changes (no mask update, no perturbation), a warning is
        issued, and the caller may skip the step or call :meth:`second_step`, which then steps the base
        optimizer from the unperturbed weights.
        """
        if self._phase == "perturbed":
            raise RuntimeError("first_step called twice: call second_step() or restore() before the next first_step()")
        self._check_settings()
        layout = self._current_layout()
        backend = self._backend_for(layout)
        grads = self._grads(layout)
        if all(g is None for g in grads):
            raise RuntimeError(
                "first_step: no perturbed parameter has a gradient; call loss.backward() before first_step()"
            )
        if self.fisher == "empirical" and self._bits is None and self._fisher_accum is None and layout.masked_index:
            raise RuntimeError(
                "first_step with fisher='empirical': no mask yet; call accumulate_fisher() after backward "
                "passes on Fisher samples, or update_mask(fisher=...), before the first step"
            )
        norm = backend.grad_norm(layout, grads)
        if self._shards is not None:
            norm = self._shards.global_norm(norm)
        if not math.isfinite(norm.item()):  # one sync; torch.isfinite would add 4 kernel launches
            warnings.warn(
                f"FSAM.first_step: non-finite gradient norm ({float(norm)}); weights left unchanged and the "
                "mask not updated",
                RuntimeWarning,
                stacklevel=2,
            )
            self._phase = "skipped"
            if zero_grad:
                self.zero_grad()
            return norm
        if layout.masked_index and self.mask_update_due:
            if mask_scores is not None:
                if self._shards is not None:
                    mask_scores = self._shards.local_fisher(mask_scores)
                self._build_mask(layout, self._fisher_from_argument(mask_scores, layout.masked_params), square=False)
            elif self.fisher == "batch":
                self._build_mask(layout, [self._score_or_zero(layout, i, grads) for i in layout.masked_index], square=True)
            elif self._fisher_accum is not None:
                finite = self._finite_everywhere(self._fisher_accum)
                if finite:
                    self._build_mask(layout, self._fisher_accum, square=False)
                self._fisher_accum, self._fisher_count = None, 0
                if not finite and self._bits is None:
                    raise RuntimeError("first_step: the accumulated Fisher is not finite (a gradient overflowed?) "
                                       "and there is no mask to perturb with; it was discarded and the weights left "
                                       "unchanged; accumulate_fisher() again")
                if not finite:
                    warnings.warn("FSAM.first_step: the accumulated Fisher is not finite (a gradient overflowed?); "
                                  "discarded, the mask is kept", RuntimeWarning, stacklevel=2)
        self._pending = self._perturbation_plan(layout, backend)
        p_layout, p_bits, p_aux = self._pending
        self._saved = backend.perturb(p_layout, grads, p_bits, p_aux, norm, self.eps)
        self._perturbed_by, self._perturbed_storage = backend, self._layout_key[3]  # that of p_layout.params
        self._phase = "perturbed"
        self._step_count += 1
        if zero_grad:
            self.zero_grad()
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Undo a pending perturbation, bit for bit. Idempotent; a no-op when nothing is perturbed."""
        moved: list[int] = []
        if self._phase == "perturbed":
            p_layout, p_bits, p_aux = self._pending
            backend, before = self._perturbed_by, self._perturbed_storage
            tensors = p_layout.params if self._shards is None else self._shards.local_tensors(self._perturbed_params())
            if storage.signature(tensors) == before:
                backend.restore(p_layout, p_bits, p_aux, self._saved)
            else:  # storage replaced since first_step (model.to(...), p.data = ...): the backend's restore
                # would write into the old one; put the originals into the current one instead
                originals = backend.saved_originals(p_layout, p_bits, p_aux, self._saved)
                if originals is not None:
                    moved = storage.restore_into(tensors, p_layout, p_bits, originals, [b[2] for b in before])
        self._saved, self._pending, self._perturbed_by, self._perturbed_storage = None, None, None, None
        self._phase = "idle"
        if moved:
            changes = ", ".join(
                f"{self._perturbed_label(i)} from {tuple(before[i][2])} to {tuple(tensors[i].shape)}" for i in moved)
            raise ValueError(
                f"restore: parameters changed shape between first_step and restore ({changes}); their perturbed "
                "values could not be undone and they still hold w + e (every other parameter was restored)")

    def _perturbed_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups if g.get("perturb", True) for p in g["params"]]

    def _perturbed_label(self, i: int) -> str:
        """Where the ``i``-th perturbed parameter is listed: ``param_groups[g]['params'][j]``."""
        for gi, group in enumerate(self.param_groups):
            if group.get("perturb", True):
                if i < len(group["params"]):
                    return f"param_groups[{gi}]['params'][{i}]"
                i -= len(group["params"])
        raise IndexError(i)

    def _perturbation_plan(self, layout: ParamLayout, backend: Backend) -> tuple[ParamLayout, Any, Any]:
        """The (layout, packed mask, aux) this step perturbs with. Subclasses (ESAM, GSAM) change the
        mask or the per-tensor rho of one step here without touching the Fisher mask."""
        return layout, self._bits, self._aux

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights and step the base optimizer with the current (perturbed-point) gradient."""
        if self._phase == "idle":
            raise RuntimeError("second_step called without a first_step")
        self.restore()
        self.base_optimizer.step()
        self._opt_called = True  # tells an attached LR scheduler that the optimizer stepped
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One FSAM step with ``closure`` (a function that computes the loss, calls ``backward()`` and
        returns the loss).

        davda54/sam style, when the caller has already done the first backward: ``closure`` does the
        second forward/backward (gradients zeroed before it) and its loss is returned. The
        ``torch.optim`` convention (e.g. PyTorch Lightning's automatic optimization, whose closure
        zeroes the gradients itself), when no perturbed parameter has a gradient at the first such
        call (``zero_grad()`` sets them to ``None``): the closure runs first for the gradient at ``w``
        too, and that first loss is returned; once taken, this way sticks for later steps, whose
        leftover gradients (from ``w + e``) are then not mistaken for a first pass. A first closure that
        computes no gradient (e.g. a skipped batch) skips the step and returns ``None``.

        When the first gradient's norm is not finite the step is skipped (weights, base optimizer and
        mask untouched, one warning) and ``None`` is returned. If the closure raises, the weights, the
        mask, the step count and the Fisher accumulator are as before the call and the gradients are
        cleared; a closure that computes no gradient at ``w + e`` raises the same way."""
        if closure is None:
            raise RuntimeError(
                "FSAM.step needs a closure that recomputes the loss and calls backward(); or call "
                "first_step() and second_step() yourself"
            )
        if self._phase == "perturbed":
            raise RuntimeError("first_step called twice: call second_step() or restore() before the next first_step()")
        self._check_options()
        state = self._step_state()
        closure_first = self._closure_gives_first_pass()
        first_loss = None
        if closure_first:
            first_loss = self._first_pass_from(closure)
            if not self._has_any_grad():
                return None
        self.first_step(zero_grad=True)
        if self._phase == "skipped":  # non-finite gradient norm: no second pass, no base step
            self._phase = "idle"
            return None
        try:
            with torch.enable_grad():
                loss = closure()
            self._require_second_gradient("FSAM.step")
        except BaseException:
            self._abandon_step(state)
            raise
        self.second_step()
        return first_loss if closure_first else loss

    # Pieces of step(closure), shared with fsam_kernels.amp.step.
    def _closure_gives_first_pass(self) -> bool:
        """Whether the closure must compute the gradient at ``w`` too: no perturbed parameter has a
        gradient (the torch.optim convention). Sticky, see :meth:`step`."""
        if not self._closure_first and all(g is None for g in self._grads(self._current_layout())):
            self._closure_first = True
        return self._closure_first

    def _first_pass_from(self, closure: Callable[[], Any]) -> Any:
        try:
            with torch.enable_grad():
                return closure()
        except BaseException:
            self.zero_grad()  # no partial gradient may pass for a first pass later
            raise

    def _has_any_grad(self) -> bool:
        return any(g is not None for g in self._grads(self._current_layout()))

    def _step_state(self) -> tuple:
        """What first_step replaces (it changes none of it in place): enough to undo a failed step."""
        return (self._step_count, self._bits, self._aux, self._fisher_accum, self._fisher_count)

    def _rewind(self, state: tuple) -> None:
        self._step_count, self._bits, self._aux, self._fisher_accum, self._fisher_count = state

    def _abandon_step(self, state: tuple) -> None:
        """Undo a step whose second pass failed: the weights restored (never left perturbed), the
        gradients cleared and the mask, step count and Fisher accumulator as in ``state``."""
        self.restore()
        self.zero_grad()
        self._rewind(state)

    def _require_second_gradient(self, what: str) -> None:
        # The gradients were cleared before the second pass: none now means the closure never ran
        # backward(), and stepping on would count a step that changed nothing.
        if not self._has_any_grad():
            raise RuntimeError(
                f"{what}: the closure computed no gradient at the perturbed weights (did it call "
                "loss.backward()?); the weights were restored and the step not taken"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ inspection
    def masks(self) -> list[torch.Tensor]:
        """Current masks as bool tensors shaped like the masked parameters (param_group order)."""
        if self._bits is None:
            return []
        return ref.unpack_mask(self._current_layout(), self._bits)

    @property
    def step_count(self) -> int:
        return self._step_count

    def memory_stats(self) -> dict[str, int]:
        """Bytes FSAM itself holds (the base optimizer's state is not counted)."""
        saved = 0
        if self._saved is not None and self._backend is not None:
            saved = self._backend.saved_nbytes(self._saved)
        stats = {
            "mask": tensors_nbytes(self._bits),
            "mask_aux": tensors_nbytes(self._aux),
            "fisher": tensors_nbytes(self._fisher_accum),
            "saved": saved,
        }
        stats["persistent"] = stats["mask"] + stats["mask_aux"] + stats["fisher"]
        return stats

    # ------------------------------------------------------------------ copies
    # Derived from the rest and rebuilt on first use. Backends keep device tables (pointers, offsets)
    # keyed by a layout: a copy that took them over would write into the original's weights.
    _REBUILT_ON_USE: tuple[str, ...] = ("_backend", "_aux", "_layout", "_layout_key", "_perturbed_by",
                                        "_perturbed_storage")
    # torch.optim.Optimizer drops its hooks from copies; an LR scheduler's wrapper of this instance's
    # ``step`` would step the original.
    _NOT_COPIED = (
        "step", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    )

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)``: everything a copy needs to continue
        exactly like this optimizer (mask, step count, Fisher accumulator, base optimizer state, closure
        mode, ...). Copy the model and the optimizer in one call (``copy.deepcopy((model, opt))``) so the
        copy's optimizer holds the copy's parameters."""
        if self._phase == "perturbed":
            raise RuntimeError(
                f"{type(self).__name__}: cannot copy or pickle the optimizer while the weights are perturbed; "
                "call second_step() or restore() first"
            )
        if self._shards is not None:
            raise RuntimeError(
                f"{type(self).__name__}: an optimizer of FSDP2-sharded parameters cannot be copied or pickled; "
                "checkpoint it with fsam_kernels.fsdp.fsam_state_dict and torch.distributed.checkpoint"
            )
        state = {k: v for k, v in self.__dict__.items() if k not in self._NOT_COPIED}
        state.update(dict.fromkeys(self._REBUILT_ON_USE))
        return state  # torch.optim.Optimizer.__setstate__ adds empty hooks

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self._phase == "perturbed":
            raise RuntimeError("state_dict: the weights are perturbed; call second_step() or restore() first")
        sd = self.base_optimizer.state_dict()
        layout = self._current_layout()
        sd["fsam"] = {
            "version": _STATE_VERSION,
            "step_count": self._step_count,
            "mask": None if self._bits is None else self._bits.clone(),
            "fisher_accum": None if self._fisher_accum is None else [f.clone() for f in self._fisher_accum],
            "fisher_count": self._fisher_count,
            "masked_numel": [layout.numel[i] for i in layout.masked_index],
            # Every parameter's shape (version 2), so that a checkpoint never loads into other shapes.
            "param_shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
        }
        return sd

    def _check_loadable(self, state_dict: dict[str, Any], fsam: dict[str, Any]) -> None:
        """Raise ValueError, naming what differs, if the checkpoint does not fit these parameters.

        Version 2 checkpoints carry every parameter's shape. Version 1 ones carry the masked sizes
        only; their base optimizer state is checked instead: a state tensor with as many elements as
        its parameter but another shape (e.g. Adam's ``exp_avg`` of an (8, 2) weight for a (2, 8) one)
        was made for another parameter. Dtypes may differ: the base optimizer casts its state to the
        parameters' dtypes (as torch does) and FSAM's mask and Fisher keep their own.
        """
        saved_groups, groups = state_dict.get("param_groups", []), self.param_groups
        if len(saved_groups) != len(groups):
            raise ValueError(f"load_state_dict: the checkpoint has {len(saved_groups)} param groups, this optimizer {len(groups)}")
        for gi, (sg, g) in enumerate(zip(saved_groups, groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(f"load_state_dict: param_groups[{gi}] holds {len(g['params'])} parameters, the "
                                 f"checkpoint's {len(sg['params'])}")

        def where(gi: int, i: int) -> str:
            names = groups[gi].get("param_names")
            return f"param_groups[{gi}]['params'][{i}]" + (f" ({names[i]})" if names else "")

        if fsam["version"] >= 2:
            shapes = fsam.get("param_shapes")
            if not isinstance(shapes, list) or [len(s) for s in shapes] != [len(g["params"]) for g in groups]:
                raise ValueError("load_state_dict: the checkpoint's 'param_shapes' do not follow its param groups")
            for gi, (g, group_shapes) in enumerate(zip(groups, shapes)):
                for i, (p, shape) in enumerate(zip(g["params"], group_shapes)):
                    if tuple(shape) != tuple(p.shape):
                        raise ValueError(f"load_state_dict: {where(gi, i)} has shape {tuple(p.shape)}, the "
                                         f"checkpoint's {tuple(shape)}")
        else:  # only version 2 says which shapes its state was made for (some optimizers keep flat state)
            positions = [(gi, i) for gi, g in enumerate(groups) for i in range(len(g["params"]))]
            saved_ids = dict(zip((k for sg in saved_groups for k in sg["params"]), positions))
            for key, entry in state_dict.get("state", {}).items():
                if key not in saved_ids or not isinstance(entry, Mapping):
                    continue
                gi, i = saved_ids[key]
                p = groups[gi]["params"][i]
                for name, value in entry.items():
                    if (isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == p.numel()
                            and value.shape != p.shape):
                        raise ValueError(f"load_state_dict: the checkpoint's state {name!r} of {where(gi, i)} has "
                                         f"shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")

        masked_at = [
            (gi, i) for gi, (sg, g) in enumerate(zip(saved_groups, groups))
            if sg.get("perturb", True) and sg.get("fisher_mask", True) for i in range(len(g["params"]))
        ]
        if not any(sg.get("perturb", True) and g["params"] for sg, g in zip(saved_groups, groups)):
            raise ValueError("load_state_dict: the checkpoint's param groups perturb no parameter (perturb=False everywhere)")
        masked = [groups[gi]["params"][i] for gi, i in masked_at]
        if self._shards is not None:
            masked = self._shards.local_tensors(masked)
        numels = [p.numel() for p in masked]
        if list(fsam["masked_numel"]) != numels:
            raise ValueError("load_state_dict: the masked parameters' sizes differ from the checkpoint's "
                             f"({numels} here, {list(fsam['masked_numel'])} there)")
        for name in ("step_count", "fisher_count"):
            if isinstance(fsam[name], bool) or not isinstance(fsam[name], int) or fsam[name] < 0:
                raise ValueError(f"load_state_dict: the checkpoint's {name} is {fsam[name]!r}; expected an int >= 0")
        bits = fsam["mask"]
        if bits is not None:
            valid = full_mask(numels)
            if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.shape != valid.shape:
                got = f"{bits.dtype} of shape {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits).__name__
                raise ValueError(f"load_state_dict: the checkpoint's mask is {got}; expected the packed uint8 mask of "
                                 f"{valid.numel()} bytes")
            stray = (bits.cpu() & ~valid).nonzero()
            if stray.numel():
                ends = list(itertools.accumulate(align_up(n, MASK_ALIGN_BITS) // 8 for n in numels))
                j = bisect.bisect_right(ends, int(stray[0]))  # the masked tensor owning that byte
                raise ValueError(f"load_state_dict: the checkpoint's mask sets padding bits past the {numels[j]} "
                                 f"elements of masked tensor {j} ({where(*masked_at[j])}); it is corrupt")
        acc = fsam["fisher_accum"]
        if acc is not None:
            if len(acc) != len(masked):
                raise ValueError(f"load_state_dict: the checkpoint's Fisher accumulator holds {len(acc)} tensors, "
                                 f"expected {len(masked)} (one per masked parameter)")
            for j, (a, p) in enumerate(zip(acc, masked)):
                if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.shape != p.shape:
                    got = f"{a.dtype} of shape {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                    raise ValueError(f"load_state_dict: the checkpoint's Fisher accumulator for {where(*masked_at[j])} "
                                     f"is {got}; expected floating point of shape {tuple(p.shape)}")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of :meth:`state_dict` (this version's or version 1's). It must fit these
        parameters (shapes, mask, Fisher accumulator; see ``_check_loadable``); if it does not, or
        loading fails, a ValueError names what differs and nothing has changed."""
        self._require_idle("load_state_dict")
        state_dict = dict(state_dict)
        fsam = state_dict.pop("fsam", None)
        if fsam is None:
            raise ValueError("load_state_dict: not an FSAM state dict (no 'fsam' entry)")
        if fsam.get("version") not in _LOADABLE_VERSIONS:
            raise ValueError(f"load_state_dict: unsupported FSAM state version {fsam.get('version')!r}; "
                             f"expected one of {_LOADABLE_VERSIONS}")
        self._check_loadable(state_dict, fsam)  # before anything changes
        # torch's load_state_dict replaces the state and groups objects, leaving the old ones intact:
        # whatever fails from here on is undone by putting them (and FSAM's attributes) back.
        before = (dict(self.__dict__), self.base_optimizer.state, self.base_optimizer.param_groups)
        try:
            self._load_checked(state_dict, fsam)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before[0])
            self.base_optimizer.state, self.base_optimizer.param_groups = before[1], before[2]
            raise

    def _load_checked(self, state_dict: dict[str, Any], fsam: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # torch's load_state_dict replaces the groups list: share it again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        layout = self._current_layout()
        # Masks and accumulators keep their own dtypes (uint8 / fp32), never the parameters'.
        bits = fsam["mask"]
        bits = None if bits is None else bits.to(device=layout.device, dtype=torch.uint8).clone()
        acc = fsam["fisher_accum"]
        acc = None if acc is None else [
            a.to(device=p.device, dtype=torch.float32).clone() for a, p in zip(acc, layout.masked_params)
        ]
        aux = None if bits is None else self._backend_for(layout).mask_aux(layout, bits)
        self._bits, self._aux, self._fisher_accum = bits, aux, acc
        self._fisher_count = fsam["fisher_count"]
        self._step_count = fsam["step_count"]
        self._saved, self._phase = None, "idle"
