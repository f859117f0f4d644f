"""The ``"native"`` backend: the C++/CUDA extension ``fsam_kernels._C`` (ops ``torch.ops.fsam_kernels.*``).

The extension is imported when this backend is first asked for, never at package import. If it is
missing or cannot run on a device, the error says why: what was built, torch's CUDA version and the
GPU's compute capability.

Private data of this backend (dataclasses, like the Triton backend's):

* ``aux`` (:class:`NativeMaskAux`, from :meth:`mask_aux`): the int64 per-512-bit-block prefix counts
  of the mask, plus the number of set bits of each masked tensor (host ints, read once per mask
  update). The ops get these counts too (``saved_counts``) and check the saved ranges against them,
  on every device.
* ``saved`` (:class:`NativeSaved`, from :meth:`perturb`): the compact originals in one buffer per
  weight dtype (the masked elements of each masked tensor, every element of a dense one, in
  parameter order), where each parameter's range is, the mask they follow, and the norm that decided
  whether anything moved: restore is a no-op when it is not finite, decided on the device.

A step's work is three op calls (norm, perturb, restore) on the layout's own lists: the per-tensor
lists the ops take (bit offsets, buffer slots) are built once per layout (:class:`_LayoutPlan`, keyed
by ``layout.tensors_key``) and the saved ranges once per mask and set of parameters with a gradient.

The CUDA kernels handle fp32, fp16 and bf16; a call that involves float64 CUDA tensors goes through
the reference ops instead (the CPU kernels handle float64 themselves).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .. import reference as ref
from ..layout import MASK_ALIGN_BITS, ParamLayout
from .tables import TableCache
from .base import Backend, tensors_nbytes

_ops = None


def _describe_torch() -> str:
    cuda = torch.version.cuda
    return f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU-only build'})"


def _describe_gpu(device: torch.device) -> str:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return f"GPU {index}: {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}"


def _needs_reference(tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 and t.is_cuda for t in tensors)


def _step_memo(plan: "_LayoutPlan", grads, what: str, compute):
    """``compute()``, taken again only when the gradients' signature (layout.CheckedGrads) is not the last
    step's: a plain step's gradients usually have the same addresses and dtypes."""
    sig = getattr(grads, "signature", None)
    last = plan.last_step.get(what)
    if sig is not None and last is not None and last[0] == sig:
        return last[1]
    value = compute()
    if sig is not None:
        plan.last_step[what] = (sig, value)
    return value


@dataclass
class NativeMaskAux:
    """What the perturbation needs from a packed mask besides its bits, computed once per mask."""

    block_prefix: torch.Tensor  # int64 set bits before each 512-bit block, then the total (mask_block_prefix)
    counts: list[int]  # set bits of each masked tensor, in masked order
    tensors_key: object  # ParamLayout.tensors_key of the layout the counts follow
    # _SavedRanges by the positions of the parameters without a gradient (usually none)
    ranges: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class _SavedRanges:
    """Where each parameter's originals go: ``buffers[slots[i]][offsets[i] : offsets[i] + counts[i]]``
    (slot -1: no gradient, not perturbed); ranges follow parameter order inside each buffer."""

    slots: list[int]
    offsets: list[int]
    counts: list[int]
    sizes: list[int]  # elements of each buffer


class _LayoutPlan:
    """The per-tensor lists the ops take, derived from a layout's tensors (not its rho values)."""

    def __init__(self, layout: ParamLayout) -> None:
        self.masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
        self.bit_offsets = [-1] * len(layout.params)  # -1: dense
        for j, i in enumerate(layout.masked_index):
            self.bit_offsets[i] = layout.bit_offset[j]
        self.dtypes: list[torch.dtype] = []  # one compact saved buffer per weight dtype, in order of appearance
        self.slot_of = []
        for p in layout.params:
            if p.dtype not in self.dtypes:
                self.dtypes.append(p.dtype)
            self.slot_of.append(self.dtypes.index(p.dtype))
        self.fp64_cuda = _needs_reference(layout.params)
        self.last_step: dict[str, tuple] = {}  # what _step_memo keeps
        device = layout.device
        # mask blocks [first, last) of each masked tensor, on the device once per layout (mask_aux)
        bounds = []
        for j, i in enumerate(layout.masked_index):
            first = layout.bit_offset[j] // MASK_ALIGN_BITS
            bounds += [first, first + (layout.numel[i] + MASK_ALIGN_BITS - 1) // MASK_ALIGN_BITS]
        self.block_bounds = torch.tensor(bounds, dtype=torch.long).to(device) if bounds else None
        # a layout without masked tensors: an empty mask and its one prefix count
        self.no_mask = (torch.zeros(0, dtype=torch.uint8, device=device),
                        NativeMaskAux(torch.zeros(1, dtype=torch.long, device=device), [], layout.tensors_key))

    def ranges(self, layout: ParamLayout, aux: NativeMaskAux, grads: Sequence[Optional[torch.Tensor]]) -> _SavedRanges:
        """The saved ranges for this mask and these gradients, built once per set of missing gradients."""
        missing = _step_memo(self, grads, "missing", lambda: tuple(i for i, g in enumerate(grads) if g is None))
        found = aux.ranges.get(missing)
        if found is None:
            skip = set(missing)
            slots, offsets, counts, sizes = [], [], [], [0] * len(self.dtypes)
            for i, numel in enumerate(layout.numel):
                j = self.masked_pos.get(i)
                slot = -1 if i in skip else self.slot_of[i]
                count = 0 if slot == -1 else numel if j is None else aux.counts[j]
                slots.append(slot)
                offsets.append(sizes[slot] if slot != -1 else 0)
                counts.append(count)
                if slot != -1:
                    sizes[slot] += count
            found = aux.ranges[missing] = _SavedRanges(slots, offsets, counts, sizes)
        return found


@dataclass
class NativeSaved:
    """The originals of one perturbation (see the module docstring)."""

    buffers: list[torch.Tensor]  # compact originals, one buffer per weight dtype
    ranges: Optional[_SavedRanges]  # None when the reference perturbed (``reference``)
    bits: torch.Tensor  # the mask the perturbation followed
    aux: NativeMaskAux
    norm: torch.Tensor  # restore is a no-op when it is not finite
    plan: _LayoutPlan
    reference: Optional[list] = None  # float64 CUDA tensors: the reference's saved list
    write: Optional[tuple] = None  # (function, arguments) of the pending write (write_perturb)
    written: bool = False  # the op ran: ``buffers`` hold the originals


def _load_ops():
    global _ops
    if _ops is None:
        from .. import _native_ops

        try:
            ext = _native_ops.load_library()
        except ModuleNotFoundError as exc:  # a pure-Python install: "auto" moves on quietly
            raise ModuleNotFoundError(
                f"the C++/CUDA extension fsam_kernels._C is not built ({exc}); this is {_describe_torch()}. "
                "The package was installed pure-Python (FSAM_NO_NATIVE=1, an isolated build without torch, "
                "or a failed compile). Rebuild with `pip install --no-build-isolation -v .` to see why."
            ) from exc
        except (ImportError, OSError) as exc:  # built, but broken: "auto" warns once and moves on
            raise ImportError(
                f"the C++/CUDA extension fsam_kernels._C is built but does not load ({exc}); it was probably "
                f"compiled against another torch than this {_describe_torch()}. Rebuild with "
                "`pip install --no-build-isolation .`"
            ) from exc
        _ops = (ext, torch.ops.fsam_kernels)
    return _ops


class NativeBackend(Backend):
    name = "native"

    def __init__(self) -> None:
        self._ext, self._op = _load_ops()
        # unsupported_reason per device: the optimizer asks several times per step, and the CUDA
        # answer (torch.cuda.is_available() and a kernel probe) does not change within a process.
        self._reasons: dict[torch.device, Optional[str]] = {}
        self._cuda_available: Optional[bool] = None
        self._plans = TableCache(4)  # tensors_key -> _LayoutPlan (least recently used out)

    # ------------------------------------------------------------------ devices
    def unsupported_reason(self, device: torch.device) -> Optional[str]:
        """Why the kernels cannot run on ``device`` (``None`` when they can); computed once per device."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            if self._cuda_available is None:
                self._cuda_available = torch.cuda.is_available()
            if self._cuda_available:  # "cuda" means the current GPU: cache under its index
                device = torch.device("cuda", torch.cuda.current_device())
        try:
            return self._reasons[device]
        except KeyError:
            reason = self._reasons[device] = self._unsupported_reason(device)
            return reason

    def _unsupported_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu":
            return None
        if device.type != "cuda":
            return f"the native backend has kernels for CPU and CUDA only, not {device.type}"
        built = f"the extension was built with {self._ext.cuda_build or 'no CUDA kernels (CPU only)'}"
        if self._ext.cuda_archs:
            built += f" for TORCH_CUDA_ARCH_LIST={self._ext.cuda_archs.replace('/', ';')}"
        built += f" against torch {self._ext.torch_version}"
        if not self._ext.with_cuda:
            return (
                f"{built}; this is {_describe_torch()}, {_describe_gpu(device)}. Reinstall with a CUDA "
                "build of torch and a CUDA toolkit (CUDA_HOME): pip install --no-build-isolation ."
            )
        if not torch.cuda.is_available():
            return f"{built}; but {_describe_torch()} sees no CUDA GPU"
        index = device.index if device.index is not None else torch.cuda.current_device()
        problem = self._ext.cuda_kernel_probe(index)
        if problem:
            return (
                f"{built}; {_describe_gpu(device)}: {problem}. Rebuild with TORCH_CUDA_ARCH_LIST including "
                "this GPU's compute capability."
            )
        return None

    def supports(self, device: torch.device) -> bool:
        return self.unsupported_reason(device) is None

    # ------------------------------------------------------------------ Fisher
    def fisher_accumulate(self, accum, grads) -> None:
        if _needs_reference(grads):
            ref.fisher_accumulate_reference(accum, grads)
        elif accum:
            self._op.fisher_accumulate(list(accum), [g.contiguous() for g in grads])

    # ------------------------------------------------------------------ mask
    def select_mask(self, layout: ParamLayout, scores, k: int, scores_are_grads: bool) -> torch.Tensor:
        if not scores or layout.mask_bytes == 0:
            if not 0 <= k <= layout.n_masked:
                raise ValueError(f"select_mask: expected 0 <= k <= {layout.n_masked}, got k={k}")
            return layout.empty_mask()
        if _needs_reference(scores):
            return ref.select_mask_reference(layout, scores, k, scores_are_grads)
        return self._op.select_mask(
            [s.detach().contiguous() for s in scores], list(layout.bit_offset), layout.mask_bytes, k, scores_are_grads
        )

    def key_histogram(self, layout, scores, scores_are_grads, prefix, shift, radix_bits) -> torch.Tensor:
        if not scores or _needs_reference(scores):
            return super().key_histogram(layout, scores, scores_are_grads, prefix, shift, radix_bits)
        return self._op.key_histogram([s.detach().contiguous() for s in scores], scores_are_grads, prefix, shift,
                                      radix_bits)

    def mask_from_threshold(self, layout, scores, scores_are_grads, threshold, quotas) -> torch.Tensor:
        if len(quotas) != len(scores):
            raise ValueError(f"mask_from_threshold: expected {len(scores)} quotas (one per masked tensor), "
                             f"got {len(quotas)}")
        if not scores or layout.mask_bytes == 0 or _needs_reference(scores):
            return super().mask_from_threshold(layout, scores, scores_are_grads, threshold, quotas)
        return self._op.mask_from_threshold([s.detach().contiguous() for s in scores], list(layout.bit_offset),
                                            layout.mask_bytes, scores_are_grads, int(threshold),
                                            [int(q) for q in quotas])

    def select_nm_mask(self, layout: ParamLayout, scores, n: int, m: int, scores_are_grads: bool,
                       support=None) -> torch.Tensor:
        if _needs_reference(scores) or (support is not None and _needs_reference(support)):
            return super().select_nm_mask(layout, scores, n, m, scores_are_grads, support)
        ref.check_nm_args(layout, scores, n, m, support)
        # The op takes the eligible tensors only; the others keep 0 bits.
        chosen = [j for j, i in enumerate(layout.masked_index)
                  if layout.numel[i] > 0 and ref.nm_eligible(layout.params[i].shape, m)]
        if not chosen:
            return layout.empty_mask()
        return self._op.select_nm_mask(
            [scores[j].detach().contiguous() for j in chosen],
            [] if support is None else [support[j].detach().contiguous() for j in chosen],
            [layout.bit_offset[j] for j in chosen],
            layout.mask_bytes,
            n,
            m,
            bool(scores_are_grads),
        )

    def mask_aux(self, layout: ParamLayout, bits: torch.Tensor) -> NativeMaskAux:
        prefix = self._op.mask_block_prefix(bits)
        # Blocks [first, last) of each masked tensor; one small device-to-host read per mask update.
        bounds = self._plan(layout).block_bounds
        ends = prefix[bounds].tolist() if bounds is not None else []
        counts = [ends[2 * j + 1] - ends[2 * j] for j in range(len(layout.masked_index))]
        return NativeMaskAux(prefix, counts, layout.tensors_key)

    def _plan(self, layout: ParamLayout) -> _LayoutPlan:
        # Keyed by the tensors_key token (held by the cache, so its id is never reused): layouts that
        # differ only in rho share one plan; a layout with other tensors (the optimizer makes one when
        # storage, dtypes or shapes change) gets its own.
        return self._plans.get(layout.tensors_key, lambda: _LayoutPlan(layout))

    def _mask_and_aux(self, layout: ParamLayout, plan: _LayoutPlan, bits: Optional[torch.Tensor],
                      aux: Any) -> tuple[torch.Tensor, NativeMaskAux]:
        if bits is None:  # no masked tensor: empty mask
            return plan.no_mask
        if not isinstance(aux, NativeMaskAux) or aux.tensors_key is not layout.tensors_key:
            aux = self.mask_aux(layout, bits)
        return bits, aux

    # ------------------------------------------------------------------ perturb / restore
    def grad_norm(self, layout: ParamLayout, grads) -> torch.Tensor:
        plan = self._plan(layout)
        if layout.device.type == "cuda" and (plan.fp64_cuda or _step_memo(plan, grads, "reference",
                                                                           lambda: _needs_reference(grads))):
            return ref.grad_norm_reference(layout, grads)
        return self._op.grad_norm(layout.params, list(grads), layout.adaptive)

    def prepare_perturb(self, layout, grads, bits, aux, norm, eps) -> NativeSaved:
        plan = self._plan(layout)
        bits, aux = self._mask_and_aux(layout, plan, bits, aux)
        norm = norm.detach()  # in the norm dtype: the scale is computed in it (see fsam_kernels.reference)
        if layout.device.type == "cuda" and (plan.fp64_cuda or _step_memo(plan, grads, "reference",
                                                                           lambda: _needs_reference(grads))):
            finite = bool(torch.isfinite(norm))
            originals = ref.originals_reference(layout, grads, bits) if finite else None
            write = (ref.write_perturbation_reference, (layout, list(grads), bits, norm, eps)) if finite else None
            return NativeSaved([], None, bits, aux, norm, plan, originals, write)
        ranges = plan.ranges(layout, aux, grads)
        buffers = [torch.empty(n, dtype=d, device=layout.device) for n, d in zip(ranges.sizes, plan.dtypes)]
        write = (self._op.masked_perturb, (layout.params, list(grads), buffers, ranges.slots, ranges.offsets,
                                           ranges.counts, bits, aux.block_prefix, plan.bit_offsets, layout.rho,
                                           layout.adaptive, norm, float(eps)))
        return NativeSaved(buffers, ranges, bits, aux, norm, plan, write=write)

    def write_perturb(self, saved: NativeSaved) -> None:
        # One op call saves the originals and writes the weights; ``written`` tells restore whether it
        # ran (the optimizer holds interrupts until it is set, see fsam_kernels.perturbation).
        if saved.write is not None:
            (fn, args), saved.write = saved.write, None
            fn(*args)
            saved.written = True

    @staticmethod
    def _saved(saved: Any, what: str) -> NativeSaved:
        if not isinstance(saved, NativeSaved):
            raise TypeError(f"{what}: expected what NativeBackend.perturb returned, got {type(saved).__name__}")
        return saved

    def restore(self, layout, bits, aux, saved) -> None:
        if saved is None:
            return
        saved = self._saved(saved, "restore")
        if saved.ranges is None:
            if saved.reference is not None:
                ref.restore_reference(layout, saved.bits, saved.reference)
            return
        if not saved.written:  # nothing was written (the buffers hold no originals)
            return
        r = saved.ranges
        self._op.masked_restore(layout.params, saved.buffers, r.slots, r.offsets, r.counts, saved.bits,
                                saved.aux.block_prefix, saved.plan.bit_offsets, saved.norm)

    def saved_originals(self, layout, bits, aux, saved) -> Any:
        if saved is None:
            return None
        saved = self._saved(saved, "saved_originals")
        if saved.ranges is None:
            return saved.reference
        if not saved.written or not torch.isfinite(saved.norm).item():  # the kernels moved nothing
            return None
        r = saved.ranges
        return [None if slot == -1 else saved.buffers[slot][offset : offset + count]
                for slot, offset, count in zip(r.slots, r.offsets, r.counts)]

    def saved_nbytes(self, saved: Any) -> int:
        if saved is None:
            return 0
        return tensors_nbytes(self._saved(saved, "saved_nbytes").buffers) + tensors_nbytes(saved.reference)
