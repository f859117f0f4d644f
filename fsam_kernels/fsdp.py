"""FSAM on FSDP2-sharded parameters (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every parameter (and its gradient) is a DTensor placed ``Shard(0)`` on a 1-D device
mesh: rank ``r`` holds the ``r``-th ``torch.chunk`` of the rows (the last chunks may be smaller or
empty). :class:`ShardedParams` lets the optimizer work on the local shards and adds the three global
quantities FSAM needs, computed without gathering gradients or Fisher scores anywhere:

* ``k`` from the global element count of the masked parameters;
* the gradient norm: ``sqrt(all_reduce(local_norm ** 2))``;
* the mask: a radix-histogram top-k (:mod:`fsam_kernels.distributed_select`), a few KiB per pass,
  identical bit for bit to the mask the unsharded model would get for the same gradients.

Perturb and restore are local; each rank holds the mask bits, saved originals and Fisher accumulators
of its own shard only.

Checkpoints with ``torch.distributed.checkpoint``: ``get_optimizer_state_dict`` calls
``optimizer.step(closure=None)`` to initialise empty state and keeps only ``state`` and
``param_groups``, so give it ``fsam.base_optimizer`` and save FSAM's own state next to it with
:func:`fsam_state_dict` (DTensors shaped like the parameters, so the checkpoint can be resharded).
"""
from __future__ import annotations

import sys
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

from . import reference as ref
from .checkpoint import check_mask_options, check_support
from .distributed_select import select_mask_by_histogram
from .layout import ParamLayout

__all__ = ["ShardedParams", "fsam_state_dict", "load_fsam_state_dict"]


# The oldest torch FSAM under FSDP2 is verified on: `fully_shard` is public from 2.6, and on torch 2.7.1
# the sharded trajectory test diverged from the unsharded run (docs/install.md).
FSDP2_FLOOR = (2, 9)

# Where DTensor and its placements live: torch.distributed.tensor from torch 2.5; before, the private
# torch.distributed._tensor (torch 2.4 has a torch.distributed.tensor package too, without DTensor).
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")


def _dtensor_module() -> Any:
    # No DTensor can exist before its module is imported, and importing it costs seconds: look, don't load.
    for name in _DTENSOR_MODULES:
        module = sys.modules.get(name)
        if isinstance(getattr(module, "DTensor", None), type):
            return module
    return None


def _dtensor_type() -> Optional[type]:
    module = _dtensor_module()
    return None if module is None else module.DTensor


