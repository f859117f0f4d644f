"""The SAM family on FSAM's machinery: SAM/ASAM, ESAM and GSAM, each optionally Fisher-masked.

All three are :class:`~fsam_kernels.FSAM` subclasses: the same backends and kernels, the same packed
mask and compact saved originals, the same two-step protocol (``first_step`` / ``second_step``, or
``step(closure)``), ``state_dict`` and argument checks. ``sparsity > 0`` on ESAM or GSAM gives the
Fisher-masked F-ESAM / F-GSAM of the FSAM paper (its Table 6); ``structure="N:M"`` works too.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from . import options
from . import reference as ref
from .backends.base import Backend, tensors_nbytes
from .layout import ParamLayout
from .optimizer import FSAM
from .protocol import outside_inference_mode

__all__ = ["SAM", "ESAM", "GSAM"]


class SAM(FSAM):
    """Sharpness-aware minimization (Foret et al., 2021) with davda54/sam's semantics; ASAM with
    ``adaptive=True``. FSAM without a mask: every perturbed group is dense, no Fisher is computed and no
    mask is stored. In fp32 and fp64 with backend="torch" the trajectory is bit-identical to davda54/sam's loop.
    davda54/sam's constructor works as is: ``SAM(params, base_optimizer, rho, adaptive, **kwargs)``, every
    keyword but ``perturb_eps`` and ``backend`` (``eps``, ``lr``, ``betas``, ...) going to the base optimizer.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        perturb_eps: float = 1e-12,
        backend: str = "auto",
        **base_optimizer_kwargs: Any,
    ) -> None:
        mask_options = sorted(set(base_optimizer_kwargs) & {"sparsity", "structure", "preserve_zeros", "fisher", "mask_update_interval", "keep_pruned"})
        if mask_options:
            raise TypeError(f"SAM has no Fisher mask, so it takes no {', '.join(mask_options)}; use FSAM for that")
        super().__init__(
            params, base_optimizer, rho, adaptive, sparsity=0.0, perturb_eps=perturb_eps, backend=backend,
            **base_optimizer_kwargs,
        )
        self.defaults["fisher_mask"] = False

    def add_param_group(self, param_group: dict) -> None:
        if param_group.get("fisher_mask", False):
            raise ValueError("Invalid param group: SAM has no Fisher mask (fisher_mask=True); use FSAM for that")
        param_group["fisher_mask"] = False
        super().add_param_group(param_group)


class _MaskedFamily(FSAM):
    """What ESAM and GSAM share: at ``sparsity=0`` (the vanilla methods) the Fisher mask keeps every
    element, so it is built without a selection."""

    _FULL_MASK_AT_ZERO_SPARSITY = True


