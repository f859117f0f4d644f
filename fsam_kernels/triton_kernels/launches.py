"""Every Triton launch the backend makes, recorded by running its ops on tiny CPU inputs.

:mod:`.compile_check` compiles for a GPU exactly what this records, so the check cannot drift from
the launch sites: the same constexprs, ``num_warps`` and fp-fusion setting, and the runtime
specialisations Triton's JIT derives from the arguments (pointers and integers divisible by 16,
integers equal to 1, which become constants). The ops run in the Triton interpreter, each launch is
recorded and then executed as usual, so the host code takes its real paths.

``python -m fsam_kernels.triton_kernels.launches`` prints the records as JSON (one per line); it
sets ``TRITON_INTERPRET=1`` itself, so run it in its own process.
"""
from __future__ import annotations

import inspect
import json
import os
import sys
from typing import Any, Callable

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann)))


def _constexpr_value(v: Any) -> Any:
    import triton.language as tl

    v = getattr(v, "value", v) if isinstance(v, tl.constexpr) else v
    if isinstance(v, tl.dtype):
        return {"dtype": v.name}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    raise TypeError(f"launch recorder: constexpr of unsupported type {type(v).__name__}: {v!r}")


def record(fn, args: tuple, kwargs: dict) -> dict:
    """The compile-relevant description of one launch of the ``@triton.jit`` function ``fn.fn``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = list(inspect.signature(fn.fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    constexprs, runtime = {}, {}
    # do_not_specialize arguments: never a constant nor "divisible by 16" (the JIT's keys for them)
    dns = getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize") or ()
    fixed = [params[a].name if isinstance(a, int) else a for a in dns]
    for p in params:
        if p.name not in bound:  # a default value
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{fn.fn.__name__}: argument {p.name} missing")
            bound[p.name] = p.default
        value = bound[p.name]
        if _is_constexpr(p):
            constexprs[p.name] = _constexpr_value(value)
        else:
            # The JIT's own specialisation: (type, "D" when divisible by 16) or ("constexpr", 1).
            kind, key = native_specialize_impl(BaseBackend, value, False, p.name not in fixed, p.name not in fixed)[:2]
            runtime[p.name] = [kind, key if isinstance(key, (str, int)) else None]
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    rec = {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "constexprs": constexprs,
           "runtime": runtime, "options": options}
    if fixed:
        rec["unspecialized"] = sorted(fixed)
    return rec


def recording(sink: list) -> Callable[[], None]:
    """Record every interpreted launch into ``sink`` (deduplicated); returns the function that stops it."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    seen = set()

    def run(self, *args, grid, warmup, **kwargs):
        rec = record(self, args, kwargs)
        key = json.dumps(rec, sort_keys=True)
        if key not in seen:
            seen.add(key)
            sink.append(rec)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    return lambda: setattr(InterpretedFunction, "run", original)


