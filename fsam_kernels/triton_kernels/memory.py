"""How the streaming kernels read memory: 128-bit accesses per tensor, the packed mask in words.

* A kernel reads each tensor's address from its pointer table and takes the vector path (full blocks,
  no bounds mask, 128-bit loads and stores) for the tensors on 16 bytes, the masked path for the
  others (views at odd offsets into a flat buffer, FSDP shards) and for partial blocks: one misaligned
  tensor does not drop the whole launch to the scalar path.
* The packed mask is read as little-endian 32-bit words, one load per 32 elements, and expanded to
  one flag per element with shifts (bit ``i`` of the mask is bit ``i % 32`` of word ``i // 32``).
  Every tensor's bits start on a 512-bit boundary and chunks on multiples of ``CHUNK``, so a block's
  words are whole; the mask tensor must start on 4 bytes (the backend copies one that does not).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _on16(address):
    """Whether an address read from a pointer table (int64; OR several to test them all) is a multiple
    of 16 bytes. Chunks start at multiples of CHUNK elements, so their full blocks are aligned too."""
    return (address & 15) == 0


@triton.jit
def _mask_bits(mask, bit_base, start, n, SUB: tl.constexpr):
    """Which of the ``SUB`` elements from ``start`` (a multiple of 32) of the tensor of ``n`` elements
    whose bits begin at ``bit_base`` (a multiple of 512) are set in the packed uint8 ``mask``: the
    words are loaded once each (none past the tensor's end), the elements past ``n`` are unset."""
    WORDS: tl.constexpr = SUB // 32
    j = tl.arange(0, WORDS)
    words = tl.load(mask.to(tl.pointer_type(tl.int32)) + ((bit_base + start) >> 5) + j, mask=j * 32 < n - start,
                    other=0)
    bits = (words[:, None] >> tl.arange(0, 32)[None, :]) & 1
    inside = start + tl.arange(0, SUB) < n
    return inside & (tl.reshape(bits, [SUB]) != 0)
