"""How many kernels one FSAM step launches (CUDA), or how many top-level ATen ops it runs (CPU).

Counted with ``torch.profiler`` over one ``norm_perturb`` + ``restore`` (the per-step work) and, as a
separate row, one ``select_mask`` (the mask update), after a warm-up call of each.
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from .harness import Row, dtype_name
from .ops import Method, Workload


def _count(fn, device: torch.device) -> int:
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    if cuda:
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and e.name.startswith("aten::"))


def launch_rows(wl: Workload, method: Method, mode: str) -> list[Row]:
    op_name = "launches" if wl.device.type == "cuda" else "aten_ops"
    work = {"step": lambda: (method.norm_perturb(), method.restore())}
    if "select_mask" in method.ops:
        work["mask_update"] = method.select_mask
    rows = []
    for what, fn in work.items():
        fn()  # warm-up: compilation and caching allocator out of the count
        rows.append(Row(op=f"{op_name}_{what}", method=method.name, backend=method.backend,
                        shapes=wl.shape_set.name, size=wl.numel, n_tensors=wl.shape_set.n_tensors,
                        dtype=dtype_name(wl.dtype), count=_count(fn, wl.device)).with_conditions(wl.device, mode))
    return rows
