"""FSAM's optimizer-wide settings: checked at construction, and again where each step reads them (users
may change ``sparsity``, ``mask_update_interval``, ``fisher`` and ``eps`` between steps)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from . import options, structured
from .backends import backend_names, requested_backend

FISHER_MODES = ("batch", "empirical")


def check_fisher(fisher: Any) -> str:
    if fisher not in FISHER_MODES:
        raise ValueError(f"Invalid fisher: {fisher!r}; expected one of {FISHER_MODES}")
    return fisher


def check_constructor(rho: Any, sparsity: Any, mask_update_interval: Any, fisher: Any, structure: Any,
                      preserve_zeros: Any, eps: Any, backend: Any, base_optimizer: Any) -> dict[str, Any]:
    """FSAM's constructor arguments, checked; numbers as Python numbers, ``structure`` as ``(N, M)``
    or ``None`` and ``preserve_zeros`` resolved (default: on with a structure)."""
    checked = dict(
        rho=options.positive(rho, "rho"),
        sparsity=options.fraction(sparsity, "sparsity"),
        mask_update_interval=options.count(mask_update_interval, "mask_update_interval"),
        fisher=check_fisher(fisher),
        structure=structured.parse_structure(structure),
        eps=options.positive(eps, "eps"),  # > 0: a zero gradient would give 0/0
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
    return checked


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
    opt.eps = options.positive(opt.eps, "eps")
    check_fisher(opt.fisher)
