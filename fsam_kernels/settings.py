"""FSAM's optimizer-wide settings: checked at construction, and again where each step reads them (users
may change ``sparsity``, ``mask_update_interval``, ``fisher`` and ``perturb_eps`` between steps)."""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional

import torch

from . import options, structured
from .backends import backend_names, requested_backend

FISHER_MODES = ("batch", "empirical")
FP32_TINY = torch.finfo(torch.float32).tiny  # the smallest perturb_eps an fp32 gradient norm can use


def check_fisher(fisher: Any) -> str:
    if fisher not in FISHER_MODES:
        raise ValueError(f"Invalid fisher: {fisher!r}; expected one of {FISHER_MODES}")
    return fisher


def check_constructor(rho: Any, sparsity: Any, mask_update_interval: Any, fisher: Any, structure: Any,
                      preserve_zeros: Any, perturb_eps: Any, backend: Any, base_optimizer: Any) -> dict[str, Any]:
    """FSAM's constructor arguments, checked; numbers as Python numbers, ``structure`` as ``(N, M)``
    or ``None`` and ``preserve_zeros`` resolved (default: on with a structure)."""
    checked = dict(
        rho=options.positive(rho, "rho"),
        sparsity=options.fraction(sparsity, "sparsity"),
        mask_update_interval=options.count(mask_update_interval, "mask_update_interval"),
        fisher=check_fisher(fisher),
        structure=structured.parse_structure(structure),
        perturb_eps=options.positive(perturb_eps, "perturb_eps"),  # > 0: a zero gradient would give 0/0
    )
    if preserve_zeros is not None and not isinstance(preserve_zeros, bool):
        raise TypeError(f"Invalid preserve_zeros: {preserve_zeros!r}; expected None, True or False")
    checked["preserve_zeros"] = checked["structure"] is not None if preserve_zeros is None else preserve_zeros
    if not isinstance(backend, str) or backend not in ("auto", *backend_names()):
        raise ValueError(f"Invalid backend: {backend!r}; expected 'auto' or one of {backend_names()}")
    requested_backend(backend)  # a misspelt FSAM_BACKEND fails here, not at the first step
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(
            f"Invalid base_optimizer: {base_optimizer!r}; expected a torch.optim.Optimizer subclass "
            "(the class, e.g. torch.optim.AdamW, not an instance)"
        )
    check_base_step(base_optimizer)
    return checked


def check_base_step(base_optimizer: type) -> None:
    """Refuse a base optimizer whose ``step`` needs a closure (torch.optim.LBFGS and subclasses, or a
    ``step`` whose ``closure`` has no default): FSAM steps it once, without one."""
    needs = issubclass(base_optimizer, torch.optim.LBFGS)
    if not needs:
        try:
            closure = inspect.signature(base_optimizer.step).parameters.get("closure")
        except (TypeError, ValueError):  # no signature to read (a C function): assume it takes none
            closure = None
        needs = (closure is not None and closure.default is inspect.Parameter.empty
                 and closure.kind is not inspect.Parameter.VAR_POSITIONAL)
    if needs:
        raise TypeError(
            f"Invalid base_optimizer: {base_optimizer.__module__}.{base_optimizer.__qualname__}.step needs a "
            "closure (it re-evaluates the loss within a step), but FSAM steps its base optimizer once per step "
            "with the gradient taken at w + e, without a closure; use a first-order optimizer (SGD, Adam, AdamW, ...)"
        )


def check_keep_pruned(keep_pruned: Any, preserve_zeros: Any) -> Any:
    """``preserve_zeros`` as ``keep_pruned`` needs it: on by default, never off (a pruned weight is
    never perturbed)."""
    if not isinstance(keep_pruned, bool):
        raise TypeError(f"Invalid keep_pruned: {keep_pruned!r}; expected True or False")
    if keep_pruned and preserve_zeros is False:
        raise ValueError("Invalid preserve_zeros=False with keep_pruned=True: pruned weights are never perturbed "
                         "under keep_pruned; leave preserve_zeros at None or True")
    return True if keep_pruned and preserve_zeros is None else preserve_zeros


def check_step_settings(opt: Any) -> None:
    """Check (and store as Python numbers) the optimizer-wide options a step of ``opt`` reads."""
    opt.sparsity = options.fraction(opt.sparsity, "sparsity")
    opt.mask_update_interval = options.count(opt.mask_update_interval, "mask_update_interval")
    opt.perturb_eps = options.positive(opt.perturb_eps, "perturb_eps")
    if opt.perturb_eps < FP32_TINY:  # rare: only then are the parameters' dtypes looked at
        check_perturb_eps(opt.perturb_eps, norm_dtype_of(opt.param_groups))
    check_fisher(opt.fisher)


def check_perturb_eps(perturb_eps: float, norm_dtype: torch.dtype) -> None:
    """Refuse a ``perturb_eps`` the gradient norm's dtype cannot use: below its smallest normal number
    (1.1754944e-38 for fp32) the value is subnormal or 0 in that dtype and ``1 / perturb_eps`` overflows."""
    tiny = torch.finfo(norm_dtype).tiny
    if perturb_eps < tiny:
        name = str(norm_dtype).replace("torch.", "")
        raise ValueError(f"Invalid perturb_eps: {perturb_eps!r}; too small for the {name} gradient norm "
                         f"(1 / perturb_eps overflows); expected a number >= {tiny!r}")


def norm_dtype_of(param_groups: list[dict]) -> torch.dtype:
    """The gradient norm's dtype for these parameters (see :mod:`fsam_kernels.reference`): fp64 when a
    perturbed parameter is fp64 (torch gives a gradient its parameter's dtype), else fp32."""
    fp64 = any(p.dtype == torch.float64 for g in param_groups if g.get("perturb", True) for p in g["params"])
    return torch.float64 if fp64 else torch.float32


def warn_eps_alias() -> None:
    warnings.warn("FSAM's eps attribute is now perturb_eps; eps is the base optimizer's option (pass it to the "
                  "constructor, or set it in opt.param_groups)", FutureWarning, stacklevel=3)
