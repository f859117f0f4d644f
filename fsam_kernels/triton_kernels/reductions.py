"""Sums, prefix sums and minima for the kernels, without Triton's ``tl.sum``/``tl.cumsum``/``tl.min``.

Those are ``@triton.jit`` functions of Triton's own library, so their mode (compiled or interpreted)
is fixed when Triton is imported, and a kernel decorated in the other mode cannot call them: the
interpreter tests would then depend on nothing having imported Triton before ``TRITON_INTERPRET=1``
was set (``torch._dynamo`` does, for one). ``tl.reduce`` and ``tl.associative_scan`` are builtins
that work in both modes; given Triton's own combine functions they compile to the same code as
``tl.sum``, and the interpreter runs them with numpy. Only integer and fp32 inputs are summed here,
which ``tl.sum`` would not promote either.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import interpret_env

INTERPRETED = interpret_env()  # how this module's kernels were built (see the package doc)

if hasattr(tl.standard, "_sum_combine") and hasattr(tl.standard, "_elementwise_min"):

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._sum_combine)

    @triton.jit
    def _cumsum(x, axis: tl.constexpr):
        return tl.associative_scan(x, axis, tl.standard._sum_combine)

    @triton.jit
    def _min(x, axis: tl.constexpr):
        return tl.reduce(x, axis, tl.standard._elementwise_min)

else:  # a Triton without these names: its library functions (Triton must then share the kernels' mode)

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        return tl.sum(x, axis)

    @triton.jit
    def _cumsum(x, axis: tl.constexpr):
        return tl.cumsum(x, axis)

    @triton.jit
    def _min(x, axis: tl.constexpr):
        return tl.min(x, axis)
