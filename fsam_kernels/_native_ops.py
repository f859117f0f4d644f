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


def _mask_block_prefix_fake(bits):
    if bits.dtype != torch.uint8 or bits.dim() != 1:
        raise ValueError(f"{_NS}::mask_block_prefix: expected a 1-D uint8 bits tensor, got {bits.dtype} {tuple(bits.shape)}")
    return bits.new_empty((bits.shape[0] // _MASK_ALIGN_BYTES + 1,), dtype=torch.int64)


def _check_grads(op: str, params, grads) -> None:
    """Gradients are optional (None: the parameter is left out) and may be strided."""
    if len(grads) != len(params):
        raise ValueError(f"{_NS}::{op}: expected one gradient (or None) per parameter ({len(params)}), got {len(grads)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            continue
        if g.device != p.device:
            raise ValueError(f"{_NS}::{op}: expected grads[{i}] on {p.device}, got {g.device}")
        if g.dtype not in _FLOATS:
            raise TypeError(f"{_NS}::{op}: expected grads[{i}] of dtype float32, float16, bfloat16 or float64, got {g.dtype}")
        if g.numel() != p.numel():
            raise ValueError(f"{_NS}::{op}: grads[{i}] has {g.numel()} elements, params[{i}] has {p.numel()}")


def _grad_norm_fake(params, grads, adaptive):
    if len(adaptive) != len(params) or len(grads) != len(params):
        raise ValueError(f"{_NS}::grad_norm: expected params, grads and adaptive of the same length, got "
                         f"{len(params)}, {len(grads)} and {len(adaptive)}")
    if not params:
        raise ValueError(f"{_NS}::grad_norm: expected at least one parameter")
    _check_list("grad_norm", "params", params, params[0].device, _FLOATS)
    _check_grads("grad_norm", params, grads)
    # the norm dtype (see fsam_kernels.reference)
    fp64 = any(g is not None and torch.float64 in (p.dtype, g.dtype) for p, g in zip(params, grads))
    return params[0].new_empty((), dtype=torch.float64 if fp64 else torch.float32)


def _check_perturb_restore(op, params, grads, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix,
                           bit_offsets, norm) -> None:
    """csrc/checks.cpp validate_perturb_restore (``grads`` is None for restore)."""
    n = len(params)
    if grads is not None:
        _check_grads(op, params, grads)
    if not (len(saved_slots) == len(saved_offsets) == len(saved_counts) == n):
        raise ValueError(f"{_NS}::{op}: expected one saved slot, offset and count per parameter ({n}), got "
                         f"{len(saved_slots)}, {len(saved_offsets)} and {len(saved_counts)}")
    if bits.dtype != torch.uint8 or block_prefix.dtype != torch.int64:
        raise TypeError(f"{_NS}::{op}: expected uint8 bits and int64 block_prefix, got {bits.dtype} and {block_prefix.dtype}")
    # the norm dtype (see fsam_kernels.reference); float64 norms only on the CPU, like float64 tensors
    norm_dtypes = (torch.float32, torch.float64) if norm.device.type == "cpu" else (torch.float32,)
    if norm.dim() != 0 or norm.dtype not in norm_dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in norm_dtypes)
        raise ValueError(f"{_NS}::{op}: expected norm to be a 0-dim {names} tensor, got {norm.dtype} {tuple(norm.shape)}")
    _check_offsets(op, bit_offsets, params, bits.numel() * 8, allow_dense=True)
    if not params:
        return
    dev = params[0].device
    for name, t in (("bits", bits), ("block_prefix", block_prefix), ("norm", norm)):
        if t.device != dev:
            raise ValueError(f"{_NS}::{op}: expected {name} on {dev}, got {t.device}")
    _check_list(op, "saved", saved, dev, _FLOATS)
    _check_list(op, "params", params, dev, _FLOATS)
    next_free = [0] * len(saved)
    for i, (p, slot, offset, count) in enumerate(zip(params, saved_slots, saved_offsets, saved_counts)):
        if grads is not None and (grads[i] is None) != (slot == -1):
            has = grads[i] is not None
            raise ValueError(f"{_NS}::{op}: expected grads[{i}] {'to be None' if has else 'to be a tensor'}, as "
                             f"saved_slots[{i}] is {slot}")
        if slot == -1:
            continue
        if not 0 <= slot < len(saved):
            raise ValueError(f"{_NS}::{op}: expected saved_slots[{i}] in [0, {len(saved)}) (an index into saved) or -1, "
                             f"got {slot}")
        if saved[slot].dtype != p.dtype:
            raise TypeError(f"{_NS}::{op}: expected saved[{slot}] (the buffer of params[{i}]) of dtype {p.dtype} (the "
                            f"parameter's), got {saved[slot].dtype}")
        if bit_offsets[i] == -1 and count != p.numel():
            raise ValueError(
                f"{_NS}::{op}: expected saved_counts[{i}] of a dense tensor to be its numel {p.numel()}, got {count}")
        if bit_offsets[i] != -1 and not 0 <= count <= p.numel():
            raise ValueError(f"{_NS}::{op}: expected saved_counts[{i}] (the set mask bits of params[{i}]) in "
                             f"[0, {p.numel()}], got {count}")
        if offset < next_free[slot]:
            raise ValueError(f"{_NS}::{op}: expected saved_offsets[{i}] >= {next_free[slot]} (where the previous "
                             f"tensor's originals in saved[{slot}] end): ranges follow parameter order without "
                             f"overlapping, got {offset}")
        if offset + count > saved[slot].numel():
            raise ValueError(f"{_NS}::{op}: saved[{slot}] must hold the {count} originals of params[{i}] from offset "
                             f"{offset}, but has {saved[slot].numel()} elements")
        next_free[slot] = offset + count


def _masked_perturb_fake(params, grads, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix,
                         bit_offsets, rho, adaptive, norm, eps) -> None:
    if not len(rho) == len(adaptive) == len(params):
        raise ValueError(f"{_NS}::masked_perturb: expected one rho and one adaptive flag per parameter ({len(params)}), "
                         f"got {len(rho)} and {len(adaptive)}")
    _check_perturb_restore("masked_perturb", params, grads, saved, saved_slots, saved_offsets, saved_counts, bits,
                           block_prefix, bit_offsets, norm)


def _masked_restore_fake(params, saved, saved_slots, saved_offsets, saved_counts, bits, block_prefix, bit_offsets,
                         norm) -> None:
    _check_perturb_restore("masked_restore", params, None, saved, saved_slots, saved_offsets, saved_counts, bits,
                           block_prefix, bit_offsets, norm)


_FAKES = {
    "fisher_accumulate": _fisher_accumulate_fake,
    "select_mask": _select_mask_fake,
    "key_histogram": _key_histogram_fake,
    "mask_from_threshold": _mask_from_threshold_fake,
    "mask_block_prefix": _mask_block_prefix_fake,
    "grad_norm": _grad_norm_fake,
    "masked_perturb": _masked_perturb_fake,
    "masked_restore": _masked_restore_fake,
}
# Fakes of op families that live next to their reference (op name -> module, function).
_OTHER_FAKES = {
    "select_nm_mask": ("fsam_kernels.structured", "select_nm_mask_fake"),  # csrc/nm_mask.cpp
}
_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    for name, fn in _FAKES.items():
        torch.library.register_fake(f"{_NS}::{name}", fn)
    ops = getattr(torch.ops, _NS)
    for name, (module, attr) in _OTHER_FAKES.items():
        if hasattr(ops, name):  # built only when its source file is there
            torch.library.register_fake(f"{_NS}::{name}", getattr(importlib.import_module(module), attr))
    _fakes_registered = True


def _register_if_loaded() -> None:
    # Imported by the extension's module init, once its ops are defined.
    if hasattr(getattr(torch.ops, _NS), "select_mask"):
        _register_fakes()


_register_if_loaded()
