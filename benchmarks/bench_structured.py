"""2:4 structured vs unstructured Fisher masks at the same density (50 %), and PyTorch's prototype
semi-structured matmul against the dense one.

Rows (``op``): ``mask_update`` and ``perturb_restore`` (timed), ``saved_bytes`` and ``mask_bytes`` (in
``bytes``), each for ``method`` = ``unstructured-50%`` (FSAM, sparsity 0.5) and ``2:4`` (FSAM,
structure "2:4"; 1-D tensors and indivisible shapes fall back to unstructured top-k at 50 %); on CUDA
GPUs that support it, ``matmul`` rows for ``dense`` and ``semi-structured-2:4``.

Called by the harness (``pytest benchmarks``, when the ``ops`` part runs) or directly::

    from benchmarks.bench_structured import structured_rows, semi_structured_matmul_rows
    rows = structured_rows(torch.device("cuda"), mode="full")
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from fsam_kernels import FSAM, available_backends
from fsam_kernels.structured import semi_structured_unsupported_reason

from . import shapes as S
from .harness import Row, dtype_name, run_rounds, timed_row

METHODS = {"unstructured-50%": dict(sparsity=0.5), "2:4": dict(structure="2:4", sparsity=0.5)}
ROUNDS = {"full": (20, 3), "quick": (5, 1), "tiny": (1, 0)}


def shape_set_for(mode: str, device: torch.device) -> S.ShapeSet:
    if mode == "full" and device.type == "cuda":
        return S.roberta_large()
    return S.roberta_large(16 if mode == "quick" else 64)


def _params(shape_set: S.ShapeSet, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Parameter]:
    g = torch.Generator(device=device).manual_seed(0)
    params = []
    for shape in shape_set.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g, device=device, dtype=dtype))
        p.grad = torch.randn(shape, generator=g, device=device, dtype=dtype)
        params.append(p)
    return params


def structured_rows(
    device: torch.device,
    mode: str = "quick",
    dtype: torch.dtype = torch.float32,
    backends: Optional[list[str]] = None,
    shape_set: Optional[S.ShapeSet] = None,
) -> list[Row]:
    """Mask-update and perturb+restore time, saved and mask bytes, 2:4 vs unstructured at 50 %."""
    shape_set = shape_set or shape_set_for(mode, device)
    rounds, warmup = ROUNDS[mode]
    params = _params(shape_set, dtype, device)
    rows = []
    for backend in backends or available_backends(device):
        for method, kwargs in METHODS.items():
            opt = FSAM(params, torch.optim.SGD, lr=0.0, mask_update_interval=10**9, backend=backend, **kwargs)

            def row(op: str) -> Row:
                return Row(op=op, method=method, backend=backend, shapes=shape_set.name, size=shape_set.numel,
                           n_tensors=shape_set.n_tensors, dtype=dtype_name(dtype)).with_conditions(device, mode)

            times = run_rounds(opt.update_mask, device, rounds=rounds, warmup=warmup)
            rows.append(timed_row(row("mask_update"), times, bytes_moved=0))

            def perturb_restore():
                opt.first_step()
                opt.restore()

            times = run_rounds(perturb_restore, device, rounds=rounds, warmup=warmup)
            rows.append(timed_row(row("perturb_restore"), times, bytes_moved=0))
            opt.first_step()
            stats = opt.memory_stats()
            opt.restore()
            for op, value in (("saved_bytes", stats["saved"]), ("mask_bytes", stats["mask"] + stats["mask_aux"])):
                r = row(op)
                r.bytes = value
                rows.append(r)
    return rows


def semi_structured_matmul_rows(
    device: torch.device, mode: str = "full", dtype: torch.dtype = torch.bfloat16, m: int = 4096, k: int = 4096,
    n: int = 8192,
) -> list[Row]:
    """``A @ B`` with A (m x k) dense vs 2:4 semi-structured; empty where PyTorch cannot run it."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    a.view(-1, 4)[:, :2] = 0  # a valid 2:4 pattern
    if semi_structured_unsupported_reason(a, 2, 4) is not None:
        return []
    b = torch.randn(k, n, device=device, dtype=dtype)
    try:
        sparse = torch.sparse.to_sparse_semi_structured(a)
    except (RuntimeError, ValueError, NotImplementedError):
        return []
    rounds, warmup = ROUNDS[mode]
    rows = []
    for method, lhs in (("dense", a), ("semi-structured-2:4", sparse)):
        times = run_rounds(lambda: torch.mm(lhs, b), device, rounds=rounds, warmup=warmup)
        r = Row(op="matmul", method=method, backend="torch", shapes=f"{m}x{k}@{k}x{n}", size=m * k,
                n_tensors=1, dtype=dtype_name(dtype)).with_conditions(device, mode)
        rows.append(timed_row(r, times, bytes_moved=0))
    return rows


def test_structured(plan, record):
    if "ops" not in plan.parts or plan.mode == "tiny":
        pytest.skip("runs with the ops part, in quick or full mode")
    record(structured_rows(plan.device, plan.mode, backends=plan.backends))
    if plan.device.type == "cuda":
        record(semi_structured_matmul_rows(plan.device, plan.mode))
