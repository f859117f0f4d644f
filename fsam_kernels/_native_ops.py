"""Fake (meta) implementations of the native ops, and the one place that loads the extension.

The schemas are defined once in C++ (csrc/registration.cpp, ``torch.ops.fsam_kernels.*``) and the
CPU / CUDA kernels are registered there too. The fake implementations below let the ops trace under
``torch.compile`` and in ``torch.library.opcheck``: they validate what can be validated without data
(lengths, dtypes, devices) with the same messages as the C++ checks, and describe the outputs.
Importing the extension registers them (its module init imports this module); :func:`load_library`
imports the extension, which happens when the native backend is first asked for, never at package
import.
"""
from __future__ import annotations

import importlib
from typing import Sequence

import torch

_NS = "fsam_kernels"
_MASK_ALIGN_BITS = 512  # fsam_kernels.layout.MASK_ALIGN_BITS
_MASK_ALIGN_BYTES = _MASK_ALIGN_BITS // 8
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_extension = None


def load_library():
    """Import ``fsam_kernels._C`` (registering the ops and their fakes) and return it; raises ImportError
    if it is missing."""
    global _extension
    if _extension is None:
        _extension = importlib.import_module("fsam_kernels._C")
        _register_fakes()
    return _extension


def _check_list(op: str, arg: str, tensors: Sequence[torch.Tensor], device: torch.device, dtypes) -> None:
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{_NS}::{op}: expected {arg}[{i}] on {device}, got {t.device}")
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{_NS}::{op}: expected {arg}[{i}] of dtype {names}, got {t.dtype}")


def _check_same_numel(op: str, a: str, xs, b: str, ys) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"{_NS}::{op}: expected as many {b} as {a}, got {len(ys)} and {len(xs)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.numel() != y.numel():
            raise ValueError(f"{_NS}::{op}: {b}[{i}] has {y.numel()} elements, {a}[{i}] has {x.numel()}")


def _check_offsets(op: str, bit_offsets, tensors, mask_bits: int, allow_dense: bool) -> None:
    """csrc/checks.cpp check_offsets: aligned, in bounds, increasing and non-overlapping bit ranges."""
    if len(bit_offsets) != len(tensors):
        raise ValueError(f"{_NS}::{op}: expected one bit offset per tensor ({len(tensors)}), got {len(bit_offsets)}")
    next_free, prev = 0, -1
    for i, (o, t) in enumerate(zip(bit_offsets, tensors)):
        if allow_dense and o == -1:
            continue
        if o < 0 or o % _MASK_ALIGN_BITS:
            dense = " (or -1 for a dense tensor)" if allow_dense else ""
            raise ValueError(
                f"{_NS}::{op}: expected bit_offsets[{i}] to be a non-negative multiple of {_MASK_ALIGN_BITS}{dense}, got {o}"
            )
        if o < next_free:
            raise ValueError(
                f"{_NS}::{op}: expected bit_offsets[{i}] >= {next_free} (bit_offsets[{prev}] + numel rounded up to "
                f"{_MASK_ALIGN_BITS} bits): masked tensors must own increasing, non-overlapping bit ranges, got {o}"
            )
        if o + t.numel() > mask_bits:
            raise ValueError(f"{_NS}::{op}: bit_offsets[{i}] + numel = {o + t.numel()} exceeds the mask's {mask_bits} bits")
        next_free = (o + t.numel() + _MASK_ALIGN_BITS - 1) // _MASK_ALIGN_BITS * _MASK_ALIGN_BITS
        prev = i


def _fisher_accumulate_fake(accum, grads) -> None:
    _check_same_numel("fisher_accumulate", "accum", accum, "grads", grads)
    if accum:
        _check_list("fisher_accumulate", "accum", accum, accum[0].device, (torch.float32,))
        _check_list("fisher_accumulate", "grads", grads, accum[0].device, _FLOATS)


def _select_mask_fake(scores, bit_offsets, mask_bytes, k, square):
    if len(bit_offsets) != len(scores):
        raise ValueError(f"{_NS}::select_mask: expected one bit offset per tensor ({len(scores)}), got {len(bit_offsets)}")
    if not scores:
        raise ValueError(f"{_NS}::select_mask: expected at least one scores tensor")
    _check_list("select_mask", "scores", scores, scores[0].device, _FLOATS)
    _check_offsets("select_mask", bit_offsets, scores, mask_bytes * 8, allow_dense=False)
    return scores[0].new_empty((mask_bytes,), dtype=torch.uint8)


