"""Per-op benchmark cases: every FSAM op, for every backend and every baseline, on one parameter set.

The four ops of one FSAM step, as the optimizer calls them through the Backend interface:

* ``fisher_accumulate`` - ``F += g*g`` into fp32 accumulators (``fisher="empirical"``).
* ``select_mask`` - the global top-k mask from this step's ``g*g`` (``fisher="batch"``).
* ``norm_perturb`` - the global gradient norm plus the (masked) perturbation, saving the originals.
* ``restore`` - writing the originals back.

Baselines (see :mod:`benchmarks.baselines`) run the same ops their own way; a baseline that has no
such op (dense SAM has no mask) has no case for it. ``device_copy`` (op ``copy``) is the yardstick of
the bandwidth-bound ops: one ``copy_`` of a buffer as large as the parameter set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fsam_kernels.backends import get_backend
from fsam_kernels.layout import ParamLayout

from .baselines import ForeachSAM, LoopSAM, NaiveFSAM
from .harness import Row, dtype_name, run_rounds, timed_row
from .shapes import ShapeSet

OPS = ("fisher_accumulate", "select_mask", "norm_perturb", "restore")
BASELINES = ("sam_loop", "sam_foreach", "fsam_naive", "foreach_addcmul", "device_copy")
SPARSITY = 0.9
RHO = 0.05
EPS = 1e-12


class Workload:
    """Random weights and gradients shaped like ``shape_set`` (weights ~ N(0, 1), grads ~ N(0, 1))."""

    def __init__(self, shape_set: ShapeSet, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        self.shape_set, self.dtype, self.device = shape_set, dtype, torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.params = []
        for shape in shape_set.shapes:
            p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=self.device, dtype=dtype))
            p.grad = torch.randn(shape, generator=gen, device=self.device, dtype=dtype)
            self.params.append(p)
        n = len(self.params)
        self.layout = ParamLayout(self.params, [True] * n, [RHO] * n, [False] * n)
        self.k = self.layout.k_for(SPARSITY)

    @property
    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]

    @property
    def numel(self) -> int:
        return self.layout.n_masked

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def bytes_needed(shape_set: ShapeSet, dtype: torch.dtype) -> int:
        """Rough device memory of the worst case: weights, grads, fp32 Fisher, a dense mask and a copy,
        plus ``torch.cat`` + ``topk`` temporaries of the naive baseline."""
        e = torch.empty((), dtype=dtype).element_size()
        return shape_set.numel * (6 * e + 4 + 8) + 2 * shape_set.numel * e  # + the device_copy buffers


# --------------------------------------------------------------------------- methods
class Method:
    """One implementation of the ops. ``name`` is the CSV ``method``, ``backend`` its backend."""

    name = ""
    backend = ""
    ops: tuple[str, ...] = ()

    def __init__(self, wl: Workload) -> None:
        self.wl = wl

    def op_fn(self, op: str) -> Callable[[], Any]:
        return getattr(self, op)

    def bytes_moved(self, op: str) -> int:
        raise NotImplementedError


class BackendFSAM(Method):
    """fsam_kernels through one backend, called exactly as :class:`fsam_kernels.FSAM` calls it."""

    ops = OPS

    def __init__(self, wl: Workload, backend_name: str) -> None:
        super().__init__(wl)
        self.name, self.backend = f"fsam[{backend_name}]", backend_name
        self.impl = get_backend(backend_name, wl.device)
        self.accum = [torch.zeros_like(p, dtype=torch.float32) for p in wl.params]
        with torch.no_grad():
            self.bits = self.impl.select_mask(wl.layout, wl.grads, wl.k, True)
            self.aux = self.impl.mask_aux(wl.layout, self.bits)
        self.saved: Any = None

    @torch.no_grad()
    def fisher_accumulate(self) -> None:
        self.impl.fisher_accumulate(self.accum, self.wl.grads)

    @torch.no_grad()
    def select_mask(self) -> torch.Tensor:
        return self.impl.select_mask(self.wl.layout, self.wl.grads, self.wl.k, True)

    @torch.no_grad()
    def norm_perturb(self) -> None:
        norm = self.impl.grad_norm(self.wl.layout, self.wl.grads)
        self.saved = self.impl.perturb(self.wl.layout, self.wl.grads, self.bits, self.aux, norm, EPS)

    @torch.no_grad()
    def restore(self) -> None:
        self.impl.restore(self.wl.layout, self.bits, self.aux, self.saved)
        self.saved = None

    def bytes_moved(self, op: str) -> int:
        n, e, d = self.wl.numel, self.wl.elem, self.wl.k / max(1, self.wl.numel)
        bits = n // 8
        return {
            "fisher_accumulate": n * (e + 8),            # read g, read+write fp32 F
            "select_mask": n * e + bits,                 # read g once, write the packed mask
            "norm_perturb": 2 * n * e + bits + int(3 * d * n * e),  # g twice, mask, kept w: read, write, save
            "restore": bits + int(2 * d * n * e),        # mask, read saved, write w
        }[op]


class _DenseBaseline(Method):
    ops = ("norm_perturb", "restore")
    factory: Callable[..., Any] = None  # type: ignore[assignment]
    restores_by_pointer = False

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        self.opt = type(self).factory(wl.params, rho=RHO, eps=EPS)

    def norm_perturb(self) -> None:
        self.opt.perturb()

    def restore(self) -> None:
        self.opt.restore()

    def bytes_moved(self, op: str) -> int:
        n, e = self.wl.numel, self.wl.elem
        if op == "norm_perturb":
            return 5 * n * e  # g for the norm; g, w read, w written, copy written
        return 0 if self.restores_by_pointer else 2 * n * e


class SamLoop(_DenseBaseline):
    name = "sam_loop"
    factory = LoopSAM
    restores_by_pointer = True  # p.data = old_p moves no data


class SamForeach(_DenseBaseline):
    name = "sam_foreach"
    factory = ForeachSAM


class FsamNaive(Method):
    name = "fsam_naive"
    ops = OPS

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        self.opt = NaiveFSAM(wl.params, rho=RHO, sparsity=SPARSITY, eps=EPS)
        self.opt.update_mask()

    def fisher_accumulate(self) -> None:
        self.opt.accumulate_fisher()

    def select_mask(self) -> None:
        self.opt.update_mask()

    def norm_perturb(self) -> None:
        self.opt.perturb()

    def restore(self) -> None:
        self.opt.restore()

    def bytes_moved(self, op: str) -> int:
        n, e = self.wl.numel, self.wl.elem
        return {
            "fisher_accumulate": 3 * n * e,       # read g, read+write F (parameter dtype)
            "select_mask": n * e + n * e,         # read scores, write the dense float mask
            "norm_perturb": 6 * n * e,            # as dense SAM, plus reading the dense mask
            "restore": 0,                         # p.data = old_p
        }[op]


class ForeachAddcmul(Method):
    """The Fisher accumulation users write with multi-tensor ops: ``torch._foreach_addcmul_``."""

    name = "foreach_addcmul"
    ops = ("fisher_accumulate",)

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        self.accum = [torch.zeros_like(p) for p in wl.params]  # parameter dtype: foreach needs one dtype

    @torch.no_grad()
    def fisher_accumulate(self) -> None:
        torch._foreach_addcmul_(self.accum, self.wl.grads, self.wl.grads)

    def bytes_moved(self, op: str) -> int:
        return 3 * self.wl.numel * self.wl.elem


class DeviceCopy(Method):
    """``dst.copy_(src)`` of one contiguous buffer with as many elements as the parameter set: the
    memory bandwidth the issue's Fisher target (>= 90 % of it) is measured against."""

    name = "device_copy"
    ops = ("copy",)

    def __init__(self, wl: Workload) -> None:
        super().__init__(wl)
        self.src = torch.ones(wl.numel, dtype=wl.dtype, device=wl.device)
        self.dst = torch.empty_like(self.src)

    @torch.no_grad()
    def copy(self) -> None:
        self.dst.copy_(self.src)

    def bytes_moved(self, op: str) -> int:
        return 2 * self.wl.numel * self.wl.elem  # read + write