class ESAM(_MaskedFamily):
    r"""Efficient SAM (Du et al., ICLR 2022), Fisher-masked when ``sparsity > 0`` (F-ESAM).

    * **Stochastic weight perturbation** (``beta``): each step perturbs each masked element with
      probability ``beta``, scaled by ``1 / beta`` so the expected perturbation is SAM's
      (:math:`\mathbb{E}[m_i / \beta] = 1`; the paper's :math:`1 - \beta` is a typo its authors
      confirmed). The random bits are drawn per masked tensor in param_group order as
      ``torch.rand(numel, generator=generator, device=...) < beta``, packed like the Fisher mask and
      ANDed with it byte by byte, so the same perturb kernels run. Groups with ``fisher_mask=False``
      are perturbed densely, without SWP. ``beta=1`` turns SWP off.
    * **Sharpness-sensitive data selection** (``gamma``): the second backward uses only the
      ``max(1, round(gamma * B))`` samples of the batch whose loss rose most under the perturbation
      (ties: lowest index). ``gamma=1`` turns it off.

    The closure of :meth:`step` takes one argument ``indices`` and returns **per-sample losses without
    calling backward()**: ``indices=None`` means the whole batch (a 1-D tensor of ``B`` losses),
    otherwise a 1-D ``LongTensor`` of sample positions whose losses it must return, in that order.
    ESAM itself takes the mean and calls ``backward()``. With ``gamma < 1``, pass the first forward's
    per-sample losses as ``step(closure, losses=...)``::

        losses = F.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        opt.step(lambda idx: F.cross_entropy(model(x if idx is None else x[idx]),
                                             y if idx is None else y[idx], reduction="none"),
                 losses=losses)

    The step then runs one no-grad forward of the whole batch at ``w + e`` (to measure the loss rise)
    and one forward/backward of the selected samples. By hand: ``first_step()``, then
    :meth:`select_samples`, your backward on those samples, ``second_step()``.

    Args: those of :class:`FSAM` (default ``sparsity=0``: vanilla ESAM), plus ``beta`` and ``gamma``
    in (0, 1] (defaults 0.6 and 0.5, the authors' CIFAR settings) and ``generator``, an optional
    ``torch.Generator`` on the parameters' device for the SWP bits.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        beta: float = 0.6,
        gamma: float = 0.5,
        sparsity: float = 0.0,
        generator: Optional[torch.Generator] = None,
        **kwargs: Any,
    ) -> None:
        self.beta = options.fraction(beta, "beta", zero=False)
        self.gamma = options.fraction(gamma, "gamma", zero=False)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator: {generator!r}; expected None or a torch.Generator")
        self.generator = generator
        self._scaled: Optional[tuple[ParamLayout, ParamLayout]] = None  # (layout, its rho / beta copy)
        super().__init__(params, base_optimizer, rho, adaptive, sparsity=sparsity, **kwargs)

    def _check_settings(self) -> None:
        super()._check_settings()
        self.beta = options.fraction(self.beta, "beta", zero=False)
        self.gamma = options.fraction(self.gamma, "gamma", zero=False)

    # ------------------------------------------------------------------ stochastic weight perturbation
    _REBUILT_ON_USE = FSAM._REBUILT_ON_USE + ("_scaled",)

    def _random_bits(self, layout: ParamLayout) -> torch.Tensor:
        # Packed tensor by tensor: the transient memory is that of the largest tensor, not of all of them.
        bits = layout.empty_mask()
        for j, i in enumerate(layout.masked_index):
            keep = torch.rand(layout.numel[i], generator=self.generator, device=layout.device) < self.beta
            if keep.numel() % 8:
                keep = torch.cat([keep, keep.new_zeros(8 - keep.numel() % 8)])
            start = layout.bit_offset[j] // 8
            bits[start : start + keep.numel() // 8] = ref.pack_bits(keep)
        return bits

    def _scaled_layout(self, layout: ParamLayout) -> ParamLayout:
        if self._scaled is None or self._scaled[0] is not layout:
            rho = [r / self.beta if masked else r for r, masked in zip(layout.rho, layout.masked)]
            self._scaled = (layout, layout.with_rho(rho))
        return self._scaled[1]

    def _perturbation_plan(self, layout: ParamLayout, backend: Backend) -> tuple[ParamLayout, Any, Any]:
        layout, bits, aux = super()._perturbation_plan(layout, backend)
        if self.beta == 1.0 or bits is None:
            return layout, bits, aux
        bits = torch.bitwise_and(bits, self._random_bits(layout))
        return self._scaled_layout(layout), bits, backend.mask_aux(layout, bits)

    def memory_stats(self) -> dict[str, int]:
        """FSAM's, plus ``step_mask``: a pending step's own mask and aux (the Fisher mask and'ed with the
        random subset, while ``beta < 1``)."""
        stats = super().memory_stats()
        pending = self._pending
        own = pending is not None and pending.bits is not None and pending.bits is not self._mask.bits
        stats["step_mask"] = tensors_nbytes(pending.bits) + tensors_nbytes(pending.aux) if own else 0
        return stats

    # ------------------------------------------------------------------ sharpness-sensitive data selection
    @staticmethod
    def _check_losses(what: str, losses: Any, size: Optional[int]) -> torch.Tensor:
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1 or not losses.is_floating_point():
            raise ValueError(
                f"ESAM: expected {what} to be a 1-D floating-point tensor of per-sample losses, got "
                f"{type(losses).__name__}{'' if not isinstance(losses, torch.Tensor) else ' of shape ' + str(tuple(losses.shape))}"
            )
        if size is not None and losses.numel() != size:
            raise ValueError(f"ESAM: expected {what} to hold {size} per-sample losses, got {losses.numel()}")
        if losses.numel() == 0:
            raise ValueError(f"ESAM: {what} is empty")
        return losses

    def select_samples(self, losses_before: torch.Tensor, losses_after: torch.Tensor) -> torch.Tensor:
        """Ascending positions of the ``max(1, round(gamma * B))`` samples whose loss rose most from
        ``losses_before`` (at ``w``) to ``losses_after`` (at ``w + e``); ties: lowest position."""
        before = self._check_losses("losses_before", losses_before, None)
        after = self._check_losses("losses_after", losses_after, before.numel())
        b = before.numel()
        keep = min(b, max(1, int(round(self.gamma * b))))
        rise = after.detach().float() - before.detach().float().to(after.device)
        top = torch.sort(rise, descending=True, stable=True).indices[:keep]
        return torch.sort(top).values

    @outside_inference_mode
    def step(self, closure: Optional[Callable[[Optional[torch.Tensor]], torch.Tensor]] = None,
             losses: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """One ESAM step; returns the mean loss of the samples used by the second backward (at ``w + e``).

        As :meth:`FSAM.step`: when the first gradient's norm is not finite the step is skipped (no
        second pass, base optimizer untouched, one warning) and ``None`` is returned; if the closure
        raises, the weights, mask and step count are as before the call."""
        if closure is None:
            raise RuntimeError(
                "ESAM.step needs a closure(indices) that returns per-sample losses (see the ESAM docstring)"
            )
        self.check_options()  # gamma is read before first_step checks it
        before = None
        if self.gamma < 1.0:
            if losses is None:
                raise ValueError(
                    "ESAM.step: data selection (gamma < 1) needs losses=, the per-sample losses of the first "
                    "forward pass; or set gamma=1"
                )
            before = self._check_losses("losses", losses, None).detach()
        perturbed, loss = self._two_passes(lambda: self._selected_backward(closure, before))
        return loss if perturbed else None

    def _selected_backward(self, closure: Callable[[Optional[torch.Tensor]], torch.Tensor],
                           before: Optional[torch.Tensor]) -> torch.Tensor:
        """The second pass at ``w + e``: the selected samples' mean loss, and its backward."""
        indices = None
        if before is not None:
            with torch.no_grad():
                after = self._check_losses("closure(None)", closure(None), before.numel())
            indices = self.select_samples(before, after)
        with torch.enable_grad():
            chosen = closure(indices)
            if any(p.grad is not None for g in self.param_groups for p in g["params"]):
                raise RuntimeError("ESAM.step: the closure must return per-sample losses without calling backward()")
            if not (isinstance(chosen, torch.Tensor) and chosen.dim() == 0 and indices is None):
                self._check_losses("closure(indices)", chosen, None if indices is None else indices.numel())
            loss = chosen.mean()
            loss.backward()
        return loss.detach()


