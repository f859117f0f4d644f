"""The ``"triton"`` backend: every FSAM op as a few multi-tensor Triton launches.

Launches per op, whatever the number of parameter tensors (one launch per (weight dtype, gradient
dtype) group; a model usually has one group):

* ``fisher_accumulate``: 1 per gradient dtype.
* ``grad_norm``: 1 per group + 1 final reduction.
* ``select_mask``: 7 (see :mod:`fsam_kernels.triton_kernels.select`), one host synchronisation; it
  also yields the mask's per-chunk prefix counts, so the following ``mask_aux`` costs nothing. From
  ``parallel_select_min`` masked values on, 19: the single-program searches become radix passes
  over many programs (:mod:`fsam_kernels.triton_kernels.radix`) and the scan three launches over
  blocks of chunks. A sampled bracket that missed (rare) costs 4 radix passes over the scores and a
  second write, exact; the reference is never called.
* ``perturb`` and ``restore``: 1 per group each.
* under FSDP2 (sharded scores), ``key_histogram``: 1 per radix pass; ``mask_from_threshold``: 2 and a
  few small torch ops (see :mod:`fsam_kernels.triton_kernels.histogram`).

Tensors the kernels do not handle (float64 weights or gradients) go through the pure-torch reference
for those tensors only. Device tables (pointers, sizes, chunk lists) are cached by the tensors'
addresses; a step whose gradients moved only uploads a new table of gradient pointers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import weakref
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from .. import reference as ref
from ..layout import ParamLayout
from ..triton_kernels import N_GROUPS, interpret_env, interpreted, mode_conflict
from ..triton_kernels.tables import DTYPE_CODES, chunk_table, pointer_table, upload
from .base import Backend, tensors_nbytes
from .tables import TableCache


def _device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernel modules by name, imported (with Triton) on first use: importing Triton fixes whether
    kernels run compiled or in the interpreter, and loading the backend (e.g. to list the
    backends) must not."""
    from ..triton_kernels import fisher, histogram, nm_mask, norm, perturb, select

    return SimpleNamespace(fisher=fisher, histogram=histogram, nm_mask=nm_mask, norm=norm, perturb=perturb,
                           select=select)


# The oldest Triton the kernels run on: tl.histogram(..., mask=) came in 3.4 (3.0 also rejects the
# block sizes nested jit functions get as arguments of tl.arange). pip installs the Triton that torch
# pins: torch 2.8 brings 3.4, older torch an older Triton.
TRITON_FLOOR = (3, 4)


def triton_problem(triton: Any = None) -> Optional[str]:
    """Why the installed Triton (or the module ``triton``) cannot run these kernels, with the fix;
    ``None`` if it can. Probes the features the kernels use as well as the version number.
    Imports Triton: call it where the kernels would run next."""
    if triton is None:
        import triton
    import inspect
    import re

    version = str(getattr(triton, "__version__", "0"))
    missing = []
    nums = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
    if nums < TRITON_FLOOR:
        missing.append(f"version >= {'.'.join(map(str, TRITON_FLOOR))}")
    try:
        histogram_args = inspect.signature(triton.language.histogram).parameters
    except (AttributeError, TypeError, ValueError):
        histogram_args = {}
    if "mask" not in histogram_args:
        missing.append("tl.histogram(..., mask=)")
    if not missing:
        return None
    floor = ".".join(map(str, TRITON_FLOOR))
    return (f"Triton {version} is too old for fsam_kernels' kernels (they need {' and '.join(missing)}); "
            f"install torch >= 2.8, whose wheels bring Triton >= {floor}, or pip install 'triton>={floor}' "
            f"(pip then warns that it differs from the Triton your torch pins); backend='native' needs no Triton")


_OTHER_GROUP = 3  # saved-buffer group of weights the kernels do not handle (reference path)


