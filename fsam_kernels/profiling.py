"""Counting the GPU kernel launches of FSAM's own work with ``torch.profiler``."""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def count_kernel_launches(fn: Callable[[], object]) -> tuple[int, list[str]]:
    """Run ``fn`` once under the profiler; return the number of CUDA kernels it launched and their
    names. Memory copies and memsets are not kernels and are not counted."""
    if not torch.cuda.is_available():
        raise RuntimeError("count_kernel_launches: needs a CUDA device")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [
        e.name
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset"))
    ]
    return len(names), names


def fsam_step_launches(optimizer) -> tuple[int, list[str]]:
    """Kernels launched by FSAM's own work in one step: ``first_step`` (gradient norm, mask update
    when due, perturbation) and the exact restore, without the base optimizer's step.

    The gradients of the first backward pass must be in place; they are kept (``zero_grad=False``).
    """

    def step() -> None:
        optimizer.first_step(zero_grad=False)
        optimizer.restore()

    return count_kernel_launches(step)