class GSAM(_MaskedFamily):
    r"""Surrogate-gap guided SAM (Zhuang et al., ICLR 2022), Fisher-masked when ``sparsity > 0`` (F-GSAM).

    * :math:`\rho_t` follows each group's learning rate, read at every ``first_step``:
      :math:`\rho_t = \rho_{min} + (\rho - \rho_{min})\,\mathrm{clip}((lr - lr_{min}) / (lr_{max} - lr_{min}), 0, 1)`,
      so any LR scheduler attached to this optimizer schedules :math:`\rho` too (``rho`` is
      :math:`\rho_{max}`). :meth:`current_rho` tells the values the next step uses.
    * Surrogate-gap step: with :math:`g` the first gradient (at ``w``) and :math:`g_p` the second (at
      ``w + e``), the base optimizer is stepped with :math:`g_p - \alpha\,g_\perp`, where
      :math:`g_\perp = g - \frac{\langle g, g_p\rangle}{\lVert g_p\rVert^2} g_p` is the component of
      ``g`` orthogonal to ``g_p`` (computed over every parameter with both gradients, in fp32 as the
      authors' code does, or in fp64 when a gradient is fp64). This keeps a copy of the first gradient between the two steps.

    Args: those of :class:`FSAM` (default ``sparsity=0``: vanilla GSAM), plus ``alpha`` (>= 0),
    ``rho_min`` (in [0, rho]; default ``rho``: constant), ``lr_max`` (default: each group's learning
    rate at construction) and ``lr_min`` (default 0). ``rho_min``, ``lr_max`` and ``lr_min`` are also
    param-group options.
    """

    def __init__(
        self,
        params: Iterable,
        base_optimizer: type,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        alpha: float = 0.4,
        rho_min: Optional[float] = None,
        lr_max: Optional[float] = None,
        lr_min: float = 0.0,
        sparsity: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.alpha = options.finite(alpha, "alpha", low=0.0)
        self._schedule_defaults = dict(rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)
        self._first_grads: Optional[list[Optional[torch.Tensor]]] = None
        self._rho_layout: Optional[tuple[ParamLayout, tuple[float, ...], ParamLayout]] = None
        super().__init__(params, base_optimizer, rho, adaptive, sparsity=sparsity, **kwargs)
        for gi, group in enumerate(self.param_groups):
            self._finish_schedule(group, gi)

    _REBUILT_ON_USE = FSAM._REBUILT_ON_USE + ("_rho_layout",)

    def _check_settings(self) -> None:
        super()._check_settings()
        self.alpha = options.finite(self.alpha, "alpha", low=0.0)
        for gi, group in enumerate(self.param_groups):
            self._check_schedule(group, gi)

    # ------------------------------------------------------------------ rho schedule
    def add_param_group(self, param_group: dict) -> None:
        for key, value in self._schedule_defaults.items():
            if param_group.get(key) is None:
                param_group[key] = value
        if hasattr(self, "base_optimizer"):  # else __init__ finishes every group once the base optimizer set lr
            for key in ("rho", "lr"):
                if key in self.defaults:
                    param_group.setdefault(key, self.defaults[key])
            self._finish_schedule(param_group, len(self.param_groups))  # validated before it is added
        super().add_param_group(param_group)

    def _has_fsam_options(self, group: dict) -> bool:
        return super()._has_fsam_options(group) and all(k in group for k in self._schedule_defaults)

    def _finish_schedule(self, group: dict, gi: int) -> None:
        if group["rho_min"] is None:
            group["rho_min"] = group["rho"]
        if group["lr_max"] is None:
            group["lr_max"] = group["lr"]
        self._check_schedule(group, gi)

    @staticmethod
    def _check_schedule(group: dict, gi: int) -> None:
        """Check (and store as floats) what :meth:`_group_rho` reads; again at every step, since users
        and LR schedulers change them."""
        where = f" in param_groups[{gi}]"
        rho = options.positive(group["rho"], "rho", where)
        rho_min = options.finite(group["rho_min"], "rho_min", where, low=0.0)
        if rho_min > rho:
            raise ValueError(f"Invalid rho_min{where}: {group['rho_min']!r}; expected a number in [0, rho={rho}]")
        lr_max = options.finite(group["lr_max"], "lr_max", where)
        lr_min = options.finite(group["lr_min"], "lr_min", where)
        if lr_max < lr_min:
            raise ValueError(f"Invalid lr_max{where}: {lr_max}; expected lr_max >= lr_min={lr_min}")
        options.finite(group["lr"], "lr", where)  # the base optimizer's; only read here
        group.update(rho=rho, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min)

    @staticmethod
    def _group_rho(group: dict) -> float:
        lr, lo, hi = float(group["lr"]), group["lr_min"], group["lr_max"]
        frac = 1.0 if hi == lo else min(1.0, max(0.0, (lr - lo) / (hi - lo)))
        return group["rho_min"] + (group["rho"] - group["rho_min"]) * frac

    def current_rho(self) -> list[float]:
        """:math:`\\rho_t` of every param group at the current learning rates."""
        return [self._group_rho(g) for g in self.param_groups]

    def _perturbation_plan(self, layout: ParamLayout, backend: Backend) -> tuple[ParamLayout, Any, Any]:
        layout, bits, aux = super()._perturbation_plan(layout, backend)
        rho = tuple(self._group_rho(g) for g in self.param_groups if g.get("perturb", True) for _ in g["params"])
        if self._rho_layout is None or self._rho_layout[0] is not layout or self._rho_layout[1] != rho:
            self._rho_layout = (layout, rho, layout.with_rho(list(rho)))
        return self._rho_layout[2], bits, aux

    # ------------------------------------------------------------------ surrogate gap
    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _after_perturbation(self) -> None:
        self._first_grads = [None if p.grad is None else p.grad.detach().clone() for p in self._all_params()]

    def _after_restore(self) -> None:
        self._first_grads = None

    def _before_base_step(self) -> None:
        self.alpha = options.finite(self.alpha, "alpha", low=0.0)
        if self._first_grads is not None and self.alpha != 0.0:
            self._subtract_orthogonal(self._first_grads)

    def _subtract_orthogonal(self, first: list[Optional[torch.Tensor]]) -> None:
        pairs = [(p, g) for p, g in zip(self._all_params(), first) if g is not None and p.grad is not None]
        if not pairs:
            return
        # FSDP2: DTensor gradients are worked on as local shards, the three sums all-reduced.
        local = (lambda t: t) if self._shards is None else (lambda t: t.to_local())
        # fp64 when any gradient is fp64 (an fp64 model gets fp64 arithmetic), else fp32
        dtype = torch.float64 if any(g.dtype == torch.float64 for _, g in pairs) else torch.float32
        old = [local(g).to(dtype) for _, g in pairs]
        new = [local(p.grad).to(dtype) for p, _ in pairs]  # the gradient itself when it is of that dtype
        inner = torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(old, new)]).sum()
        if self._shards is None:
            new_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(new)))
            old_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(old)))
        else:
            sq = lambda ts: torch.stack([t.reshape(-1).dot(t.reshape(-1)) for t in ts]).sum()
            sums = self._shards.all_reduce_sum(torch.stack([inner, sq(new), sq(old)]))
            inner, new_norm, old_norm = sums[0], sums[1].sqrt(), sums[2].sqrt()
        cosine = inner / (new_norm * old_norm + self.perturb_eps)
        coef = cosine * old_norm / (new_norm + self.perturb_eps)
        vertical = torch._foreach_sub(old, torch._foreach_mul(new, coef))
        torch._foreach_add_(new, vertical, alpha=-self.alpha)
        for (p, _), g in zip(pairs, new):
            target = local(p.grad)
            if g is not target:
                target.copy_(g)

    def memory_stats(self) -> dict[str, int]:
        stats = super().memory_stats()
        stats["first_grad"] = tensors_nbytes(self._first_grads)
        return stats
