"""N:M structured Fisher masks (e.g. 2:4, the pattern of NVIDIA's sparse tensor cores).

``FSAM(..., structure="N:M")`` builds the mask in two parts, both written into the packed layout of
:mod:`fsam_kernels.layout`:

* **Structured tensors** - every masked parameter with at least two dimensions whose last dimension is
  divisible by ``M`` (a Linear weight's input dimension, the layout cuSPARSELt and
  ``to_sparse_semi_structured`` use). In each group of ``M`` consecutive elements along the last
  dimension the ``N`` elements with the largest Fisher key are kept; ties go to the lowest index.
  ``sparsity`` does not apply to them: their density is always ``N / M``.
* **Fallback tensors** - 1-D parameters (biases, norms) and shapes whose last dimension is not
  divisible by ``M``: the global unstructured top-k at ``sparsity``, computed among the fallback
  tensors only (``k = round((1 - sparsity) * their numel)``, same tie rule as FSAM).

The structured part is the op ``select_nm_mask`` of every backend, defined by
:func:`fsam_kernels.reference.select_nm_mask_reference`; this module decides which tensors take it.

**Already-sparse models** (``preserve_zeros``, on by default with a structure): the mask is intersected
with the weights' support, so the perturbed weights ``w + e`` stay exactly zero wherever ``w`` is
zero. Inside a structured group zeros rank below every non-zero weight (their key is -1), so a 2:4
pruned weight perturbs exactly its two surviving elements; fallback tensors take the top-k among
their non-zero weights only (``k = round((1 - sparsity) * their count)``; zeros neither selected nor
counted). The support is read when the mask is built (every ``mask_update_interval`` steps); call
:meth:`FSAM.update_mask` after re-pruning. ``keep_pruned=True`` also keeps the zeros zero through the
*base optimizer's* update (see :mod:`fsam_kernels.sparsity`).

The optimizer saves the originals of N:M-masked weights in the backends' generic compact buffer (the
packed mask is their index metadata). Also here, as standalone utilities: compact storage of a tensor's
N:M-selected values with per-group uint8 indices (:class:`NMSaved`), and the export of an N:M sparse tensor to PyTorch's semi-structured layout with
our own fallback (:func:`to_semi_structured`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from . import reference as ref
from .layout import ParamLayout
from .reference import MAX_M, nm_eligible

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = [
    "parse_structure",
    "nm_eligible",
    "build_mask",
    "NMSaved",
    "nm_compress",
    "nm_restore_",
    "NMSparse",
    "semi_structured_unsupported_reason",
    "to_semi_structured",
]


# --------------------------------------------------------------------------- arguments
def parse_structure(structure: Any) -> Optional[tuple[int, int]]:
    """``"N:M"`` -> ``(N, M)``; ``None`` -> ``None``. Raises for anything else."""
    if structure is None:
        return None
    if not isinstance(structure, str):
        raise TypeError(f"Invalid structure: {structure!r}; expected None or a string 'N:M' such as '2:4'")
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if match is None:
        raise ValueError(f"Invalid structure: {structure!r}; expected 'N:M' such as '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"Invalid structure: {structure!r}; expected 'N:M' with 1 <= N < M <= {MAX_M}")
    return n, m


# --------------------------------------------------------------------------- the optimizer's mask
def _sub_layout(layout: ParamLayout, positions: Sequence[int]) -> ParamLayout:
    """A layout of some masked tensors only (``positions`` index ``layout.masked_index``)."""
    idx = [layout.masked_index[j] for j in positions]
    return ParamLayout(
        [layout.params[i] for i in idx],
        [True] * len(idx),
        [layout.rho[i] for i in idx],
        [layout.adaptive[i] for i in idx],
    )


def _byte_map(layout: ParamLayout, sub: ParamLayout, positions: Sequence[int]) -> torch.Tensor:
    """Byte index in ``layout``'s mask of every byte of ``sub``'s mask. Offsets are 64-byte aligned in
    both, so each tensor's bytes (padding included) move as one contiguous run."""
    dst = torch.empty(sub.mask_bytes, dtype=torch.long)
    for s, j in enumerate(positions):
        start = sub.bit_offset[s] // 8
        end = sub.bit_offset[s + 1] // 8 if s + 1 < len(positions) else sub.mask_bytes
        dst[start:end] = torch.arange(end - start) + layout.bit_offset[j] // 8
    return dst.to(layout.device)


def _top_k(backend: "Backend", layout: ParamLayout, scores: Sequence[torch.Tensor], sparsity: float,
           scores_are_grads: bool, shards: Any = None, n_global: Optional[int] = None) -> torch.Tensor:
    """The global top-k of ``layout``'s tensors, ``k = round((1 - sparsity) * N)``: on this process, or
    over every rank's shards (``shards``, FSDP2; ``N`` = ``n_global``, by default the full sizes)."""
    if shards is None:
        return backend.select_mask(layout, scores, layout.k_for(sparsity), scores_are_grads)
    return shards.select_mask(backend, layout, scores, sparsity, scores_are_grads, n_global=n_global)