class ShardedParams:
    """The parameters of an FSAM optimizer as FSDP2 shards: local views and global reductions."""

    def __init__(self, mesh: Any) -> None:
        self.mesh = mesh
        self.group = mesh.get_group()
        self.rank = torch.distributed.get_rank(self.group)
        self.world_size = torch.distributed.get_world_size(self.group)
        self._views: dict[int, tuple[int, torch.Size, torch.Tensor]] = {}  # id(param) -> local view
        self._owner: dict[int, torch.Tensor] = {}  # id(local view) -> DTensor parameter

    @classmethod
    def detect(cls, params: Iterable[torch.Tensor]) -> Optional["ShardedParams"]:
        """``None`` for ordinary parameters; a ``ShardedParams`` when they are FSDP2 shards.

        Raises ValueError for a mix of DTensor and ordinary parameters, or a placement other than
        ``Shard(0)`` on one 1-D mesh (the layout FSDP2's ``fully_shard`` produces).
        """
        dtensor = _dtensor_type()
        params = list(params)
        if dtensor is None or not any(isinstance(p, dtensor) for p in params):
            return None
        Shard = _dtensor_module().Shard

        mesh = None
        for i, p in enumerate(params):
            if not isinstance(p, dtensor):
                raise ValueError(
                    f"FSAM: parameter {i} (shape {tuple(p.shape)}) is an ordinary tensor while others are "
                    "DTensors; shard every parameter the optimizer holds with fully_shard, or none"
                )
            if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
                raise ValueError(
                    f"FSAM: parameter {i} has placements {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh; "
                    "expected (Shard(dim=0),) on a 1-D mesh (FSDP2 fully_shard without HSDP)"
                )
            if mesh is None:
                mesh = p.device_mesh
            elif p.device_mesh != mesh:
                raise ValueError(f"FSAM: parameter {i} lives on another device mesh than parameter 0")
        if tuple(int(x) for x in torch.__version__.split(".")[:2]) < FSDP2_FLOOR:
            warnings.warn(
                f"FSAM under FSDP2 is verified from torch {'.'.join(map(str, FSDP2_FLOOR))}; torch "
                f"{torch.__version__} is older (on torch 2.7.1 a sharded run diverged from the unsharded one): "
                "upgrade torch, or check your results against an unsharded run",
                RuntimeWarning,
                stacklevel=3,
            )
        return cls(mesh)

    # ------------------------------------------------------------------ local views
    @torch.no_grad()
    def local_tensors(self, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The local shard of each parameter: a view sharing its storage, so in-place ops on it
        change the parameter. The same view object is returned while the storage stays put, which
        keeps the optimizer's cached layout valid."""
        out = []
        for p in params:
            local = p.to_local()
            cached = self._views.get(id(p))
            if cached is not None and cached[0] == local.data_ptr() and cached[1] == local.shape:
                local = cached[2]
            else:
                if cached is not None:  # the storage moved (e.g. FSDP2's lazy init): forget the old view
                    self._owner.pop(id(cached[2]), None)
                self._views[id(p)] = (local.data_ptr(), local.shape, local)
                self._owner[id(local)] = p
            out.append(local)
        return out

    def param_of(self, local: torch.Tensor) -> torch.Tensor:
        """The DTensor parameter a local view belongs to."""
        return self._owner[id(local)]

    @torch.no_grad()
    def local_grad(self, local: torch.Tensor) -> Optional[torch.Tensor]:
        """The local shard of the gradient of the parameter whose local view is ``local``."""
        g = self.param_of(local).grad
        if g is None:
            return None
        g = g.to_local() if isinstance(g, _dtensor_type()) else g
        if g.shape != local.shape:
            raise ValueError(
                f"FSAM: a gradient's local shard has shape {tuple(g.shape)}, its parameter's {tuple(local.shape)}"
            )
        return g

    @torch.no_grad()
    def local_fisher(
        self, fisher: Union[Sequence[torch.Tensor], Mapping[torch.Tensor, torch.Tensor]]
    ) -> Union[list[torch.Tensor], dict[torch.Tensor, torch.Tensor]]:
        """Fisher scores given for the DTensor parameters (a list, or a dict keyed by parameter),
        as local shards keyed like the optimizer's layout."""
        dtensor = _dtensor_type()

        def local(v: Any) -> Any:
            return v.to_local() if isinstance(v, dtensor) else v

        if isinstance(fisher, Mapping):
            return {self._views[id(p)][2] if id(p) in self._views else p: local(v) for p, v in fisher.items()}
        return [local(v) for v in fisher]

    # ------------------------------------------------------------------ global quantities
    def global_masked_numel(self, layout: ParamLayout) -> int:
        return sum(self.param_of(layout.params[i]).numel() for i in layout.masked_index)

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The norm over every rank's shard from each rank's local norm (non-finite anywhere ->
        non-finite everywhere, so every rank skips the same steps)."""
        # fp64: squaring a large fp32 norm must not overflow where the global norm is finite; the
        # result keeps the local norm's dtype (the norm dtype, see fsam_kernels.reference)
        sq = local_norm.double() * local_norm.double()
        torch.distributed.all_reduce(sq, group=self.group)
        return sq.sqrt().to(local_norm.dtype)

    def select_mask(
        self, backend: Any, layout: ParamLayout, scores: Sequence[torch.Tensor], sparsity: float,
        scores_are_grads: bool, n_global: Optional[int] = None,
    ) -> torch.Tensor:
        """This rank's packed mask of the global top-k, ``k = round((1 - sparsity) * n_global)``;
        ``n_global``: how many elements compete over all ranks, by default the masked parameters' full
        sizes (a layout of other tensors, e.g. the non-zero weights' scores, must give it)."""
        n = self.global_masked_numel(layout) if n_global is None else n_global
        return select_mask_by_histogram(
            backend,
            layout,
            scores,
            int(round((1.0 - sparsity) * n)),
            scores_are_grads,
            n_global=n,
            all_reduce_sum=self.all_reduce_sum,
            all_gather=self.all_gather,
            rank=self.rank,
        )

    def on_every_rank(self, check: Callable[[], Any], what: str, device: torch.device) -> Any:
        """``check()``'s result when it returned on every rank; when it raised on some rank, an error on
        every rank (that rank's own, elsewhere one saying so), so no rank acts alone or waits in a
        collective the others skipped. One all-reduce of one int64."""
        try:
            result, refused = check(), None
        except Exception as exc:  # noqa: BLE001 - re-raised below, on this rank and (as a count) on the others
            result, refused = None, exc
        n = int(self.all_reduce_sum(torch.tensor([int(refused is not None)], device=device)).item())
        if refused is not None:
            raise refused
        if n:
            raise ValueError(f"{what}: refused on {n} other rank(s) of {self.world_size} (their error says why); "
                             "nothing changed on any rank")
        return result

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks of the mesh (a new tensor when ``t`` is not contiguous)."""
        t = t.contiguous()
        torch.distributed.all_reduce(t, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` of every rank of the mesh, stacked in rank order along a new dim 0."""
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, t, group=self.group)
        return torch.stack(out)


# --------------------------------------------------------------------------- checkpoints
_SCALARS = ("step_count", "fisher_count", "has_mask", "has_fisher")


def fsam_state_dict(optimizer: Any) -> dict[str, torch.Tensor]:
    """FSAM's own state (not the base optimizer's) for ``torch.distributed.checkpoint``.

    Masks (one uint8 per element), Fisher accumulators (fp32) and, with ``keep_pruned``, the support
    (one uint8 per element: 1 where the weight is kept) are DTensors placed like their parameters;
    counters and, when any is on, the mask options (``structure`` as ``[N, M]``, ``[0, 0]`` for none;
    ``preserve_zeros``; ``keep_pruned``) are replicated int64 tensors. Absent masks/accumulators are
    saved as zeros with a flag, so the same call on a fresh optimizer gives the template ``dcp.load``
    fills in: the template of an optimizer with options asks for them (a checkpoint without them is
    refused by ``dcp.load``); one without options does not (the mask of a checkpoint written with
    them loads as a plain mask).
    """
    optimizer._require_idle("fsam_state_dict")
    layout = optimizer._current_layout()
    shards: Optional[ShardedParams] = getattr(optimizer, "_shards", None)
    dev = layout.device
    mask = optimizer._mask
    masks = ref.unpack_mask(layout, mask.bits) if mask.bits is not None else None
    support = ref.unpack_mask(layout, mask.support) if mask.keep_pruned and mask.support is not None else None
    accum = mask.fisher
    sd: dict[str, torch.Tensor] = {
        "step_count": torch.tensor(optimizer.step_count, dtype=torch.int64),
        "fisher_count": torch.tensor(mask.fisher_count, dtype=torch.int64),
        "has_mask": torch.tensor(int(masks is not None), dtype=torch.int64),
        "has_fisher": torch.tensor(int(accum is not None), dtype=torch.int64),
    }
    if mask.structure is not None or mask.preserve_zeros or mask.keep_pruned:
        # Only then: the template of an optimizer without them stays what it was before they were
        # recorded, so dcp.load still reads those older checkpoints.
        sd["structure"] = torch.tensor(list(mask.structure or (0, 0)), dtype=torch.int64)
        sd["preserve_zeros"] = torch.tensor(int(mask.preserve_zeros), dtype=torch.int64)
        sd["keep_pruned"] = torch.tensor(int(mask.keep_pruned), dtype=torch.int64)
    for j, i in enumerate(layout.masked_index):
        local = layout.params[i]
        m = masks[j].to(torch.uint8) if masks is not None else torch.zeros(local.shape, dtype=torch.uint8, device=dev)
        f = accum[j].clone() if accum is not None else torch.zeros(local.shape, dtype=torch.float32, device=dev)
        sd[f"mask.{j}"] = _like_param(shards, local, m)
        sd[f"fisher_accum.{j}"] = _like_param(shards, local, f)
        if mask.keep_pruned:
            kept = support[j].to(torch.uint8) if support is not None else torch.ones(local.shape, dtype=torch.uint8, device=dev)
            sd[f"support.{j}"] = _like_param(shards, local, kept)
    return sd


def load_fsam_state_dict(optimizer: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`fsam_state_dict` (after ``dcp.load`` filled it in).

    Checked before anything changes: the entries' shapes; the mask options (``structure``,
    ``preserve_zeros``, ``keep_pruned``) equal this optimizer's; a mask this optimizer's structure could
    have built; with ``keep_pruned``, the weights zero wherever the support says pruned (load the
    model's weights first). Sharded, every rank loads or none does (each checks its own shards).
    """
    what = "load_fsam_state_dict"
    optimizer._require_idle(what)
    layout = optimizer._current_layout()
    shards: Optional[ShardedParams] = getattr(optimizer, "_shards", None)
    if shards is None:
        bits, accum, support = _checked_state(optimizer, layout, state, what)
    else:  # every rank loads, or none: the checks read each rank's own shards
        bits, accum, support = shards.on_every_rank(lambda: _checked_state(optimizer, layout, state, what), what,
                                                    layout.device)
    mask = optimizer._mask
    mask.load(layout, bits, accum, int(state["fisher_count"]))
    if mask.keep_pruned:
        mask.load_support(layout, support)
    optimizer._loaded(int(state["step_count"]))


def _checked_state(optimizer: Any, layout: ParamLayout, state: Mapping[str, torch.Tensor], what: str) -> tuple:
    """The packed mask, accumulator and support of ``state`` for this rank, checked; raises ValueError."""
    mask = optimizer._mask
    theirs = _recorded_options(state)
    missing = [k for k in _SCALARS if k not in state]
    missing += [f"{n}.{j}" for j in range(len(layout.masked_index)) for n in ("mask", "fisher_accum") if f"{n}.{j}" not in state]
    if theirs["keep_pruned"] and mask.keep_pruned:
        missing += [f"support.{j}" for j in range(len(layout.masked_index)) if f"support.{j}" not in state]
    if missing:
        raise ValueError(f"{what}: state has no entries {missing}; expected fsam_state_dict()'s keys")
    dtensor = _dtensor_type()

    def local(v: torch.Tensor, i: int, name: str) -> torch.Tensor:
        v = v.to_local() if dtensor is not None and isinstance(v, dtensor) else v
        if v.shape != layout.params[i].shape:
            raise ValueError(
                f"{what}: {name} has local shape {tuple(v.shape)}, its parameter's shard "
                f"{tuple(layout.params[i].shape)}"
            )
        return v.to(layout.device)

    bits = None
    if int(state["has_mask"]):
        masks = [local(state[f"mask.{j}"], i, f"mask.{j}").ne(0) for j, i in enumerate(layout.masked_index)]
        bits = ref.pack_mask(layout, masks)
    accum = None
    if int(state["has_fisher"]):
        accum = [
            local(state[f"fisher_accum.{j}"], i, f"fisher_accum.{j}").to(torch.float32).clone()
            for j, i in enumerate(layout.masked_index)
        ]
    # The checks of optimizer.load_state_dict, on the same (packed) data.
    entry: dict[str, Any] = {"mask": bits, "structure": theirs["structure"], "preserve_zeros": theirs["preserve_zeros"]}
    if theirs["keep_pruned"]:
        entry["support"] = None
        if mask.keep_pruned:
            entry["support"] = ref.pack_mask(layout, [
                local(state[f"support.{j}"], i, f"support.{j}").ne(0) for j, i in enumerate(layout.masked_index)])
    check_mask_options(optimizer, entry, what)
    check_support(optimizer, entry, what)
    return bits, accum, entry.get("support")


def _recorded_options(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The mask options a state records, as ``checkpoint.mask_options`` writes them (plus ``keep_pruned``).
    They are recorded since structure/preserve_zeros/keep_pruned work under FSDP2: a state without them
    was written when they could only be off."""
    structure = [int(x) for x in state["structure"].tolist()] if "structure" in state else [0, 0]
    return {
        "structure": None if structure == [0, 0] else "%d:%d" % tuple(structure),
        "preserve_zeros": bool(int(state["preserve_zeros"])) if "preserve_zeros" in state else False,
        "keep_pruned": bool(int(state["keep_pruned"])) if "keep_pruned" in state else False,
    }


def _like_param(shards: Optional[ShardedParams], local: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if shards is None:
        return value
    p = shards.param_of(local)
    return _dtensor_type().from_local(
        value, device_mesh=p.device_mesh, placements=p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )
