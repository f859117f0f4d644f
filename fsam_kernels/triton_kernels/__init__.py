"""Triton kernels of the ``"triton"`` backend, one module per op.

Every kernel works on many tensors in one launch: the launcher passes device tables (int64 tensors)
of data pointers and sizes, and a *chunk table* that splits every tensor into chunks of
:data:`CHUNK` elements; program ``c`` of the grid handles chunk ``c``. The tables depend only on the
tensors' addresses and sizes, so they are built once and cached (see :mod:`.tables`).

``triton.jit`` decides when a module is imported whether its kernels run compiled (CUDA tensors
only) or in the interpreter (``TRITON_INTERPRET=1``, CPU tensors only), and that holds for Triton's
own library (``tl.sum``, ``tl.cumsum``...) too. The backend imports Triton and the kernel modules on
first use, so the mode is the environment's at that moment; :func:`interpreted` reports it and
:func:`mode_conflict` says when Triton itself was imported in a mode the kernels cannot work with
(interpreted kernels avoid Triton's library functions, see :mod:`.reductions`, so only compiled
kernels under an interpreted Triton conflict).
"""
from __future__ import annotations

import os
import sys
from typing import Optional

# Elements per chunk (one program each). A multiple of the mask alignment (512 bits), so a chunk
# writes whole mask bytes of one tensor only.
CHUNK = 4096

# Saved-buffer groups by weight dtype: fp32, fp16, bf16, and "other" (done by the reference).
N_GROUPS = 4

KERNEL_MODULES = ("fisher", "histogram", "norm", "perturb", "radix", "reductions", "select")


def interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreted() -> bool:
    """Whether the kernels run in the Triton interpreter: fixed once a kernel module is imported."""
    for name in KERNEL_MODULES:
        module = sys.modules.get(f"{__name__}.{name}")
        if module is not None:
            return module.INTERPRETED
    return interpret_env()


def mode_conflict() -> Optional[str]:
    """Why the kernels cannot run in their mode because Triton was imported in the other one."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return None
    triton_interpreted = type(standard.sum).__name__ == "InterpretedFunction"
    if triton_interpreted == interpreted():
        return None
    if interpreted() and hasattr(standard, "_sum_combine") and hasattr(standard, "_elementwise_min"):
        return None  # interpreted kernels use no compiled library function (see .reductions)
    if triton_interpreted:
        return "Triton was imported with TRITON_INTERPRET=1 (interpreter mode); unset it before importing Triton"
    return "Triton was imported before TRITON_INTERPRET=1 was set; set it before anything imports Triton"