def _select_on_support(backend: "Backend", layout: ParamLayout, scores: Sequence[torch.Tensor], sparsity: float,
                       scores_are_grads: bool, shards: Any = None) -> torch.Tensor:
    """The global top-k among the non-zero weights only: ``k = round((1 - sparsity) * their count)``, a
    zero weight neither selected nor counted (ties: lowest index, as the order of the non-zero weights
    is kept). The backend's top-k runs on the scores of the non-zero weights, packed densely; sharded,
    the count is summed over the ranks, and every tensor takes part (empty where a rank's shard has no
    non-zero weight), so every rank runs the same collectives."""
    alive = [p.detach().reshape(-1) != 0 for p in layout.masked_params]
    masks = [torch.zeros_like(a) for a in alive]
    if shards is None:
        counts = [int(a.sum()) for a in alive]
        live, n_global = [j for j, c in enumerate(counts) if c], None
    else:
        live = list(range(len(alive)))
        n_global = int(shards.all_reduce_sum(torch.stack([a.sum() for a in alive]).sum().reshape(1)).item())
    if live:
        packed = [scores[j].reshape(-1)[alive[j]] for j in live]
        dense = ParamLayout(packed, [True] * len(live), [0.0] * len(live), [False] * len(live))
        bits = _top_k(backend, dense, packed, sparsity, scores_are_grads, shards, n_global)
        for j, chosen in zip(live, ref.unpack_mask(dense, bits)):
            masks[j][alive[j]] = chosen
    return ref.pack_mask(layout, masks)


def build_mask(
    backend: "Backend",
    layout: ParamLayout,
    scores: Sequence[torch.Tensor],
    scores_are_grads: bool,
    sparsity: float,
    structure: Optional[tuple[int, int]],
    preserve_zeros: bool,
    shards: Any = None,
) -> torch.Tensor:
    """The packed mask FSAM uses with ``structure`` and/or ``preserve_zeros`` (see the module doc).

    ``shards`` (:class:`fsam_kernels.fsdp.ShardedParams`): ``layout`` holds FSDP2 shards. ``Shard(0)``
    splits rows and an N:M group lies along the last dimension, so the structured part is local, and
    which tensors take it is the same on every rank; the fallback's top-k is global over the ranks.
    """
    masked = layout.masked_params
    if structure is None:
        structured, fallback = [], list(range(len(masked)))
    else:
        n, m = structure
        structured = [j for j, p in enumerate(masked) if nm_eligible(p.shape, m)]
        fallback = [j for j, p in enumerate(masked) if not nm_eligible(p.shape, m)]
    if structured:
        support = masked if preserve_zeros else None
        bits = backend.select_nm_mask(layout, scores, n, m, scores_are_grads, support)
    else:
        bits = layout.empty_mask()
    if not fallback:
        return bits
    sub = _sub_layout(layout, fallback)
    sub_scores = [scores[j] for j in fallback]
    if preserve_zeros:
        sub_bits = _select_on_support(backend, sub, sub_scores, sparsity, scores_are_grads, shards)
    else:
        sub_bits = _top_k(backend, sub, sub_scores, sparsity, scores_are_grads, shards)
    bits.index_copy_(0, _byte_map(layout, sub, fallback), sub_bits)
    return bits


# --------------------------------------------------------------------------- compact N:M values
def _groups(t: torch.Tensor, m: int) -> torch.Tensor:
    return t.reshape(-1, m)


def _check_nm_tensor(op: str, t: torch.Tensor, n: int, m: int) -> None:
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"{op}: expected 1 <= n < m <= {MAX_M}, got n={n}, m={m}")
    if not nm_eligible(t.shape, m):
        raise ValueError(
            f"{op}: expected a tensor with >= 2 dimensions and a last dimension divisible by {m}, got shape {tuple(t.shape)}"
        )
    if not t.is_contiguous():
        raise ValueError(f"{op}: expected a contiguous tensor")


@dataclass
class NMSaved:
    """Values of an N:M-selected tensor plus per-group index metadata.

    ``values[g, s]`` is the element at position ``indices[g, s]`` (in ``[0, m)``, ascending within a
    group) of group ``g``; every group holds exactly ``n`` entries, so no prefix counts are needed to
    find a group's values. A group with fewer than ``n`` selected elements (a pruned weight under
    ``preserve_zeros``) is padded with its lowest unselected positions; restoring those writes back the
    value they still hold.
    """

    values: torch.Tensor  # (groups, n), the tensor's dtype
    indices: torch.Tensor  # (groups, n), uint8
    shape: torch.Size
    n: int
    m: int

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def _nm_indices(selected: torch.Tensor, n: int) -> torch.Tensor:
    """Per group, the positions of its selected elements, then its lowest unselected ones; n of them."""
    if bool((selected.sum(dim=1) > n).any()):
        raise ValueError(f"expected at most {n} selected elements in every group")
    # Stable sort of "not selected" puts the selected positions first, each part in index order.
    order = torch.sort((~selected).to(torch.uint8), dim=1, stable=True).indices[:, :n]
    return torch.sort(order, dim=1).values


def nm_compress(t: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> NMSaved:
    """Save the values of ``t`` at the N:M ``mask`` (bool, shaped like ``t``) as :class:`NMSaved`."""
    _check_nm_tensor("nm_compress", t, n, m)
    if mask.shape != t.shape or mask.dtype != torch.bool:
        raise ValueError(f"nm_compress: expected a bool mask of shape {tuple(t.shape)}, got {mask.dtype} {tuple(mask.shape)}")
    try:
        idx = _nm_indices(_groups(mask, m), n)
    except ValueError as exc:
        raise ValueError(f"nm_compress: mask is not {n}:{m}; {exc}") from None
    values = torch.gather(_groups(t.detach(), m), 1, idx)
    return NMSaved(values.clone(), idx.to(torch.uint8), t.shape, n, m)


def nm_restore_(t: torch.Tensor, saved: NMSaved) -> None:
    """Write the saved values back into ``t`` (bit-exact)."""
    if t.shape != saved.shape or t.dtype != saved.values.dtype:
        raise ValueError(
            f"nm_restore_: expected a {saved.values.dtype} tensor of shape {tuple(saved.shape)}, got {t.dtype} {tuple(t.shape)}"
        )
    with torch.no_grad():
        _groups(t, saved.m).scatter_(1, saved.indices.long(), saved.values)


# --------------------------------------------------------------------------- semi-structured export
@dataclass
class NMSparse:
    """Our own compressed N:M tensor (values + per-group indices), used where PyTorch's semi-structured
    layout is unavailable (CPU, pre-sm80 GPUs, old torch, N:M other than 2:4)."""

    saved: NMSaved
    reason: str  # why PyTorch's layout was not used

    @property
    def shape(self) -> torch.Size:
        return self.saved.shape

    def to_dense(self) -> torch.Tensor:
        s = self.saved
        out = torch.zeros(s.shape, dtype=s.values.dtype, device=s.values.device)
        _groups(out, s.m).scatter_(1, s.indices.long(), s.values)
        return out


_SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


def semi_structured_unsupported_reason(t: torch.Tensor, n: int, m: int) -> Optional[str]:
    """``None`` when ``torch.sparse.to_sparse_semi_structured`` can take ``t`` (as far as we can tell
    without calling it), else why not. The API is a prototype, so everything is checked."""
    if (n, m) != (2, 4):
        return f"PyTorch's semi-structured layout is 2:4 only, not {n}:{m}"
    if getattr(torch.sparse, "to_sparse_semi_structured", None) is None:
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if t.device.type != "cuda":
        return f"semi-structured sparsity needs a CUDA tensor, got one on {t.device}"
    if torch.cuda.get_device_capability(t.device) < (8, 0):
        return "semi-structured sparsity needs a GPU of compute capability 8.0 or newer"
    if t.dim() != 2:
        return f"semi-structured sparsity takes 2-D tensors, got shape {tuple(t.shape)}"
    if t.dtype not in _SEMI_STRUCTURED_DTYPES:
        return f"semi-structured 2:4 sparsity takes float16/bfloat16, got {t.dtype}"
    return None


def to_semi_structured(t: torch.Tensor, structure: str = "2:4") -> Any:
    """Export an N:M sparse tensor (e.g. a perturbation ``e`` under a 2:4 mask) compressed.

    Returns ``torch.sparse.to_sparse_semi_structured(t)`` when PyTorch supports it for ``t`` (2:4,
    CUDA sm80+, fp16/bf16, shapes its kernels accept), else our :class:`NMSparse`. Both have
    ``to_dense()``. Raises ``ValueError`` if ``t`` has more than N non-zeros in some group.
    """
    nm = parse_structure(structure)
    if nm is None:
        raise ValueError("to_semi_structured: expected a structure 'N:M', got None")
    n, m = nm
    _check_nm_tensor("to_semi_structured", t, n, m)
    nonzero = t.detach() != 0
    if bool((_groups(nonzero, m).sum(dim=1) > n).any()):
        raise ValueError(f"to_semi_structured: tensor is not {n}:{m} sparse (a group of {m} holds more than {n} non-zeros)")
    reason = semi_structured_unsupported_reason(t, n, m)
    if reason is None:
        try:
            return torch.sparse.to_sparse_semi_structured(t.detach())
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # shape limits of the prototype kernels
            reason = f"to_sparse_semi_structured failed: {exc}"
    return NMSparse(nm_compress(t.detach(), nonzero, n, m), reason)