def _key_histogram_fake(scores, square, prefix, shift, radix_bits):
    if not (0 < radix_bits <= 16 and 0 <= shift and shift + radix_bits <= 32):
        raise ValueError(f"{_NS}::key_histogram: expected 0 < radix_bits <= 16 and 0 <= shift <= 32 - radix_bits, "
                         f"got shift={shift}, radix_bits={radix_bits}")
    if prefix < 0:
        raise ValueError(f"{_NS}::key_histogram: expected prefix >= 0, got {prefix}")
    if not scores:
        raise ValueError(f"{_NS}::key_histogram: expected at least one scores tensor")
    _check_list("key_histogram", "scores", scores, scores[0].device, _FLOATS)
    return scores[0].new_empty((len(scores), 1 << radix_bits), dtype=torch.int64)


def _mask_from_threshold_fake(scores, bit_offsets, mask_bytes, square, threshold, quotas):
    op = "mask_from_threshold"
    if not scores:
        raise ValueError(f"{_NS}::{op}: expected at least one scores tensor")
    if len(bit_offsets) != len(scores):
        raise ValueError(f"{_NS}::{op}: expected one bit offset per tensor ({len(scores)}), got {len(bit_offsets)}")
    _check_list(op, "scores", scores, scores[0].device, _FLOATS)
    _check_offsets(op, bit_offsets, scores, mask_bytes * 8, allow_dense=False)
    if not 0 <= threshold < 1 << 31:
        raise ValueError(f"{_NS}::{op}: expected a threshold key in [0, 2**31), got {threshold}")
    if len(quotas) != len(scores):
        raise ValueError(f"{_NS}::{op}: expected one quota per scores tensor ({len(scores)}), got {len(quotas)}")
    for i, (q, t) in enumerate(zip(quotas, scores)):
        if not 0 <= q <= t.numel():
            raise ValueError(f"{_NS}::{op}: expected quotas[{i}] in [0, {t.numel()}], got {q}")
    return scores[0].new_empty((mask_bytes,), dtype=torch.uint8)


def _select_nm_mask_fake(scores, support, bit_offsets, mask_bytes, n, m, square):
    op = "select_nm_mask"
    if not 1 <= n < m <= 16:
        raise ValueError(f"{_NS}::{op}: expected 1 <= n < m <= 16, got n={n}, m={m}")
    if not scores:
        raise ValueError(f"{_NS}::{op}: expected at least one score tensor")
    if len(bit_offsets) != len(scores):
        raise ValueError(f"{_NS}::{op}: expected one bit offset per tensor ({len(scores)}), got {len(bit_offsets)}")
    if support and len(support) != len(scores):
        raise ValueError(
            f"{_NS}::{op}: expected support to be empty or hold one tensor per score ({len(scores)}), got {len(support)}"
        )
    for name, tensors in (("scores", scores), ("support", support)):
        for i, t in enumerate(tensors):
            if t.device != scores[0].device:
                raise ValueError(f"{_NS}::{op}: expected {name}[{i}] on {scores[0].device}, got {t.device}")
            if not t.is_floating_point():
                raise TypeError(f"{_NS}::{op}: expected {name}[{i}] of a floating-point dtype, got {t.dtype}")
            if t.numel() != scores[i].numel() or t.numel() % m:
                raise ValueError(f"{_NS}::{op}: {name}[{i}] has {t.numel()} elements; expected scores[{i}]'s, "
                                 f"a multiple of m={m}")
    return scores[0].new_empty((mask_bytes,), dtype=torch.uint8)


