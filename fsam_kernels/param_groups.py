"""FSAM's param groups: the options each one holds, the parameters it may hold, and groups added to
the base optimizer behind FSAM's back. Each check raises before anything changes, naming the group."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from . import options
from .fsdp import _dtensor_type


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor holding ``p``'s values in this process (its local shard when FSDP2 shards it)."""
    dtensor = _dtensor_type()
    return p.to_local() if dtensor is not None and isinstance(p, dtensor) else p


def check_options(group: dict, gi: int) -> None:
    """Check FSAM's options of ``param_groups[gi]`` (the numbers stored as Python floats): when the group
    is added, and again at every read, since users may change them (e.g. a rho schedule)."""
    where = f" in param_groups[{gi}]"
    group["rho"] = options.positive(group["rho"], "rho", where)
    for flag in ("adaptive", "fisher_mask", "perturb"):
        if flag in group:
            options.flag(group[flag], flag, where)


def checked_params(param_group: dict, gi: int) -> list[torch.Tensor]:
    """The group's parameters as a list: real floating-point tensors with data."""
    where = f"param_groups[{gi}]"
    params = param_group["params"]
    if isinstance(params, set):
        raise TypeError(f"Invalid params in {where}: a set has no order; use a list")
    params = [params] if isinstance(params, torch.Tensor) else list(params)
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
    return params


def check_perturbed(params: Sequence[torch.Tensor]) -> None:
    """What every backend assumes of the perturbed tensors: one device, contiguous memory."""
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"FSAM: all perturbed parameters must be on one device, got {sorted(map(str, devices))}")
    for p in params:
        if not p.is_contiguous():
            raise ValueError(
                f"FSAM: parameters must be contiguous, got one of shape {tuple(p.shape)} with strides "
                f"{p.stride()} (e.g. channels_last); keep parameters in the default memory format"
            )


def adopt_added_groups(opt: Any) -> None:
    """Groups added with ``base_optimizer.add_param_group`` (which knows none of FSAM's options; the two
    optimizers share ``param_groups``) get FSAM's defaults and checks here, at the first read, as if added
    with ``opt.add_param_group``; an invalid one raises and stays as it was."""
    groups = opt.param_groups
    for gi, group in enumerate(groups):
        if opt._has_fsam_options(group):
            continue
        checked = dict(group)
        del groups[gi]
        try:
            opt.add_param_group(checked)  # appended at the end
        except BaseException:
            groups.insert(gi, group)
            raise
        groups.pop()
        group.update(checked)  # the same dict, back in its place: references to it stay valid
        groups.insert(gi, group)


def perturbed_params(groups: Sequence[dict]) -> list[torch.Tensor]:
    return [p for g in groups if g.get("perturb", True) for p in g["params"]]


def perturbed_label(groups: Sequence[dict], i: int) -> str:
    """Where the ``i``-th perturbed parameter is listed: ``param_groups[g]['params'][j]``."""
    for gi, group in enumerate(groups):
        if group.get("perturb", True):
            if i < len(group["params"]):
                return f"param_groups[{gi}]['params'][{i}]"
            i -= len(group["params"])
    raise IndexError(i)


def checked_grads(params: Sequence[torch.Tensor], shards: Any) -> list[Optional[torch.Tensor]]:
    """The gradients of the perturbed tensors ``params`` (local shards under FSDP2): dense, shaped and
    placed like their parameters, or ``None``."""
    grads = [p.grad for p in params] if shards is None else [shards.local_grad(p) for p in params]
    strided = torch.strided
    for p, g in zip(params, grads):
        if g is None or (g.layout == strided and g.shape == p.shape and g.device == p.device):
            continue
        if g.layout != strided:
            raise ValueError(
                f"FSAM: sparse gradients are not supported (parameter of shape {tuple(p.shape)} has a "
                f"{g.layout} gradient); use dense gradients (e.g. nn.Embedding(sparse=False))"
            )
        raise ValueError(
            f"FSAM: a gradient of shape {tuple(g.shape)} on {g.device} does not match its parameter "
            f"({tuple(p.shape)} on {p.device})"
        )
    return grads