_BASELINE_CLASSES = {"sam_loop": SamLoop, "sam_foreach": SamForeach, "fsam_naive": FsamNaive,
                     "foreach_addcmul": ForeachAddcmul, "device_copy": DeviceCopy}


def make_method(name: str, wl: Workload) -> Method:
    """``name``: a baseline of :data:`BASELINES` or ``fsam[<backend>]``."""
    if name.startswith("fsam[") and name.endswith("]"):
        return BackendFSAM(wl, name[5:-1])
    if name not in _BASELINE_CLASSES:
        raise ValueError(f"Invalid method: {name!r}; expected one of {list(_BASELINE_CLASSES)} or 'fsam[<backend>]'")
    return _BASELINE_CLASSES[name](wl)


def benchmark_backends(device: torch.device) -> list[str]:
    """The backends worth timing on ``device``: every available one except Triton's CPU interpreter
    (a correctness tool, orders of magnitude slower than any compiled code)."""
    from fsam_kernels import available_backends

    names = available_backends(device)
    if torch.device(device).type == "cpu":
        names = [n for n in names if n != "triton"]
    return names


def method_names(backends: list[str]) -> list[str]:
    return [f"fsam[{b}]" for b in backends] + list(BASELINES)


def method_ops(name: str) -> tuple[str, ...]:
    if name.startswith("fsam["):
        return OPS
    return _BASELINE_CLASSES[name].ops


@dataclass
class Schedule:
    """How an op is timed: ``fn`` per round, with untimed ``setup``/``teardown`` keeping the weights
    unperturbed between rounds."""

    fn: Callable[[], Any]
    setup: Optional[Callable[[], Any]] = None
    teardown: Optional[Callable[[], Any]] = None


def schedule(method: Method, op: str) -> Schedule:
    if op == "norm_perturb":
        return Schedule(method.norm_perturb, teardown=method.restore)
    if op == "restore":
        return Schedule(method.restore, setup=method.norm_perturb)
    return Schedule(method.op_fn(op))


def measure(wl: Workload, method: Method, op: str, *, rounds: int, warmup: int, mode: str,
            pedantic: Optional[Callable[..., Any]] = None) -> Row:
    """Time ``op`` of ``method`` on ``wl`` and return its row."""
    s = schedule(method, op)
    times = run_rounds(s.fn, wl.device, rounds=rounds, warmup=warmup, setup=s.setup, teardown=s.teardown,
                       pedantic=pedantic)
    row = Row(op=op, method=method.name, backend=method.backend, shapes=wl.shape_set.name, size=wl.numel,
              n_tensors=wl.shape_set.n_tensors, dtype=dtype_name(wl.dtype)).with_conditions(wl.device, mode)
    return timed_row(row, times, method.bytes_moved(op))
