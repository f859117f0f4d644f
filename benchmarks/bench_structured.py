"""2:4 structured vs unstructured Fisher masks at the same density (50 %), and PyTorch's prototype
semi-structured matmul against the dense one.

Rows (``op``): ``mask_update`` and ``perturb_restore`` (timed), ``saved_bytes`` and ``mask_bytes`` (in
``bytes``), each for ``method`` = ``unstructured-50%`` (FSAM, sparsity 0.5) and ``2:4`` (FSAM,
structure "2:4"; 1-D tensors and indivisible shapes fall back to unstructured top-k at 50 %); on CUDA
GPUs that support it, ``matmul`` rows for ``dense`` and ``semi-structured-2:4``.

Called by the harness (``pytest benchmarks``, when the ``ops`` part runs) or directly::

    from benchmarks.bench_structured import structured_rows, semi_structured_matmul_rows
    rows = structured_rows(torch.device("cuda"), mode="full")

The 2:4 path end to end, run on its own (CUDA only: without a GPU it says so and exits 0)::

    python -m benchmarks.bench_structured --out OUT [--mode quick|full]

* ``linear`` rows: every distinct ``nn.Linear`` of RoBERTa-large (q/k/v/o 1024x1024, FFN 4096x1024 and
  1024x4096, the head's 1024x1024 and 2x1024) on 1024 tokens in bf16, ``F.linear`` with the 2:4-pruned
  weight dense and as ``torch.sparse.to_sparse_semi_structured`` (shapes PyTorch refuses give no row).
* ``train_step`` rows: one FSAM(AdamW, structure="2:4") step (two forward/backward passes, the mask, the
  base step) of a 2:4-pruned stack of RoBERTa-large's encoder Linears (24 layers of q, k, v, o, FFN up and
  down) in bf16, ``keep_pruned`` off and on; ``base_step`` times AdamW's step alone and
  ``keep_pruned_write`` the masked write alone.

``--device cpu`` runs the ``train_step``, ``base_step`` (AdamW's step alone) and ``keep_pruned_write`` rows
at a sixteenth of the width in fp32 (the CPU measurement of docs/sam-family.md). Rows go to ``OUT/structured.csv`` (the harness's columns).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from fsam_kernels import FSAM, available_backends
from fsam_kernels.structured import semi_structured_unsupported_reason

from . import shapes as S
from .harness import Row, append_rows, dtype_name, run_rounds, timed_row

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


# --------------------------------------------------------------------------- the 2:4 path end to end
def roberta_large_linears(width_divisor: int = 1) -> list[tuple[str, int, int]]:
    """(name, out_features, in_features) of every distinct Linear of RoBERTa-large."""
    h, f = 1024 // width_divisor, 4096 // width_divisor
    return [("attention q/k/v/o, head dense", h, h), ("ffn up", f, h), ("ffn down", h, f), ("head out_proj", 2, h)]


def _pruned(out_f: int, in_f: int, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=g, device=device).to(dtype)
    w.view(-1, 4)[:, 2:] = 0  # a valid 2:4 pattern
    return w


def semi_structured_linear_rows(device: torch.device, mode: str = "full", dtype: torch.dtype = torch.bfloat16,
                                tokens: int = 1024) -> list[Row]:
    """Per distinct Linear of RoBERTa-large: ``F.linear`` dense vs semi-structured, 2:4-pruned weights."""
    rounds, warmup = ROUNDS[mode]
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, out_f, in_f in roberta_large_linears():
        w = _pruned(out_f, in_f, device, dtype, g)
        x = torch.randn(tokens, in_f, generator=g, device=device).to(dtype)
        if semi_structured_unsupported_reason(w, 2, 4) is not None:
            return []
        try:
            sparse = torch.sparse.to_sparse_semi_structured(w)
            torch.nn.functional.linear(x, sparse)
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            print(f"bench_structured: {name} {out_f}x{in_f}: no semi-structured row ({exc})", file=sys.stderr)
            continue
        for method, weight in (("dense", w), ("semi-structured-2:4", sparse)):
            times = run_rounds(lambda: torch.nn.functional.linear(x, weight), device, rounds=rounds, warmup=warmup)
            r = Row(op="linear", method=method, backend="torch", shapes=f"{name} {out_f}x{in_f}, {tokens} tokens",
                    size=out_f * in_f, n_tensors=1, dtype=dtype_name(dtype)).with_conditions(device, mode)
            rows.append(timed_row(r, times, bytes_moved=0))
    return rows


def _encoder_stack(width_divisor: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Sequential:
    """24 layers of RoBERTa-large's encoder Linears (q, k, v, o chained, then FFN up and down), 2:4-pruned."""
    from fsam_kernels.sparsity import prune_nm

    g = torch.Generator().manual_seed(0)
    h, f = 1024 // width_divisor, 4096 // width_divisor
    layers = []
    for _ in range(24):
        for out_f, in_f in [(h, h)] * 4 + [(f, h), (h, f)]:
            lin = torch.nn.Linear(in_f, out_f)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * in_f ** -0.5)
            layers.append(lin)
        layers.append(torch.nn.LayerNorm(h))
    model = torch.nn.Sequential(*layers).to(device=device, dtype=dtype)
    prune_nm(model, "2:4")
    return model