@dataclass
class _Group:
    """Perturbed tensors sharing a weight dtype and a gradient dtype: one launch per op."""

    w_dtype: torch.dtype
    g_dtype: torch.dtype
    params: list[int]
    w_ptrs: torch.Tensor
    g_ptrs: Optional[torch.Tensor]  # bound per call by _groups_for
    numels: torch.Tensor
    bit_offsets: torch.Tensor  # -1 for dense tensors
    rhos: Optional[torch.Tensor]  # bound per call by _bind_rhos (rho may follow a schedule)
    adaptive: torch.Tensor
    chunk_slot: torch.Tensor
    chunk_start: torch.Tensor
    chunk_ref: torch.Tensor  # masked: index among all masked chunks; dense: offset in the saved buffer
    n_chunks: int


class _LayoutPlan:
    """Everything derived from a layout's tensors (not its rho values), built once per tensors_key."""

    def __init__(self, layout: ParamLayout) -> None:
        self.group_of_param = [DTYPE_CODES.get(p.dtype, _OTHER_GROUP) for p in layout.params]
        self.masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
        # Dense tensors come first in their group's saved buffer, at offsets fixed by the layout.
        self.dense_offset: dict[int, int] = {}
        totals = [0] * N_GROUPS
        for i in layout.dense_index:
            code = self.group_of_param[i]
            self.dense_offset[i] = totals[code]
            totals[code] += layout.numel[i]
        self.dense_total = tuple(totals)
        self.masked = _kernels().select.MaskedPlan(layout, self.group_of_param) if layout.masked_index else None
        self.groups = TableCache()  # perturbation groups, by the weights' addresses and the grads' dtypes
        self.grad_ptrs = TableCache(16)  # gradient-pointer tables, by the gradients' addresses
        self.rhos = TableCache(16)  # per-group rho tables, by the rho values
        # What the last step derived from its gradients, by their grad_signature (see layout.CheckedGrads):
        # the check, the bound groups, the norm dtype; a step whose gradients match it skips them.
        self.last_step: dict[str, tuple] = {}


@dataclass
class _Saved:
    groups: list[_Group]
    buffers: dict[int, torch.Tensor]  # weight-dtype code -> compact originals
    applied: torch.Tensor  # int32 flag written by the perturb kernel: 0 if the norm was not finite
    bits: torch.Tensor
    prefix: torch.Tensor
    dense_total: tuple[int, ...]
    fallback: Optional[list]  # reference ``saved`` list of the tensors done by the reference
    plan: _LayoutPlan  # where each tensor's originals are in ``buffers``
    write: Optional[tuple] = None  # what write_perturb launches: (kernel launches, the reference's write)
    launched: int = 0  # groups whose perturb kernel was launched (restore undoes those)


class TritonBackend(Backend):
    name = "triton"
    # Global top-k mask (see :mod:`fsam_kernels.triton_kernels.select_plan` for the sizes and their
    # memory bound). Keys sampled for the bracket: at least this many, growing like N**(2/3) ...
    sample_size = 1 << 18
    max_sample_size = 1 << 26  # ... up to this many (256 MiB, reached from ~2**37 values)
    # Candidate buffer (int32 keys): at least this many, grown to the bracket's expected count, up to
    # what the memory budget (64 MiB + N / 64 bytes) leaves, or to max_candidate_capacity if set.
    candidate_capacity = 1 << 22
    max_candidate_capacity: Optional[int] = None
    # From this many masked values on, the bracket, the threshold among the candidates and the scan
    # run over many programs (radix passes, blocks of scan_block chunks) rather than in one program
    # each, whose single SM takes milliseconds over millions of candidates or chunks.
    parallel_select_min = 1 << 24
    scan_block = 1024

    def __init__(self) -> None:
        self._plans = TableCache(4)  # tensors_key -> _LayoutPlan
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._last_mask: Optional[tuple] = None  # (weakref to bits, version, layout.tensors_key, aux)
        # masks whose sampled bracket missed the k-th key or whose candidates overflowed: finished by
        # radix passes over the scores (exact, a few more streaming reads)
        self.select_fallbacks = 0
        self._triton_installed: Optional[bool] = None  # looked up once, without importing Triton
        self._triton_problem: Optional[tuple[Optional[str]]] = None  # triton_problem(), once it is asked

    def select_plan(self, n_total: int, n_chunks: int, k: int):
        """Sizes of the mask update of ``k`` of ``n_total`` values in ``n_chunks`` chunks (host
        arithmetic, nothing allocated): :class:`~fsam_kernels.triton_kernels.select_plan.SelectPlan`."""
        from ..triton_kernels.select_plan import plan_select

        return plan_select(n_total, n_chunks, k, least_samples=self.sample_size, most_samples=self.max_sample_size,
                           least_capacity=self.candidate_capacity, most_capacity=self.max_candidate_capacity,
                           parallel_min=self.parallel_select_min, scan_block=self.scan_block)

    # ------------------------------------------------------------------ device support
    def supports(self, device: torch.device) -> bool:
        return self.unsupported_reason(device) is None

    def unsupported_reason(self, device) -> Optional[str]:
        """Why this backend cannot run on ``device`` (``None`` if it can)."""
        dev = torch.device(device)
        if self._triton_installed is None:
            self._triton_installed = importlib.util.find_spec("triton") is not None
        if not self._triton_installed:
            return "Triton is not installed (pip install triton)"
        mode = interpreted()
        if dev.type == "cuda":
            if mode:
                return ("the Triton kernels were loaded with TRITON_INTERPRET=1 and run on CPU tensors only; "
                        "unset it to run them on CUDA")
            if not torch.cuda.is_available():
                return "no CUDA device is available"
            return mode_conflict() or self._version_problem()
        if dev.type == "cpu":
            if not mode:
                if interpret_env():
                    return ("TRITON_INTERPRET=1 was set after fsam_kernels' Triton kernels were imported; set it "
                            "before importing them")
                return ("Triton runs on CUDA tensors; set TRITON_INTERPRET=1 to run its kernels on the CPU "
                        "(slow, for tests; Triton's interpreter needs numpy: pip install numpy)")
            if importlib.util.find_spec("numpy") is None:
                return "Triton's interpreter (TRITON_INTERPRET=1) needs numpy: pip install numpy"
            return mode_conflict() or self._version_problem()
        return f"Triton kernels run on CUDA tensors, not on {dev.type}"

    def _version_problem(self) -> Optional[str]:
        # Asked last, where the kernels would run next: importing Triton here fixes no mode they would not get.
        if self._triton_problem is None:
            self._triton_problem = (triton_problem(),)
        return self._triton_problem[0]

    # ------------------------------------------------------------------ caches
    def _plan(self, layout: ParamLayout) -> _LayoutPlan:
        # Keyed by the tensors_key token (held by the cache, so its id is never reused): layouts that
        # differ only in rho share one plan. Least recently used out: a transient layout (an N:M
        # mask's fallback tensors) must not evict the optimizer's own.
        return self._plans.get(layout.tensors_key, lambda: _LayoutPlan(layout))

    def _device_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a dummy mask, dummy prefix counts, a one-element fp64 zero), allocated once per device: the
        arguments of launches that touch no masked tensor."""
        if device not in self._constants:
            self._constants[device] = (
                torch.zeros(64, dtype=torch.uint8, device=device),
                torch.zeros(1, dtype=torch.int64, device=device),
                torch.zeros(1, dtype=torch.float64, device=device),
            )
        return self._constants[device]

    def _groups_for(self, layout: ParamLayout, plan: _LayoutPlan, grads: Sequence[Optional[torch.Tensor]]):
        """The perturbation groups for these gradients, with their gradient-pointer tables. The chunk
        tables depend only on which parameters have a gradient (and its dtype); the gradients' own
        addresses, which may change every backward pass, only select a small pointer table."""
        sig = getattr(grads, "signature", None)
        last = plan.last_step.get("groups")
        if sig is not None and last is not None and last[0] == sig:
            return last[1]
        shape_key = (
            tuple(p.data_ptr() for p in layout.params),
            tuple(None if g is None else g.dtype for g in grads),
        )
        groups, fallback = plan.groups.get(shape_key, lambda: self._build_groups(layout, plan, grads))
        bound = []
        for gi, group in enumerate(groups):
            members = [grads[i] for i in group.params]
            ptrs = plan.grad_ptrs.get(
                (shape_key, gi, tuple(g.data_ptr() for g in members)),
                lambda: pointer_table(members, layout.device),
            )
            bound.append(dataclasses.replace(group, g_ptrs=ptrs))
        if sig is not None:
            plan.last_step["groups"] = (sig, (bound, fallback))
        return bound, fallback

    @staticmethod
    def _bind_rhos(layout: ParamLayout, plan: _LayoutPlan, group: _Group) -> _Group:
        """The group with its members' rho values as a device table (uploaded once per distinct values)."""
        values = tuple(layout.rho[i] for i in group.params)
        rhos = plan.rhos.get(
            (tuple(group.params), values),
            lambda: upload(torch.tensor(values, dtype=torch.float32), layout.device),
        )
        return dataclasses.replace(group, rhos=rhos)

    def _build_groups(self, layout: ParamLayout, plan: _LayoutPlan, grads) -> tuple[list[_Group], list[int]]:
        members: dict[tuple, list[int]] = {}
        fallback = []
        for i, (p, g) in enumerate(zip(layout.params, grads)):
            if g is None:
                continue
            if p.dtype in DTYPE_CODES and g.dtype in DTYPE_CODES:
                members.setdefault((p.dtype, g.dtype), []).append(i)
            else:
                fallback.append(i)
        device = layout.device
        first_chunk = plan.masked.first_chunk if plan.masked is not None else []
        groups = []
        for (w_dtype, g_dtype), idx in members.items():
            numels = [layout.numel[i] for i in idx]
            masked = torch.tensor([i in plan.masked_pos for i in idx])
            bit_offsets = [layout.bit_offset[plan.masked_pos[i]] if i in plan.masked_pos else -1 for i in idx]
            masked_first = torch.tensor([first_chunk[plan.masked_pos[i]] if i in plan.masked_pos else 0 for i in idx],
                                        dtype=torch.int64)
            dense_off = torch.tensor([plan.dense_offset.get(i, 0) for i in idx], dtype=torch.int64)
            slot, start, local = chunk_table(numels)
            s = slot.long()
            chunk_ref = torch.where(masked[s], masked_first[s] + local, dense_off[s] + start)
            groups.append(_Group(
                w_dtype=w_dtype,
                g_dtype=g_dtype,
                params=idx,
                w_ptrs=pointer_table([layout.params[i] for i in idx], device),
                g_ptrs=None,
                numels=upload(torch.tensor(numels, dtype=torch.int64), device),
                bit_offsets=upload(torch.tensor(bit_offsets, dtype=torch.int64), device),
                rhos=None,
                adaptive=upload(torch.tensor([int(layout.adaptive[i]) for i in idx], dtype=torch.int32), device),
                chunk_slot=upload(slot, device),
                chunk_start=upload(start, device),
                chunk_ref=upload(chunk_ref, device),
                n_chunks=slot.numel(),
            ))
        return groups, fallback

    # ------------------------------------------------------------------ input checks
    def _checked_grads(self, layout: ParamLayout, plan: _LayoutPlan, grads, op: str) -> list[Optional[torch.Tensor]]:
        """:meth:`_check_grads`, once per gradient signature (contiguous gradients: nothing to copy)."""
        sig = getattr(grads, "signature", None)
        if sig is not None and plan.last_step.get("checked") == (sig,):
            return grads
        out = self._check_grads(layout, grads, op)
        if sig is not None and all(a is b for a, b in zip(out, grads)):
            plan.last_step["checked"] = (sig,)
        return out

    def _norm_dtype(self, layout: ParamLayout, plan: _LayoutPlan, grads) -> torch.dtype:
        sig = getattr(grads, "signature", None)
        last = plan.last_step.get("norm_dtype")
        if sig is not None and last is not None and last[0] == sig:
            return last[1]
        dtype = ref.norm_dtype(layout, grads)
        if sig is not None:
            plan.last_step["norm_dtype"] = (sig, dtype)
        return dtype

    @staticmethod
    def _check_grads(layout: ParamLayout, grads, op: str) -> list[Optional[torch.Tensor]]:
        if len(grads) != len(layout.params):
            raise ValueError(
                f"{op}: expected {len(layout.params)} grads (one per perturbed parameter), got {len(grads)}")
        out = []
        for i, (p, g) in enumerate(zip(layout.params, grads)):
            if g is not None:
                if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                    raise TypeError(f"{op}: expected grads[{i}] to be a floating-point tensor, got {type(g).__name__}"
                                    f"{'' if not isinstance(g, torch.Tensor) else ' of dtype ' + str(g.dtype)}")
                if g.numel() != p.numel():
                    raise ValueError(f"{op}: expected grads[{i}] with {p.numel()} elements, got {g.numel()}")
                if g.device != p.device:
                    raise ValueError(f"{op}: expected grads[{i}] on {p.device}, got {g.device}")
                if not g.is_contiguous():
                    g = g.contiguous()  # the kernels address elements in row-major order
            out.append(g)
        return out

    @staticmethod
    def _check_bits(layout: ParamLayout, bits, op: str) -> None:
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.numel() != layout.mask_bytes:
            raise ValueError(f"{op}: expected a packed uint8 mask of {layout.mask_bytes} bytes, got "
                             f"{bits.dtype if isinstance(bits, torch.Tensor) else type(bits).__name__}"
                             f"{' of ' + str(bits.numel()) + ' bytes' if isinstance(bits, torch.Tensor) else ''}")
        if bits.device != layout.device:
            raise ValueError(f"{op}: expected the mask on {layout.device}, got {bits.device}")

    @staticmethod
    def _word_aligned(bits: torch.Tensor) -> torch.Tensor:
        """The mask, on 4 bytes (the kernels read it in 32-bit words): a view at an odd offset, e.g. of
        a checkpoint's buffer, is copied."""
        return bits if bits.data_ptr() % 4 == 0 else bits.clone()

    # ------------------------------------------------------------------ Fisher
    def fisher_accumulate(self, accum: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
        if len(accum) != len(grads):
            raise ValueError(
                f"fisher_accumulate: expected as many grads as accumulators, got {len(grads)} and {len(accum)}")
        gs = []
        for i, (a, g) in enumerate(zip(accum, grads)):
            if not isinstance(a, torch.Tensor) or a.dtype != torch.float32 or not a.is_contiguous():
                raise ValueError(f"fisher_accumulate: expected accum[{i}] to be a contiguous float32 tensor")
            if not isinstance(g, torch.Tensor) or not g.is_floating_point():
                raise TypeError(f"fisher_accumulate: expected grads[{i}] to be a floating-point tensor")
            if g.numel() != a.numel() or g.device != a.device:
                raise ValueError(f"fisher_accumulate: grads[{i}] ({g.numel()} elements on {g.device}) does not match "
                                 f"accum[{i}] ({a.numel()} elements on {a.device})")
            gs.append(g if g.is_contiguous() else g.contiguous())
        if not accum:
            return
        with _device_guard(accum[0].device):
            rest = _kernels().fisher.fisher_accumulate(list(accum), gs)
        if rest:
            ref.fisher_accumulate_reference([accum[i] for i in rest], [gs[i] for i in rest])

    # ------------------------------------------------------------------ mask
    @staticmethod
    def _check_scores(layout: ParamLayout, scores, op: str) -> list[torch.Tensor]:
        """The scores, validated, contiguous and of one kernel dtype."""
        if len(scores) != len(layout.masked_index):
            raise ValueError(f"{op}: expected {len(layout.masked_index)} score tensors (one per masked "
                             f"parameter), got {len(scores)}")
        for j, (s, i) in enumerate(zip(scores, layout.masked_index)):
            if not isinstance(s, torch.Tensor) or not s.is_floating_point():
                raise TypeError(f"{op}: expected scores[{j}] to be a floating-point tensor")
            if s.numel() != layout.numel[i] or s.device != layout.device:
                raise ValueError(f"{op}: expected scores[{j}] with {layout.numel[i]} elements on "
                                 f"{layout.device}, got {s.numel()} on {s.device}")
        dtypes = {s.dtype for s in scores}
        if len(dtypes) == 1 and next(iter(dtypes)) in DTYPE_CODES:
            return [s if s.is_contiguous() else s.contiguous() for s in scores]
        # One kernel dtype per launch; fl32(score) is what the key is made of anyway, so the cast is exact.
        return [s.float().contiguous() for s in scores]

    def select_mask(self, layout: ParamLayout, scores: Sequence[torch.Tensor], k: int,
                    scores_are_grads: bool) -> torch.Tensor:
        n = layout.n_masked
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
            raise ValueError(f"select_mask: expected 0 <= k <= {n}, got k={k!r}")
        scores = self._check_scores(layout, scores, "select_mask")
        plan = self._plan(layout)
        if k == 0 or plan.masked is None:
            bits = layout.empty_mask()
            return bits
        sp = self.select_plan(plan.masked.n_total, plan.masked.n_chunks, k)
        with _device_guard(layout.device):
            bits, prefix, totals, repaired = _kernels().select.select_mask(
                plan.masked, scores, k, scores_are_grads, layout.mask_bytes, sp)
        self.select_fallbacks += int(repaired)
        self._last_mask = (weakref.ref(bits), bits._version, layout.tensors_key, {"prefix": prefix, "totals": totals})
        return bits

    def key_histogram(self, layout, scores, scores_are_grads, prefix, shift, radix_bits) -> torch.Tensor:
        ref.check_digit(shift, radix_bits)
        scores = self._check_scores(layout, scores, "key_histogram")
        plan = self._plan(layout)
        histogram = _kernels().histogram
        if plan.masked is None or radix_bits > histogram.MAX_RADIX_BITS:
            return super().key_histogram(layout, scores, scores_are_grads, prefix, shift, radix_bits)
        with _device_guard(layout.device):
            return histogram.key_histogram(plan.masked, scores, scores_are_grads, prefix, shift, radix_bits)

    def mask_from_threshold(self, layout, scores, scores_are_grads, threshold, quotas) -> torch.Tensor:
        scores = self._check_scores(layout, scores, "mask_from_threshold")
        if len(quotas) != len(scores):
            raise ValueError(f"mask_from_threshold: expected {len(scores)} quotas (one per masked tensor), "
                             f"got {len(quotas)}")
        if not 0 <= threshold < 1 << 31:
            raise ValueError(f"mask_from_threshold: expected a threshold key in [0, 2**31), got {threshold}")
        plan = self._plan(layout)
        if plan.masked is None:
            return layout.empty_mask()
        with _device_guard(layout.device):
            return _kernels().histogram.mask_from_threshold(plan.masked, scores, scores_are_grads, threshold, quotas,
                                                            layout.mask_bytes)

    def select_nm_mask(self, layout: ParamLayout, scores, n: int, m: int, scores_are_grads: bool,
                       support=None) -> torch.Tensor:
        ref.check_nm_args(layout, scores, n, m, support)
        with _device_guard(layout.device):
            return _kernels().nm_mask.select_nm_mask(
                layout, [s.contiguous() for s in scores], n, m, scores_are_grads,
                None if support is None else [w.detach() for w in support],
            )

    def mask_aux(self, layout: ParamLayout, bits: torch.Tensor) -> Any:
        """Per-chunk prefix counts of the mask (where each chunk's saved originals start)."""
        plan = self._plan(layout)
        if plan.masked is None or bits is None:
            return None
        self._check_bits(layout, bits, "mask_aux")
        last = self._last_mask
        if last is not None and last[0]() is bits and last[1] == bits._version and last[2] is layout.tensors_key:
            return last[3]
        with _device_guard(layout.device):
            prefix, totals = _kernels().select.mask_prefix_counts(
                plan.masked, self._word_aligned(bits), self.scan_block, plan.masked.n_total >= self.parallel_select_min)
        aux = {"prefix": prefix, "totals": totals}
        self._last_mask = (weakref.ref(bits), bits._version, layout.tensors_key, aux)
        return aux

    # ------------------------------------------------------------------ perturb / restore
    def grad_norm(self, layout: ParamLayout, grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        plan = self._plan(layout)
        grads = self._checked_grads(layout, plan, grads, "grad_norm")
        groups, fallback = self._groups_for(layout, plan, grads)
        _, _, zero = self._device_constants(layout.device)
        extra = zero
        if fallback:
            extra = ref.grad_sumsq_reference(layout, [g if i in fallback else None for i, g in enumerate(grads)])
            extra = extra.reshape(1)
        with _device_guard(layout.device):
            return _kernels().norm.grad_norm(groups, layout.device, extra, self._norm_dtype(layout, plan, grads))

    def prepare_perturb(self, layout, grads, bits, aux, norm, eps) -> Any:
        plan = self._plan(layout)
        grads = self._checked_grads(layout, plan, grads, "perturb")
        if not isinstance(norm, torch.Tensor) or norm.numel() != 1 or norm.device != layout.device:
            raise ValueError(f"perturb: expected norm to be a one-element tensor on {layout.device}")
        if norm.dtype == torch.float64:
            # an fp64 norm (a model with fp64 tensors): its scale is computed in fp64 and the fp64 tensors
            # go through the reference anyway, so the reference perturbs every tensor
            applied = torch.ones(1, dtype=torch.int32, device=layout.device)
            return self._with_reference_write(_Saved([], {}, applied, bits, None, plan.dense_total, None, plan),
                                              layout, grads, bits, norm, eps)
        groups, fallback = self._groups_for(layout, plan, grads)
        needs_mask = bool(layout.masked_index) and (getattr(grads, "complete", False)
                                                    or any(grads[i] is not None for i in layout.masked_index))
        dummy_mask, dummy_prefix, _ = self._device_constants(layout.device)
        if needs_mask:
            if bits is None:
                raise ValueError("perturb: expected a packed mask for the masked parameters, got None")
            self._check_bits(layout, bits, "perturb")
            bits = self._word_aligned(bits)
            if not (isinstance(aux, dict) and aux.get("prefix") is not None
                    and aux["prefix"].numel() == plan.masked.n_chunks):
                aux = self.mask_aux(layout, bits)
            prefix, totals = aux["prefix"], aux["totals"]
        else:
            bits, prefix, totals = dummy_mask, dummy_prefix, (0,) * N_GROUPS
        norm32 = norm.reshape(()).float()
        if not norm32.is_contiguous():
            norm32 = norm32.contiguous()
        applied = torch.empty(1, dtype=torch.int32, device=layout.device)
        buffers: dict[int, torch.Tensor] = {}
        launches = []
        last = plan.last_step.get("rhos")  # the groups with their rho tables, as long as neither changes
        if last is None or last[0] is not groups or last[1] is not layout.rho:
            last = plan.last_step["rhos"] = (groups, layout.rho, [self._bind_rhos(layout, plan, g) for g in groups])
        for g in last[2]:  # every buffer is allocated before any kernel writes
            code = DTYPE_CODES[g.w_dtype]
            if code not in buffers:
                size = plan.dense_total[code] + totals[code]
                buffers[code] = torch.empty(max(size, 1), dtype=g.w_dtype, device=layout.device)
            if g.n_chunks:
                launches.append((g, plan.dense_total[code], buffers[code]))
        saved = _Saved(groups, buffers, applied, bits, prefix, plan.dense_total, None, plan)
        saved.write = ([(g, bits, prefix, dense, buffer, norm32, applied, eps) for g, dense, buffer in launches],
                       None)
        if fallback:
            self._with_reference_write(saved, layout, [g if i in fallback else None for i, g in enumerate(grads)],
                                       bits, norm, eps)
        return saved

    @staticmethod
    def _with_reference_write(saved: _Saved, layout, grads, bits, norm, eps) -> _Saved:
        """The tensors the reference perturbs: their originals saved now, written by write_perturb."""
        if bool(torch.isfinite(norm)):
            saved.fallback = ref.originals_reference(layout, grads, bits)
            launches = saved.write[0] if saved.write else []
            saved.write = (launches, (layout, grads, bits, norm, eps))
        return saved

    def write_perturb(self, saved: Any) -> None:
        if saved is None or saved.write is None:
            return
        (launches, reference_args), saved.write = saved.write, None
        for args in launches:
            with _device_guard(saved.applied.device):
                _kernels().perturb.perturb(*args)
            saved.launched += 1
        if reference_args is not None:
            ref.write_perturbation_reference(*reference_args)

    def restore(self, layout: ParamLayout, bits: Optional[torch.Tensor], aux: Any, saved: Any) -> None:
        if saved is None:
            return
        if not isinstance(saved, _Saved):
            raise TypeError(f"restore: expected what TritonBackend.perturb returned, got {type(saved).__name__}")
        for g in [g for g in saved.groups if g.n_chunks][:saved.launched]:  # the kernels that ran
            code = DTYPE_CODES[g.w_dtype]
            if g.n_chunks:
                with _device_guard(layout.device):
                    _kernels().perturb.restore(g, saved.bits, saved.prefix, saved.dense_total[code],
                                               saved.buffers[code], saved.applied)
        if saved.fallback is not None:
            ref.restore_reference(layout, saved.bits, saved.fallback)

    def saved_originals(self, layout: ParamLayout, bits, aux, saved: Any) -> Any:
        if saved is None:
            return None
        originals: list[Optional[torch.Tensor]] = list(saved.fallback or [None] * len(layout.params))
        if not saved.launched or not saved.applied.item():  # no kernel moved anything
            return None if saved.fallback is None else originals
        plan = saved.plan
        for g in [g for g in saved.groups if g.n_chunks][:saved.launched]:
            code = DTYPE_CODES[g.w_dtype]
            buffer = saved.buffers[code]
            for i in g.params:
                j = plan.masked_pos.get(i)
                if j is None:  # dense: all its elements, at a fixed offset
                    start, count = plan.dense_offset[i], layout.numel[i]
                elif layout.numel[i] == 0:
                    start, count = 0, 0
                else:  # masked: its selected elements, from its first chunk's prefix count on
                    start = saved.dense_total[code] + int(saved.prefix[plan.masked.first_chunk[j]])
                    count = int(ref.mask_of(layout, saved.bits, j).sum())
                originals[i] = buffer[start : start + count]
        return originals

    def saved_nbytes(self, saved: Any) -> int:
        if saved is None:
            return 0
        return tensors_nbytes(list(saved.buffers.values())) + tensors_nbytes(saved.fallback)
