"""Device tables describing many tensors at once, cached by the tensors' addresses and sizes."""
from __future__ import annotations

from typing import Sequence

import torch

from ..backends.tables import TableCache  # noqa: F401  (the backends' cache, re-exported)
from . import CHUNK

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
"""Element types the kernels handle; anything else (e.g. float64) goes to the reference."""


def triton_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor copied to ``device`` without stalling the host: torch synchronises the
    stream after a copy from pageable memory, while a copy from pinned memory is queued like a kernel
    (the pinned buffer is kept until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def aligned16(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every tensor starts on a 16-byte boundary: then a kernel whose blocks start at multiples
    of CHUNK elements may use 128-bit loads and stores on full blocks (allocations always are; views
    into a flat buffer may not be)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors)


def pointer_table(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return upload(torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), device)


def chunk_table(numels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slot, start, local) per chunk, on the CPU: chunk ``c`` covers elements
    ``[start[c], start[c] + CHUNK)`` of tensor ``slot[c]`` and is that tensor's chunk number ``local[c]``."""
    n = torch.tensor(list(numels), dtype=torch.int64)
    counts = (n + CHUNK - 1) // CHUNK
    slot = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(int(counts.sum()), dtype=torch.int64) - torch.repeat_interleave(first, counts)
    return slot.to(torch.int32), local * CHUNK, local
