"""Where the parameters' values live: memory shared by two parameters, storage replaced between passes.

* **Shared memory.** FSAM perturbs and restores each parameter on its own, so two parameters whose
  memory overlaps (the same tensor listed twice, tied weights listed as two parameters, overlapping
  views of one storage) would be perturbed twice and left perturbed by the restore.
  :func:`check_disjoint` refuses them; views of one storage that do not overlap are fine.
* **Replaced storage.** Between ``first_step`` and the restore a user may move or cast the model
  (``model.to(torch.float64)``, ``p.data = p.data.clone()``). The backends restore through what they
  captured at ``first_step`` (the Triton backend: raw addresses), so the optimizer compares the
  parameters' :func:`signature` with the one taken then and, when it differs, writes the saved
  originals into the current storage with :func:`restore_into` instead (cast to the current dtype
  and device).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from . import reference as ref
from .layout import ParamLayout


def _memory_span(t: torch.Tensor) -> Optional[tuple[torch.device, int, int]]:
    """(device, first byte, one past the last byte) of the memory ``t`` addresses; ``None`` when it
    has none to share (empty, meta, or a tensor subclass without storage)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    if start == 0:
        return None
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.device, start, start + extent * t.element_size()


def check_disjoint(groups: Sequence[dict], local: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
    """Raise ``ValueError`` naming two parameters of ``groups`` whose memory overlaps.

    ``local`` maps a parameter to the tensor holding its values here (its local shard under FSDP2).
    One sort of the byte ranges: cheap enough for every layout rebuild."""
    spans = []
    for gi, group in enumerate(groups):
        for pi, p in enumerate(group["params"]):
            span = _memory_span(local(p))
            if span is not None:
                spans.append((str(span[0]), span[1], span[2], gi, pi, p))
    spans.sort(key=lambda s: s[:2])
    reach = None  # the span reaching furthest so far on the current device
    for s in spans:
        if reach is not None and reach[0] == s[0] and s[1] < reach[2]:
            a, b = reach, s
            raise ValueError(
                f"Invalid params: param_groups[{a[3]}]['params'][{a[4]}] (shape {tuple(a[5].shape)}) and "
                f"param_groups[{b[3]}]['params'][{b[4]}] (shape {tuple(b[5].shape)}) share memory; FSAM would "
                "perturb it twice and could not restore it. List every tensor once (model.parameters() lists "
                "tied weights once)"
            )
        if reach is None or reach[0] != s[0] or s[2] > reach[2]:
            reach = s


def signature(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a backend's restore relies on: each tensor's address, dtype and shape."""
    return tuple([(t.data_ptr(), t.dtype, t.shape) for t in tensors])


def restore_into(
    tensors: Sequence[torch.Tensor],
    layout: ParamLayout,
    bits: Optional[torch.Tensor],
    originals: Sequence[Optional[torch.Tensor]],
    shapes: Sequence[Any],
) -> list[int]:
    """Write ``originals`` (the reference's saved format, taken from ``layout.params`` with mask
    ``bits``) into ``tensors``, wherever their storage is now, cast to their dtype and device.

    A tensor whose shape is no longer ``shapes[i]`` is left as it is: its originals have no defined
    place in it. Returns the positions of those tensors."""
    masked_pos = {i: j for j, i in enumerate(layout.masked_index)}
    changed = []
    for i, (t, s) in enumerate(zip(tensors, originals)):
        if s is None:
            continue
        if t.shape != shapes[i]:
            changed.append(i)
            continue
        target = t.detach()
        in_place = target.is_contiguous()
        flat = target.view(-1) if in_place else target.contiguous().view(-1)  # row-major, like the mask
        values = s.to(device=flat.device, dtype=flat.dtype)
        if i in masked_pos:
            flat[ref.mask_of(layout, bits, masked_pos[i]).to(flat.device)] = values
        else:
            flat.copy_(values)
        if not in_place:
            target.copy_(flat.view(target.shape))
    return changed
