"""Memory per method: optimizer state kept between steps, values saved during a step, and (CUDA only)
the peak extra device memory of one mask build + perturb + restore and, for FSAM, of one mask build
alone beyond the packed mask it returns (its temporaries: the issue's target is at most 64 MB).

FSAM's numbers come from :meth:`fsam_kernels.FSAM.memory_stats`; the baselines count the tensors
they hold. The base optimizer's own state (e.g. AdamW's moments) is the same for every method and is
not counted.
"""
from __future__ import annotations

import gc

import torch

from fsam_kernels import FSAM

from .baselines import ForeachSAM, LoopSAM, NaiveFSAM
from .harness import Row, dtype_name
from .ops import EPS, RHO, SPARSITY, Workload


def _with_fsam(wl: Workload, backend: str):
    opt = FSAM(wl.params, torch.optim.SGD, rho=RHO, sparsity=SPARSITY, perturb_eps=EPS, backend=backend, lr=0.0)
    opt.first_step()  # builds the mask (step 0) and perturbs
    stats = opt.memory_stats()
    opt.restore()
    return stats["persistent"], stats["saved"]


def _with_baseline(wl: Workload, method: str):
    cls = {"sam_loop": LoopSAM, "sam_foreach": ForeachSAM, "fsam_naive": NaiveFSAM}[method]
    opt = cls(wl.params, rho=RHO, eps=EPS)
    opt.perturb()  # NaiveFSAM builds its mask here on the first call
    saved = sum(t.numel() * t.element_size() for t in getattr(opt, "old_p", {}).values()) or opt.state_nbytes()
    opt.restore()  # after this, state_nbytes() is what stays between steps
    return opt.state_nbytes(), saved


def _mask_peak_extra(wl: Workload, backend: str) -> int:
    """Peak device memory of one ``select_mask`` call beyond the mask it returns."""
    from fsam_kernels.backends import get_backend

    impl = get_backend(backend, wl.device)
    impl.select_mask(wl.layout, wl.grads, wl.k, True)  # warm: compiled kernels, cached tables
    gc.collect()
    torch.cuda.synchronize(wl.device)
    torch.cuda.reset_peak_memory_stats(wl.device)
    base = torch.cuda.memory_allocated(wl.device)
    with torch.no_grad():
        bits = impl.select_mask(wl.layout, wl.grads, wl.k, True)
    torch.cuda.synchronize(wl.device)
    return torch.cuda.max_memory_allocated(wl.device) - base - bits.numel() * bits.element_size()


def memory_rows(wl: Workload, method: str, mode: str) -> list[Row]:
    """Rows ``state_bytes``, ``saved_bytes`` and, on CUDA, ``peak_extra_bytes`` (and for FSAM
    ``mask_peak_extra_bytes``) for ``method`` (``fsam[<backend>]`` or a dense/naive baseline)."""
    cuda = wl.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(wl.device)
        torch.cuda.reset_peak_memory_stats(wl.device)
        base = torch.cuda.memory_allocated(wl.device)
    if method.startswith("fsam["):
        state, saved = _with_fsam(wl, method[5:-1])
        backend = method[5:-1]
    else:
        state, saved = _with_baseline(wl, method)
        backend = ""
    values = {"state_bytes": state, "saved_bytes": saved}
    if cuda:
        torch.cuda.synchronize(wl.device)
        values["peak_extra_bytes"] = torch.cuda.max_memory_allocated(wl.device) - base
        if method.startswith("fsam["):
            values["mask_peak_extra_bytes"] = _mask_peak_extra(wl, backend)
    rows = []
    for op, value in values.items():
        rows.append(Row(op=op, method=method, backend=backend, shapes=wl.shape_set.name, size=wl.numel,
                        n_tensors=wl.shape_set.n_tensors, dtype=dtype_name(wl.dtype),
                        bytes=int(value)).with_conditions(wl.device, mode))
    gc.collect()
    return rows


MEMORY_METHODS = ("sam_loop", "sam_foreach", "fsam_naive")
