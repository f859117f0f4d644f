"""Where every perturbed element lives: the index space shared by all backends.

The optimizer describes the tensors it perturbs once, as a :class:`ParamLayout`; every op of every
backend reads the same description, so masks built by one backend are valid for another and can be
saved in a checkpoint.

Packed mask format (the one thing backends must agree on bit for bit):

* The *masked* tensors (groups with ``fisher_mask=True``) are numbered in param_group order.
* Tensor ``i`` owns the bits ``[bit_offset[i], bit_offset[i] + numel[i])`` of one ``uint8`` buffer;
  element ``e`` of its row-major flattening is bit ``b = bit_offset[i] + e``, stored in byte ``b >> 3``
  at bit position ``b & 7`` (least significant bit first).
* ``bit_offset[i]`` is a multiple of :data:`MASK_ALIGN_BITS` (512 bits = 64 bytes), so a kernel block
  of a multiple of 512 elements writes whole bytes of one tensor only; the padding bits are always 0.
* The global order of masked elements (used to break ties) is the order of their bit indices:
  tensors in param_group order, row-major inside a tensor.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

MASK_ALIGN_BITS = 512

_T = torch.Tensor
_dtype = operator.attrgetter("dtype")


def storage_signature(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a kernel writing into ``tensors`` relies on: their addresses, dtypes and sizes (a view of
    another shape over the same memory writes the same bytes). C-level maps: a step takes it at
    every tensor, twice (see docs/backends.md, host time)."""
    return tuple(map(_T.data_ptr, tensors)), tuple(map(_dtype, tensors)), tuple(map(_T.numel, tensors))


def grad_signature(grads: Sequence[Optional[torch.Tensor]]) -> Optional[tuple]:
    """Addresses, dtypes, sizes and contiguity of a step's gradients (``None`` entries kept): when it
    equals the last step's, so does everything checked or derived from them. ``None`` when a
    gradient has no address (sparse): nothing is cached then."""
    try:
        return storage_signature(grads) + (tuple(map(_T.is_contiguous, grads)),)
    except TypeError:  # a parameter without a gradient
        pass
    except RuntimeError:  # sparse
        return None
    try:
        return ("missing", tuple(None if g is None else (g.data_ptr(), g.dtype, g.numel(), g.is_contiguous())
                                 for g in grads))
    except RuntimeError:
        return None


class CheckedGrads(list):
    """A step's gradients, checked by the optimizer, with their :func:`grad_signature` (``signature``;
    ``None``: not to be cached). Backends key what they derive from the gradients by
    ``(layout.tensors_key, signature)``; a plain list has no signature and is checked as usual."""

    signature: Optional[tuple] = None
    complete = False  # True: every parameter has a gradient


def align_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def full_mask(numels: Sequence[int], device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The packed mask of masked tensors of these sizes with every element's bit set and every padding
    bit 0 (no packed mask may have a padding bit set)."""
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + align_up(n, MASK_ALIGN_BITS) // 8)
    bits = torch.zeros(starts[-1], dtype=torch.uint8, device=device)
    for start, n in zip(starts, numels):
        bits[start : start + n // 8] = 0xFF
        if n % 8:
            bits[start + n // 8] = (1 << (n % 8)) - 1
    return bits


@dataclass
class ParamLayout:
    """The perturbed parameters of an optimizer, in param_group order.

    ``params`` holds every parameter that can be perturbed (its group has ``perturb=True``).
    ``masked[i]`` says whether parameter ``i`` takes part in the Fisher mask (``fisher_mask=True``)
    or is perturbed densely. ``rho[i]`` and ``adaptive[i]`` come from its param group.
    """

    params: list[torch.Tensor]
    masked: list[bool]
    rho: list[float]
    adaptive: list[bool]
    # derived
    numel: list[int] = field(init=False)
    shapes: list[torch.Size] = field(init=False, repr=False)  # recorded, not live: p.data = ... may change them
    masked_index: list[int] = field(init=False)  # positions (in params) of the masked tensors
    dense_index: list[int] = field(init=False)  # positions (in params) of the dense tensors
    bit_offset: list[int] = field(init=False)  # per masked tensor, in masked order
    n_masked: int = field(init=False)  # N: elements taking part in the mask
    mask_bytes: int = field(init=False)
    # Identity of everything but ``rho``: layouts made by :meth:`with_rho` share it, so backends key
    # their device tables (pointers, offsets, mask prefix counts) by it and a rho schedule rebuilds none.
    tensors_key: object = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.params)
        if not (len(self.masked) == len(self.rho) == len(self.adaptive) == n):
            raise ValueError("ParamLayout: params, masked, rho and adaptive must have the same length")
        self.numel = [p.numel() for p in self.params]
        self.shapes = [p.shape for p in self.params]
        self.masked_index = [i for i in range(n) if self.masked[i]]
        self.dense_index = [i for i in range(n) if not self.masked[i]]
        offsets, bit = [], 0
        for i in self.masked_index:
            offsets.append(bit)
            bit += align_up(self.numel[i], MASK_ALIGN_BITS)
        self.bit_offset = offsets
        self.n_masked = sum(self.numel[i] for i in self.masked_index)
        self.mask_bytes = bit // 8
        self.tensors_key = object()

    def with_rho(self, rho: list[float]) -> "ParamLayout":
        """The same tensors, bit offsets and ``tensors_key`` with other per-tensor rho values."""
        if len(rho) != len(self.params):
            raise ValueError(f"ParamLayout.with_rho: expected {len(self.params)} rho values, got {len(rho)}")
        other = ParamLayout(self.params, self.masked, [float(r) for r in rho], self.adaptive)
        other.tensors_key = self.tensors_key
        return other

    @property
    def masked_params(self) -> list[torch.Tensor]:
        return [self.params[i] for i in self.masked_index]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def k_for(self, sparsity: float) -> int:
        """Number of masked elements kept: ``round((1 - sparsity) * N)`` with Python's ``round``."""
        return int(round((1.0 - sparsity) * self.n_masked))

    def empty_mask(self) -> torch.Tensor:
        return torch.zeros(self.mask_bytes, dtype=torch.uint8, device=self.device)

    def full_mask(self) -> torch.Tensor:
        """Every masked element set (padding bits stay 0)."""
        return full_mask([self.numel[i] for i in self.masked_index], self.device)
