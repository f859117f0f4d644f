"""The backends the conformance suite runs on, and the sizes each gets.

A target is a backend on a device: ``native-cpu``, ``native-cuda``, ``triton-interpreter`` (Triton's
kernels on CPU tensors, when this process imported them with ``TRITON_INTERPRET=1``) and
``triton-cuda``. A target that cannot run here skips, except that on a machine with a CUDA GPU a
CUDA target that cannot run *fails*: a GPU run that tests nothing must not look green.

CUDA targets get real sizes (the 393 tensors of RoBERTa-large, 355M values; ~8M-value models), the
native CPU backend a sixteenth of each dimension, the interpreter a few thousand values, so the same
test bodies run in every CPU test run and cannot rot between GPU runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Target:
    backend_name: str
    device_type: str
    scale: str  # "real" (CUDA), "small" (native CPU) or "tiny" (interpreter)

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)

    def backend(self):
        """The backend object; skips (or fails on a GPU machine) when it cannot run here."""
        from fsam_kernels.backends import BackendUnavailable, get_backend

        if self.device_type == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        try:
            b = get_backend(self.backend_name, self.device_type)
        except BackendUnavailable as exc:
            if self.device_type == "cuda":
                # e.g. the extension was built without CUDA kernels, or TRITON_INTERPRET=1 leaked in
                pytest.fail(f"CUDA is available but the {self.backend_name} backend is not: {exc}")
            pytest.skip(str(exc))
        return b


TARGETS = [
    pytest.param(Target("native", "cpu", "small"), id="native-cpu", marks=pytest.mark.native),
    pytest.param(Target("triton", "cpu", "tiny"), id="triton-interpreter", marks=pytest.mark.triton),
    pytest.param(Target("native", "cuda", "real"), id="native-cuda", marks=[pytest.mark.gpu, pytest.mark.native]),
    pytest.param(Target("triton", "cuda", "real"), id="triton-cuda", marks=[pytest.mark.gpu, pytest.mark.triton]),
]
INTERPRETER_MARKS = {"triton"}  # the triton-interpreter target's


def triton_interpreter_selected(markexpr: str) -> bool:
    """Whether a ``-m`` expression can select the triton-interpreter target: if not (``gpu``, ``gpu and
    triton``...), the run needs compiled Triton. An expression this cannot read counts as selecting it."""
    if not markexpr:
        return True
    try:
        from _pytest.mark.expression import Expression  # pytest's own parser; private, hence the fallback

        return Expression.compile(markexpr).evaluate(lambda name, **kwargs: not kwargs and name in INTERPRETER_MARKS)
    except Exception:
        return True


def repairs(backend) -> int:
    """How many selects the backend has repaired so far (Triton's sampled bracket counts them; a
    backend without one never repairs)."""
    return getattr(backend, "select_fallbacks", 0)


def roberta_large_shapes(div: int = 1) -> list[tuple]:
    """The 393 parameter shapes of RoBERTa-large with a classification head (355M values), every
    dimension but the head's 2 divided by ``div``."""
    h, f, v, pos = 1024 // div, 4096 // div, -(-50265 // div), -(-514 // div)
    shapes = [(v, h), (pos, h), (1, h), (h,), (h,)]
    for _ in range(24):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,), (f, h), (f,), (h, f), (h,), (h,), (h,)]
    shapes += [(h, h), (h,), (2, h), (2,)]
    return shapes


def model_shapes(target: Target) -> list[tuple]:
    """A model for the target's scale: RoBERTa-large (CUDA), at 1/16 per dimension (native CPU, ~1.4M
    values), or one layer at 1/64 plus odd sizes (interpreter, ~4.6k values in 25 tensors)."""
    if target.scale == "real":
        return roberta_large_shapes()
    if target.scale == "small":
        return roberta_large_shapes(16)
    return roberta_large_shapes(64)[5:21] + [(1,), (7,), (123,), (4097,), (3, 5)]


def mixed_sizes(target: Target, seed: int = 0) -> list[int]:
    """Transformer-like tensor sizes (big matrices, odd biases and norms): >= 8M values on CUDA."""
    total = {"real": 8_000_000, "small": 300_000, "tiny": 9_000}[target.scale]
    g = torch.Generator().manual_seed(seed)
    lo, hi = {"real": (300, 1100), "small": (60, 200), "tiny": (8, 40)}[target.scale]
    sizes = []
    while sum(sizes) < total:
        d = int(torch.randint(lo, hi, (1,), generator=g))
        sizes += [d * 4 * d // 3, d, d * 3 + 1, 7, 1]
    return sizes


@contextlib.contextmanager
def reference_forbidden(monkeypatch):
    """Make every reference op raise while the block runs: what a backend returns there was computed
    by its kernels, not by a silent fallback."""
    from fsam_kernels import reference as ref

    def forbid(module, name):
        def raising(*args, **kwargs):
            raise AssertionError(f"{module.__name__}.{name} was called: the backend fell back to the reference")
        monkeypatch.setattr(module, name, raising)

    originals = {}
    for module, names in ((ref, ("fisher_accumulate_reference", "select_mask_reference", "grad_norm_reference",
                                 "perturb_reference", "restore_reference", "select_nm_mask_reference",
                                 "key_histogram_reference", "mask_from_threshold_reference")),):
        for name in names:
            originals[(module, name)] = getattr(module, name)
            forbid(module, name)
    try:
        yield
    finally:
        for (module, name), fn in originals.items():
            monkeypatch.setattr(module, name, fn)