def _scenarios(backend) -> None:
    """Run every op of the Triton backend along every host path, on tiny inputs."""
    import torch

    from .. import distributed_select as ds
    from ..layout import ParamLayout

    gen = torch.Generator().manual_seed(0)

    def layout(shapes, dtypes, masked=None, adaptive=None):
        params = [torch.randn(s, generator=gen).to(dt) for s, dt in zip(shapes, dtypes)]
        n = len(shapes)
        return ParamLayout(params, masked or [True] * n, [0.05] * n, adaptive or [False] * n)

    def grads_of(lay):
        return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in lay.params]

    def full_step(lay, grads, k, square):
        scores = [grads[i] for i in lay.masked_index]
        if not square:
            scores = [s.float().square() for s in scores]
        bits = backend.select_mask(lay, scores, k, square)
        aux = backend.mask_aux(lay, bits)
        norm = backend.grad_norm(lay, grads)
        saved = backend.perturb(lay, grads, bits, aux, norm, 1e-12)
        backend.restore(lay, bits, aux, saved)
        return bits

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    sizes = [1, 7, 123, 4097]
    for dt in dtypes:
        lay = layout(sizes, [dt] * 4)
        grads = grads_of(lay)
        acc = [torch.zeros(n) for n in sizes]
        backend.fisher_accumulate(acc, grads)
        full_step(lay, grads, lay.n_masked // 3, True)
        full_step(lay, grads, lay.n_masked, True)  # k = N
        # ASAM, dense tensors among masked ones, empirical-Fisher (fp32) scores
        lay = layout(sizes, [dt] * 4, masked=[True, False, True, False], adaptive=[True, True, False, False])
        full_step(lay, grads_of(lay), 5, False)
        # empirical-Fisher scores in the weights' low precision
        lay = layout(sizes, [dt] * 4)
        backend.select_mask(lay, [g.abs() for g in grads_of(lay)], 50, False)
    # every candidate launch shape of the perturbation and the restore (perturb.PERTURB_CANDIDATES)
    from . import perturb

    shape = (perturb.PERTURB_WARPS, perturb.PERTURB_SPLIT)
    try:
        for perturb.PERTURB_WARPS, perturb.PERTURB_SPLIT in perturb.PERTURB_CANDIDATES:
            for dt in dtypes:
                lay = layout([4097, 123], [dt] * 2, masked=[True, False])
                full_step(lay, grads_of(lay), 500, True)
    finally:
        perturb.PERTURB_WARPS, perturb.PERTURB_SPLIT = shape
    # tensors that are views into one flat buffer at an odd offset (none on 16 bytes): the streaming
    # kernels' masked path for every chunk
    def views(sizes, dt):
        flat = torch.randn(1 + sum(sizes), generator=gen).to(dt)
        return list(torch.split(flat[1:], sizes))

    for dt in (torch.float32, torch.bfloat16):
        lay = ParamLayout(views([4097, 123], dt), [True, True], [0.05] * 2, [True, False])
        grads = views([4097, 123], dt)
        backend.fisher_accumulate(views([4097, 123], torch.float32), grads)
        full_step(lay, grads, 900, True)
        backend.key_histogram(lay, grads, True, 0, ds.PASS_SHIFTS[0], ds.RADIX_BITS)
        backend.mask_from_threshold(lay, grads, True, 0x3E000000, [3, 0])
    # mixed alignment in one launch: a tensor on 16 bytes (vector path) beside views at odd offsets
    for dt in (torch.float32, torch.bfloat16):
        lay = ParamLayout([torch.randn(4097, generator=gen).to(dt)] + views([4097, 123], dt), [True] * 3, [0.05] * 3,
                          [True, False, True])
        grads = [torch.randn(4097, generator=gen).to(dt)] + views([4097, 123], dt)
        full_step(lay, grads, 900, True)
    # mixed dtypes in one layout; one tensor of one chunk (integer arguments equal to 1)
    lay = layout([300, 5000, 77], [torch.float32, torch.bfloat16, torch.float16])
    full_step(lay, grads_of(lay), 1000, True)
    lay = layout([100], [torch.float32])
    full_step(lay, grads_of(lay), 1, True)
    acc = [torch.zeros(100)]
    backend.fisher_accumulate(acc, grads_of(lay))
    # an fp64 tensor makes the norm fp64 (its squares come from the reference)
    lay = layout([300, 50], [torch.float32, torch.float64])
    backend.grad_norm(lay, grads_of(lay))
    # the sampled bracket, single-program and parallel threshold searches
    saved = (backend.sample_size, backend.candidate_capacity, backend.parallel_select_min)
    try:
        backend.sample_size, backend.candidate_capacity = 256, 512
        for parallel_min in (1 << 62, 0):
            backend.parallel_select_min = parallel_min
            lay = layout([3000, 9000, 1], [torch.float32] * 3)
            full_step(lay, grads_of(lay), 1200, True)
            lay = layout([3000, 9000], [torch.bfloat16] * 2)
            full_step(lay, grads_of(lay), 3000, False)
    finally:
        backend.sample_size, backend.candidate_capacity, backend.parallel_select_min = saved
    # a bracket whose candidates overflow: the repair's radix passes over the scores, both variants
    saved = (backend.sample_size, backend.max_sample_size, backend.candidate_capacity,
             backend.max_candidate_capacity, backend.parallel_select_min)
    try:
        backend.sample_size = backend.max_sample_size = 64
        backend.candidate_capacity = backend.max_candidate_capacity = 4
        for parallel_min in (1 << 62, 0):
            backend.parallel_select_min = parallel_min
            for dt in dtypes:
                lay = layout([3000, 9000, 1], [dt] * 3)
                bits = full_step(lay, grads_of(lay), 1200, True)
            backend.mask_aux(lay, bits.clone())  # a mask it did not build (a checkpoint's): counted from the bits
    finally:
        (backend.sample_size, backend.max_sample_size, backend.candidate_capacity, backend.max_candidate_capacity,
         backend.parallel_select_min) = saved
    # FSDP2's sharded top-k: histograms below and at the top digit, the mask from a threshold
    for dt in dtypes:
        lay = layout([123, 4097], [dt] * 2)
        scores = grads_of(lay)
        for shift in ds.PASS_SHIFTS:
            backend.key_histogram(lay, scores, True, 0, shift, ds.RADIX_BITS)
        backend.mask_from_threshold(lay, scores, True, 0x3E000000, [3, 0])
    lay = layout([123, 4097], [torch.float32] * 2)
    backend.key_histogram(lay, [g.square() for g in grads_of(lay)], False, 0, ds.PASS_SHIFTS[0], ds.RADIX_BITS)
    # N:M masks, with and without the weights' support, scores in each dtype
    for dt in dtypes:
        lay = layout([(4, 16), (8, 16)], [dt] * 2)
        grads = grads_of(lay)
        backend.select_nm_mask(lay, grads, 2, 4, True)
        backend.select_nm_mask(lay, grads, 2, 4, True, support=lay.params)
    lay = layout([(8, 16)], [torch.float32])
    backend.select_nm_mask(lay, [g.square() for g in grads_of(lay)], 3, 16, False)


def record_all() -> list[dict]:
    """Records of every launch of the backend's ops (sets TRITON_INTERPRET=1: call in a fresh process)."""
    os.environ["TRITON_INTERPRET"] = "1"
    from ..backends import get_backend

    backend = get_backend("triton", "cpu")
    sink: list = []
    stop = recording(sink)
    try:
        _scenarios(backend)
    finally:
        stop()
    return sink


if __name__ == "__main__":
    for rec in record_all():
        sys.stdout.write(json.dumps(rec, sort_keys=True) + "\n")
