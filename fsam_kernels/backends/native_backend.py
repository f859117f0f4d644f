"""The ``"native"`` backend: the C++/CUDA extension ``fsam_kernels._C`` (ops ``torch.ops.fsam_kernels.*``).

The extension is imported when this backend is first asked for, never at package import. If it is
missing or cannot run on a device, the error says why: what was built, torch's CUDA version and the
GPU's compute capability.

Private data of this backend:

* ``aux`` (from :meth:`mask_aux`): the int64 per-512-bit-block prefix counts of the mask, plus the
  number of set bits of each masked tensor (host ints, read once per mask update). The ops get these
  counts too (``saved_counts``) and check every saved buffer's size against them, on every device.
* ``saved`` (from :meth:`perturb`): one compact tensor of original values per parameter with a
  gradient (the masked elements only, or all elements of a dense tensor), with the norm that decided
  whether anything moved: restore is a no-op when it is not finite, decided on the device.

The CUDA kernels handle fp32, fp16 and bf16; a call that involves float64 CUDA tensors goes through
the reference ops instead (the CPU kernels handle float64 themselves).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import reference as ref
from ..layout import MASK_ALIGN_BITS, ParamLayout
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

    def mask_aux(self, layout: ParamLayout, bits: torch.Tensor) -> Any:
        prefix = self._op.mask_block_prefix(bits)
        # Blocks [first, last) of each masked tensor; one small device-to-host read per mask update.
        bounds = []
        for j, i in enumerate(layout.masked_index):
            first = layout.bit_offset[j] // MASK_ALIGN_BITS
            bounds += [first, first + (layout.numel[i] + MASK_ALIGN_BITS - 1) // MASK_ALIGN_BITS]
        ends = prefix[torch.tensor(bounds, dtype=torch.long, device=prefix.device)].tolist() if bounds else []
        counts = [ends[2 * j + 1] - ends[2 * j] for j in range(len(layout.masked_index))]
        return {"block_prefix": prefix, "counts": counts}

    def _aux(self, layout: ParamLayout, bits: Optional[torch.Tensor], aux: Any):
        if bits is None:  # no masked tensor: empty mask
            bits = torch.zeros(0, dtype=torch.uint8, device=layout.device)
            return bits, torch.zeros(1, dtype=torch.long, device=layout.device), []
        if aux is None:
            aux = self.mask_aux(layout, bits)
        return bits, aux["block_prefix"], aux["counts"]

    # ------------------------------------------------------------------ perturb / restore
    def grad_norm(self, layout: ParamLayout, grads) -> torch.Tensor:
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:
            return torch.zeros((), dtype=torch.float32, device=layout.device)
        if _needs_reference(layout.params) or _needs_reference(grads):
            return ref.grad_norm_reference(layout, grads)
        return self._op.grad_norm(
            [layout.params[i].detach() for i in idx],
            [grads[i].contiguous() for i in idx],
            [layout.adaptive[i] for i in idx],
        )

    def _offsets(self, layout: ParamLayout) -> dict[int, int]:
        return {i: layout.bit_offset[j] for j, i in enumerate(layout.masked_index)}

    def perturb(self, layout, grads, bits, aux, norm, eps) -> Any:
        if _needs_reference(layout.params) or _needs_reference(grads):
            return {"reference": ref.perturb_reference(layout, grads, bits, norm, eps)}
        bits, prefix, counts = self._aux(layout, bits, aux)
        offsets = self._offsets(layout)
        count_of = {i: counts[j] for j, i in enumerate(layout.masked_index)}
        idx = [i for i, g in enumerate(grads) if g is not None]
        params = [layout.params[i].detach() for i in idx]
        sizes = [count_of[i] if i in offsets else p.numel() for i, p in zip(idx, params)]
        saved = [torch.empty(n, dtype=p.dtype, device=p.device) for n, p in zip(sizes, params)]
        self._op.masked_perturb(
            params,
            [grads[i].contiguous() for i in idx],
            saved,
            bits,
            prefix,
            [offsets.get(i, -1) for i in idx],
            sizes,
            [float(layout.rho[i]) for i in idx],
            [layout.adaptive[i] for i in idx],
            norm.detach(),  # in the norm dtype: the scale is computed in it (see fsam_kernels.reference)
            float(eps),
        )
        return {"index": idx, "values": saved, "norm": norm.detach()}

    def restore(self, layout, bits, aux, saved) -> None:
        if saved is None:
            return
        if "reference" in saved:
            if saved["reference"] is not None:
                ref.restore_reference(layout, bits, saved["reference"])
            return
        bits, prefix, counts = self._aux(layout, bits, aux)
        offsets = self._offsets(layout)
        count_of = {i: counts[j] for j, i in enumerate(layout.masked_index)}
        idx = saved["index"]
        self._op.masked_restore(
            [layout.params[i].detach() for i in idx],
            saved["values"],
            bits,
            prefix,
            [offsets.get(i, -1) for i in idx],
            [count_of[i] if i in offsets else layout.numel[i] for i in idx],  # the op checks saved against these
            saved["norm"],
        )

    def saved_originals(self, layout, bits, aux, saved) -> Any:
        if saved is None or "reference" in saved:
            return None if saved is None else saved["reference"]
        if not torch.isfinite(saved["norm"]).item():  # the kernels moved nothing
            return None
        originals: list[Optional[torch.Tensor]] = [None] * len(layout.params)
        for i, values in zip(saved["index"], saved["values"]):
            originals[i] = values
        return originals

    def saved_nbytes(self, saved: Any) -> int:
        if saved is None:
            return 0
        return tensors_nbytes(saved["reference"] if "reference" in saved else saved["values"])
