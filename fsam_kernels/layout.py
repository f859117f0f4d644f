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

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

MASK_ALIGN_BITS = 512


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
