"""Host time of a plain step: FSAM's Python per ``first_step`` + ``second_step`` (no mask update) at
RoBERTa-large's 393 tensors, with the kernel launches replaced by recorders, beside the same measure
for a foreach dense SAM.

What is timed is the host code between the launches: checks, caches, tables, allocations. The kernels
do not run: Triton's launches are recorded instead (the interpreter's entry point, so this runs on any
machine with ``TRITON_INTERPRET=1``), the native ops are stubbed (their argument conversion is not
counted), the base optimizer's step is a no-op. Foreach SAM runs its ``torch._foreach_*`` ops on
393 tensors of 1/1024 of RoBERTa-large's width (a few thousand values), where the ops' own work is
negligible next to their dispatch. ``python -m benchmarks.host_time [--rounds N] [--profile]``
prints one line per method; the ``launches`` part of ``benchmarks/run.py`` adds the rows
(``op=host_step``).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Callable

HOST_METHODS = ("fsam-triton", "fsam-native", "foreach-sam")
WIDTH_DIVISOR = 1024  # the tensors' values: irrelevant to FSAM's host code, kept small for foreach SAM


def _shapes():
    from .shapes import roberta_large

    return roberta_large(WIDTH_DIVISOR)


@contextlib.contextmanager
def _triton_recorder(sink: list):
    """Interpreted Triton launches recorded, not run; the norm's final kernel writes 1.0 (a finite norm)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        sink.append(name)
        if name == "_sqrt_of_sum_kernel":  # (partials, total, extra, out): the norm, as the device would
            out = args[3]
            ctypes.c_float.from_address(out.data_ptr()).value = 1.0
        return None

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def _native_stubs(backend, sink: list):
    import torch

    real = backend._op

    def grad_norm(*args):
        sink.append("grad_norm")
        return torch.ones((), dtype=torch.float32)

    def call(name):
        def stub(*args):
            sink.append(name)
        return stub

    backend._op = SimpleNamespace(grad_norm=grad_norm, masked_perturb=call("masked_perturb"),
                                  masked_restore=call("masked_restore"))
    try:
        yield
    finally:
        backend._op = real


def _fsam_setup(backend_name: str):
    import torch

    from fsam_kernels import FSAM

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in _shapes().shapes]
    opt = FSAM(params, torch.optim.SGD, rho=0.05, sparsity=0.9, mask_update_interval=1 << 30, lr=0.0,
               backend=backend_name.removeprefix("fsam-"))
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.first_step()  # the mask update, for real
    opt.second_step()
    opt.base_optimizer.step = lambda *a, **k: None  # FSAM's own host code only
    sink: list = []
    if backend_name == "fsam-triton":
        stubs = _triton_recorder(sink)
    else:
        stubs = _native_stubs(opt._mask.backend, sink)

    def step():
        opt.first_step()
        opt.second_step()

    return step, stubs, sink


def _foreach_setup():
    import torch

    from .baselines import ForeachSAM

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in _shapes().shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = ForeachSAM(params, rho=0.05)

    def step():
        opt.first_step()
        opt.second_step()

    return step, contextlib.nullcontext(), []


def measure(method: str, rounds: int = 300, warmup: int = 30, profile: bool = False) -> dict:
    """Per-step host times (seconds) of ``method`` (one of :data:`HOST_METHODS`), and the launches
    (or op calls) recorded per step."""
    step, stubs, sink = _foreach_setup() if method == "foreach-sam" else _fsam_setup(method)
    times = []
    with stubs:
        for _ in range(warmup):
            step()
        sink.clear()
        step()
        per_step = list(sink)
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(rounds):
                step()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        for _ in range(rounds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"times": times, "launches": per_step}


def available(method: str) -> str:
    """Why ``method`` cannot be measured here ('' if it can)."""
    if method == "foreach-sam":
        return ""
    from fsam_kernels.backends import BackendUnavailable, get_backend

    try:
        get_backend(method.removeprefix("fsam-"), "cpu")
    except BackendUnavailable as exc:
        return str(exc)
    return ""


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton's entry point on CPU tensors (nothing runs)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--methods", default=",".join(HOST_METHODS))
    ap.add_argument("--profile", action="store_true", help="print a cProfile of each method's steps")
    ap.add_argument("--json", action="store_true", help="one JSON object per method (for benchmarks/bench_host.py)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    for method in args.methods.split(","):
        reason = available(method)
        if reason:
            print(f"{method}: skipped ({reason})")
            continue
        r = measure(method, args.rounds, warmup=min(30, args.rounds), profile=args.profile)
        t = sorted(r["times"])
        if args.json:
            print(json.dumps({"method": method, "times": t, "launches": r["launches"],
                              "shapes": _shapes().name, "size": _shapes().numel, "n_tensors": _shapes().n_tensors}))
            continue
        q = lambda f: t[min(len(t) - 1, int(f * len(t)))] * 1e3
        print(f"{method:<12} {len(_shapes().shapes)} tensors: host ms/step p20 {q(0.2):.3f} p50 "
              f"{statistics.median(t) * 1e3:.3f} p80 {q(0.8):.3f} ({len(t)} steps; launches/op calls per step: "
              f"{len(r['launches'])} {sorted(set(r['launches']))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
