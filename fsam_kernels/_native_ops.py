"""Fake (meta) implementations of the native ops, and the one place that loads the extension.

The schemas are defined once in C++ (csrc/registration.cpp, ``torch.ops.fsam_kernels.*``) and the
CPU / CUDA kernels are registered there too. The fake implementations below let the ops trace under
``torch.compile`` and in ``torch.library.opcheck``: they describe the outputs, nothing more. The
arguments are checked once, by the C++ op (csrc/checks.cpp), which reads no data to do so and runs
before any kernel, traced or not; a fake only refuses what it could not describe (an output whose
device would come from an empty list). Importing the extension registers the fakes (its module init
imports this module); :func:`load_library` imports the extension, which happens when the native
backend is first asked for, never at package import.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch

_NS = "fsam_kernels"
_MASK_ALIGN_BYTES = 512 // 8  # fsam_kernels.layout.MASK_ALIGN_BITS

_extension = None


def load_library():
    """Import ``fsam_kernels._C`` (registering the ops and their fakes) and return it; raises ImportError
    if it is missing."""
    global _extension
    if _extension is None:
        _extension = importlib.import_module("fsam_kernels._C")
        _register_fakes()
    return _extension


def _first(op: str, arg: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor whose device the output takes."""
    if not tensors:
        raise ValueError(f"{_NS}::{op}: expected at least one {arg} tensor")
    return tensors[0]


def _fisher_accumulate_fake(accum, grads) -> None:
    return None  # accum is updated in place


def _select_mask_fake(scores, bit_offsets, mask_bytes, k, square):
    return _first("select_mask", "scores", scores).new_empty((mask_bytes,), dtype=torch.uint8)


def _key_histogram_fake(scores, square, prefix, shift, radix_bits):
    return _first("key_histogram", "scores", scores).new_empty((len(scores), 1 << radix_bits), dtype=torch.int64)


def _mask_from_threshold_fake(scores, bit_offsets, mask_bytes, square, threshold, quotas):
    return _first("mask_from_threshold", "scores", scores).new_empty((mask_bytes,), dtype=torch.uint8)


def _select_nm_mask_fake(scores, support, bit_offsets, mask_bytes, n, m, square):
    return _first("select_nm_mask", "scores", scores).new_empty((mask_bytes,), dtype=torch.uint8)


def _mask_block_prefix_fake(bits):
    return bits.new_empty((bits.numel() // _MASK_ALIGN_BYTES + 1,), dtype=torch.int64)


def _grad_norm_fake(params, grads, adaptive):
    # the norm dtype (see fsam_kernels.reference)
    fp64 = any(g is not None and torch.float64 in (p.dtype, g.dtype) for p, g in zip(params, grads))
    return _first("grad_norm", "params", params).new_empty((), dtype=torch.float64 if fp64 else torch.float32)


def _masked_perturb_fake(params, grads, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix,
                         bit_offsets, rho, adaptive, norm, eps) -> None:
    return None  # params and saved are written in place


def _masked_restore_fake(params, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix, bit_offsets,
                         norm) -> None:
    return None  # params are written in place


_FAKES = {
    "fisher_accumulate": _fisher_accumulate_fake,
    "select_mask": _select_mask_fake,
    "key_histogram": _key_histogram_fake,
    "mask_from_threshold": _mask_from_threshold_fake,
    "select_nm_mask": _select_nm_mask_fake,
    "mask_block_prefix": _mask_block_prefix_fake,
    "grad_norm": _grad_norm_fake,
    "masked_perturb": _masked_perturb_fake,
    "masked_restore": _masked_restore_fake,
}
_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    for name, fn in _FAKES.items():
        torch.library.register_fake(f"{_NS}::{name}", fn)
    _fakes_registered = True


def _register_if_loaded() -> None:
    # Imported by the extension's module init, once its ops are defined.
    if hasattr(getattr(torch.ops, _NS), "select_mask"):
        _register_fakes()


_register_if_loaded()