def _mask_block_prefix_fake(bits):
    if bits.dtype != torch.uint8 or bits.dim() != 1:
        raise ValueError(f"{_NS}::mask_block_prefix: expected a 1-D uint8 bits tensor, got {bits.dtype} {tuple(bits.shape)}")
    return bits.new_empty((bits.shape[0] // _MASK_ALIGN_BYTES + 1,), dtype=torch.int64)


def _grad_norm_fake(params, grads, adaptive):
    _check_same_numel("grad_norm", "params", params, "grads", grads)
    if len(adaptive) != len(params):
        raise ValueError(f"{_NS}::grad_norm: expected one adaptive flag per parameter ({len(params)}), got {len(adaptive)}")
    if not params:
        raise ValueError(f"{_NS}::grad_norm: expected at least one parameter")
    _check_list("grad_norm", "params", params, params[0].device, _FLOATS)
    _check_list("grad_norm", "grads", grads, params[0].device, _FLOATS)
    fp64 = any(torch.float64 in (p.dtype, g.dtype) for p, g in zip(params, grads))  # the norm dtype
    return params[0].new_empty((), dtype=torch.float64 if fp64 else torch.float32)


def _check_perturb_restore(op, params, saved, bits, block_prefix, bit_offsets, saved_counts, norm) -> None:
    if not (len(saved) == len(bit_offsets) == len(params)):
        raise ValueError(
            f"{_NS}::{op}: expected params, saved and bit_offsets of the same length, got "
            f"{len(params)}, {len(saved)} and {len(bit_offsets)}"
        )
    if bits.dtype != torch.uint8 or block_prefix.dtype != torch.int64:
        raise TypeError(f"{_NS}::{op}: expected uint8 bits and int64 block_prefix, got {bits.dtype} and {block_prefix.dtype}")
    # the norm dtype (see fsam_kernels.reference); float64 norms only on the CPU, like float64 tensors
    norm_dtypes = (torch.float32, torch.float64) if norm.device.type == "cpu" else (torch.float32,)
    if norm.dim() != 0 or norm.dtype not in norm_dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in norm_dtypes)
        raise ValueError(f"{_NS}::{op}: expected norm to be a 0-dim {names} tensor, got {norm.dtype} {tuple(norm.shape)}")
    _check_offsets(op, bit_offsets, params, bits.numel() * 8, allow_dense=True)
    if len(saved_counts) != len(params):
        raise ValueError(f"{_NS}::{op}: expected one saved count per parameter ({len(params)}), got {len(saved_counts)}")
    for i, (p, s, o, n) in enumerate(zip(params, saved, bit_offsets, saved_counts)):
        if o == -1 and n != p.numel():
            raise ValueError(
                f"{_NS}::{op}: expected saved_counts[{i}] of a dense tensor to be its numel {p.numel()}, got {n}"
            )
        if o != -1 and not 0 <= n <= p.numel():
            raise ValueError(
                f"{_NS}::{op}: expected saved_counts[{i}] (the set mask bits of params[{i}]) in [0, {p.numel()}], got {n}"
            )
        if s.numel() != n:
            what = "of a dense tensor must have" if o == -1 else "must hold the"
            tail = " elements" if o == -1 else f" masked elements of params[{i}]"
            raise ValueError(f"{_NS}::{op}: saved[{i}] {what} {n}{tail}, got {s.numel()}")
    if params:
        dev = params[0].device
        _check_list(op, "params", params, dev, _FLOATS)
        for name, t in (("bits", bits), ("block_prefix", block_prefix), ("norm", norm)):
            if t.device != dev:
                raise ValueError(f"{_NS}::{op}: expected {name} on {dev}, got {t.device}")
        for i, (p, s) in enumerate(zip(params, saved)):
            if s.dtype != p.dtype or s.device != dev:
                raise TypeError(f"{_NS}::{op}: expected saved[{i}] of dtype {p.dtype} on {dev}, got {s.dtype} on {s.device}")


def _masked_perturb_fake(params, grads, saved, bits, block_prefix, bit_offsets, saved_counts, rho, adaptive, norm,
                         eps) -> None:
    _check_perturb_restore("masked_perturb", params, saved, bits, block_prefix, bit_offsets, saved_counts, norm)
    _check_same_numel("masked_perturb", "params", params, "grads", grads)
    if not (len(rho) == len(adaptive) == len(params)):
        raise ValueError(f"{_NS}::masked_perturb: expected one rho and one adaptive flag per parameter ({len(params)})")
    if params:
        _check_list("masked_perturb", "grads", grads, params[0].device, _FLOATS)


def _masked_restore_fake(params, saved, bits, block_prefix, bit_offsets, saved_counts, norm) -> None:
    _check_perturb_restore("masked_restore", params, saved, bits, block_prefix, bit_offsets, saved_counts, norm)


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