def keep_pruned_rows(device: torch.device, mode: str = "full", dtype: torch.dtype = torch.bfloat16,
                     width_divisor: int = 1, tokens: int = 1024) -> list[Row]:
    """One FSAM(AdamW, structure="2:4") training step with ``keep_pruned`` off and on, and the masked
    write alone (``keep_pruned_write``)."""
    rounds, warmup = ROUNDS[mode]
    h = 1024 // width_divisor
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    rows = []
    for keep in (False, True):
        model = _encoder_stack(width_divisor, device, dtype)
        opt = FSAM(model.parameters(), torch.optim.AdamW, lr=1e-5, weight_decay=0.01, structure="2:4",
                   keep_pruned=keep, mask_update_interval=100)

        def loss():
            return model(x).float().pow(2).mean()

        def step():
            loss().backward()
            opt.step(lambda: loss().backward())
            opt.zero_grad()

        n = sum(p.numel() for p in model.parameters())
        shapes = f"roberta-large encoder Linears{'' if width_divisor == 1 else f'/{width_divisor}'}, {tokens} tokens"

        def row(op: str, method: str) -> Row:
            return Row(op=op, method=method, backend=opt.backend, shapes=shapes, size=n,
                       n_tensors=len(list(model.parameters())), dtype=dtype_name(dtype)).with_conditions(device, mode)

        times = run_rounds(step, device, rounds=rounds, warmup=max(warmup, 1))
        rows.append(timed_row(row("train_step", "keep_pruned" if keep else "no keep_pruned"), times, bytes_moved=0))
        if keep:
            for p in model.parameters():  # the base optimizer's step alone, for scale
                p.grad = torch.randn_like(p)
            times = run_rounds(opt.base_optimizer.step, device, rounds=rounds, warmup=max(warmup, 1))
            rows.append(timed_row(row("base_step", "AdamW"), times, bytes_moved=0))
            opt.zero_grad()
            layout = opt._current_layout()
            times = run_rounds(lambda: opt._mask.keep_support(layout), device, rounds=rounds, warmup=max(warmup, 1))
            written = sum(layout.params[layout.masked_index[j]].numel() * layout.params[0].element_size()
                          for j in opt._mask.support_positions)
            rows.append(timed_row(row("keep_pruned_write", "keep_pruned"), times, bytes_moved=written))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="2:4 end to end: semi-structured Linears of RoBERTa-large vs dense, "
                                            "and FSAM's training step with keep_pruned on and off")
    p.add_argument("--out", required=True, help="folder; rows are appended to OUT/structured.csv")
    p.add_argument("--mode", default="full", choices=sorted(ROUNDS))
    p.add_argument("--device", default="cuda", help="cuda (default; skipped without a GPU) or cpu (small width)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_structured: skipped, no CUDA device")
        return 0
    if device.type == "cuda":
        rows = semi_structured_linear_rows(device, args.mode) + keep_pruned_rows(device, args.mode)
    else:
        rows = keep_pruned_rows(device, args.mode, dtype=torch.float32, width_divisor=16, tokens=256)
    append_rows(Path(args.out) / "structured.csv", rows)
    for r in rows:
        print(f"{r.op:18s} {r.method:20s} {r.shapes:48s} p50 {r.p50_ms:9.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
