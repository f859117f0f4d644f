"""2:4 (N:M) sparse models end to end: prune, fine-tune while staying sparse, export.

* :func:`prune_nm` zeroes all but the ``N`` highest-scoring weights of every ``M`` consecutive ones along
  the last dimension (magnitude, Fisher saliency ``w^2 * F`` or your own scores), with the N:M op of
  the active backend (bit for bit :func:`fsam_kernels.reference.select_nm_mask_reference`).
* ``FSAM(..., structure="2:4", keep_pruned=True)`` keeps the zeros zero through the base optimizer's
  update (see :class:`fsam_kernels.FSAM`).
* :func:`to_semi_structured` swaps each eligible ``nn.Linear`` weight for PyTorch's semi-structured
  sparse tensor (sparse tensor cores) and says per layer why not where it cannot.

Models pruned with ``torch.nn.utils.prune`` or ``torch.ao.pruning`` keep a dense ``weight_orig`` (or
``parametrizations.weight.original``) times a mask: make the pruning permanent
(``torch.nn.utils.prune.remove(module, "weight")``, ``sparsifier.squash_mask()``) before building FSAM,
so the zeros are in the weights FSAM sees (docs/sam-family.md says what holds otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch.nn.utils import parametrize

from . import reference as ref
from .backends import get_backend
from .fsdp import _dtensor_type
from .layout import ParamLayout
from .reference import nm_eligible
from .structured import parse_structure, semi_structured_unsupported_reason

__all__ = ["PruneResult", "prune_nm", "ExportReport", "to_semi_structured", "support_bits", "keep_support_"]

SCORE_KINDS = ("magnitude", "fisher")


@dataclass
class PruneResult:
    """What :func:`prune_nm` did: per pruned tensor the fraction of its elements still non-zero
    (``N / M`` unless some kept weights were zero already), and per tensor left alone, why."""

    structure: str
    scores: str
    backend: str
    kept: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"prune_nm {self.structure} by {self.scores} ({self.backend} backend): "
                 f"{len(self.kept)} tensors pruned, {len(self.skipped)} left alone"]
        lines += [f"  {name}: kept {frac:.4f}" for name, frac in self.kept.items()]
        lines += [f"  {name}: not pruned, {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _linear_weights(model: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """The weights of the model's ``nn.Linear`` modules (what sparse tensor cores multiply), and the
    Linear modules whose weight is not a plain parameter (with why)."""
    out, skipped = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        key = f"{name}.weight" if name else "weight"
        if parametrize.is_parametrized(module, "weight"):
            skipped[key] = ("parametrized (e.g. torch.ao.pruning); make it permanent first "
                            "(sparsifier.squash_mask() or torch.nn.utils.parametrize.remove_parametrizations)")
        elif "weight_orig" in module._parameters:
            skipped[key] = ("pruned through torch.nn.utils.prune (weight_orig * weight_mask); make it permanent "
                            "first: torch.nn.utils.prune.remove(module, 'weight')")
        elif isinstance(module._parameters.get("weight"), torch.Tensor):
            out.append((key, module._parameters["weight"]))
    return out, skipped


def _fully_sharded(model: torch.nn.Module) -> Optional[str]:
    """The name of a module of ``model`` that FSDP2's ``fully_shard`` wrapped, if any: between a forward
    and its reshard its parameters are plain unsharded tensors, and what is written into them is lost."""
    for name, module in model.named_modules():
        if any(cls.__name__ == "FSDPModule" for cls in type(module).__mro__):
            return name or "the model"
    return None


def _candidates(params_or_model: Any) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    if isinstance(params_or_model, torch.nn.Module):
        sharded = _fully_sharded(params_or_model)
        if sharded is not None:
            raise ValueError(f"prune_nm: {sharded} is sharded by FSDP2 (fully_shard); prune the model before "
                             "sharding it")
        return _linear_weights(params_or_model)
    if isinstance(params_or_model, torch.Tensor):
        raise TypeError("prune_nm: expected a model or an iterable of tensors, got one tensor; pass [tensor]")
    if isinstance(params_or_model, Mapping):
        items = list(params_or_model.items())
    else:
        items = []
        for i, x in enumerate(params_or_model):
            items.append(x if isinstance(x, tuple) and len(x) == 2 else (f"params[{i}]", x))
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"prune_nm: {name} is a {type(t).__name__}; expected a tensor")
    return [(str(n), t) for n, t in items], {}


def _fisher_lookup(fisher: Any) -> Mapping[torch.Tensor, torch.Tensor]:
    from .optimizer import FSAM  # late: the optimizer imports much more than pruning needs

    if isinstance(fisher, FSAM):
        accum = fisher._mask.fisher
        if accum is None:
            raise ValueError("prune_nm: the FSAM optimizer given as fisher holds no accumulated Fisher; call "
                             "accumulate_fisher() after backward passes (a mask build uses and frees it)")
        return dict(zip(fisher._current_layout().masked_params, accum))
    if isinstance(fisher, Mapping):
        return fisher
    raise TypeError(f"prune_nm: scores='fisher' needs fisher=an FSAM optimizer (its accumulator) or a dict "
                    f"parameter -> Fisher tensor (e.g. empirical_fisher(...)), got {type(fisher).__name__}")


def _checked_score(what: str, s: Any, w: torch.Tensor) -> torch.Tensor:
    if not isinstance(s, torch.Tensor) or s.shape != w.shape:
        raise ValueError(f"prune_nm: {what} must be a tensor of shape {tuple(w.shape)}, got {getattr(s, 'shape', type(s))}")
    if not s.is_floating_point() or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"prune_nm: {what} must hold finite, non-negative floating-point values")
    # + 0.0 turns -0.0 into +0.0: keys compare as int32 bit patterns.
    return s.detach().to(device=w.device, dtype=torch.float32).contiguous() + 0.0


def _scores(kind: Any, fisher: Any, named: list[tuple[str, torch.Tensor]],
            all_named: list[tuple[str, torch.Tensor]]) -> tuple[str, list[torch.Tensor]]:
    if isinstance(kind, str):
        if kind not in SCORE_KINDS:
            raise ValueError(f"Invalid scores: {kind!r}; expected 'magnitude', 'fisher' or tensors (a dict "
                             "parameter or name -> tensor, or a list following the tensors given)")
        if kind == "magnitude":
            for name, w in named:
                if not bool(torch.isfinite(w).all()):
                    raise ValueError(f"prune_nm: {name} holds NaN or inf; its magnitudes cannot be ranked")
            return kind, [w.detach().abs().float().contiguous() + 0.0 for _, w in named]
        if fisher is None:
            raise ValueError("prune_nm: scores='fisher' needs fisher=an FSAM optimizer or a dict parameter -> Fisher")
        lookup = _fisher_lookup(fisher)
        out = []
        for name, w in named:
            if w not in lookup:
                raise ValueError(f"prune_nm: fisher has no entry for {name} (shape {tuple(w.shape)})")
            f = _checked_score(f"fisher[{name}]", lookup[w], w)
            w32 = w.detach().float()
            saliency = (w32 * w32) * f  # w^2 * F, two fp32 roundings
            if not bool(torch.isfinite(saliency).all()):
                raise ValueError(f"prune_nm: the saliency w^2 * F of {name} overflows fp32")
            out.append(saliency)
        return "fisher", out
    if fisher is not None:
        raise ValueError("prune_nm: fisher= is used with scores='fisher' only")
    if isinstance(kind, Mapping):
        values = []
        for name, w in named:
            s = kind.get(w, kind.get(name))
            if s is None:
                raise ValueError(f"prune_nm: scores has no entry for {name} (keys: parameters or names)")
            values.append(s)
    elif isinstance(kind, Sequence):
        if len(kind) != len(all_named):
            raise ValueError(f"prune_nm: expected scores to hold {len(all_named)} tensors (one per tensor given), "
                             f"got {len(kind)}")
        pos = {id(t): i for i, (_, t) in enumerate(all_named)}
        values = [kind[pos[id(w)]] for _, w in named]
    else:
        raise TypeError(f"Invalid scores: {type(kind).__name__}; expected 'magnitude', 'fisher' or tensors")
    return "given", [_checked_score(f"scores[{name}]", s, w) for (name, w), s in zip(named, values)]


@torch.no_grad()
def prune_nm(
    params_or_model: Union[torch.nn.Module, Iterable[torch.Tensor], Mapping[str, torch.Tensor]],
    structure: str = "2:4",
    scores: Any = "magnitude",
    *,
    fisher: Any = None,
    backend: str = "auto",
) -> PruneResult:
    """Zero all but the ``N`` highest-scoring weights of every ``M`` consecutive ones along the last
    dimension of each eligible tensor, in place.

    Args:
        params_or_model: a model (the weights of its ``nn.Linear`` modules are pruned), or tensors (an
            iterable, ``(name, tensor)`` pairs such as ``model.named_parameters()``, or a dict name ->
            tensor). Eligible: >= 2 dimensions and a last dimension divisible by ``M``; the others are
            left untouched and listed in the result's ``skipped``.
        structure: ``"N:M"``, e.g. ``"2:4"`` (sparse tensor cores).
        scores: ``"magnitude"`` (``|w|``), ``"fisher"`` (the saliency ``w^2 * F``, fp32, with ``F`` from
            ``fisher``), or your own non-negative scores: a dict parameter (or name) -> tensor, or a
            list following the tensors given.
        fisher: with ``scores="fisher"``: an :class:`~fsam_kernels.FSAM` optimizer (its accumulator, filled
            by ``accumulate_fisher()``) or a dict parameter -> Fisher (e.g. :func:`empirical_fisher`).
        backend: the N:M op's backend (``"auto"``, ``"torch"``, ``"native"``, ``"triton"``).

    Scores compare as fp32 (ties, including equal fp32 roundings of fp64 weights, go to the lower
    index in the group, as in every FSAM mask); pruned weights are set to +0.0. Every score is checked
    before any weight changes. Returns a :class:`PruneResult`.
    """
    nm = parse_structure(structure)
    if nm is None:
        raise ValueError("prune_nm: expected a structure 'N:M' such as '2:4', got None")
    n, m = nm
    all_named, skipped = _candidates(params_or_model)
    dtensor = _dtensor_type()
    named = []
    for name, t in all_named:
        if dtensor is not None and isinstance(t, dtensor):
            raise ValueError(f"prune_nm: {name} is a DTensor (sharded, e.g. by fully_shard); prune the model "
                             "before sharding it")
        if not t.is_floating_point():
            skipped[name] = f"{t.dtype} is not a floating-point dtype"
        elif not nm_eligible(t.shape, m):
            skipped[name] = (f"shape {tuple(t.shape)}: " + ("fewer than 2 dimensions" if t.dim() < 2 else
                             f"last dimension {t.shape[-1]} not divisible by {m}"))
        else:
            named.append((name, t))
    seen: dict[int, str] = {}
    for name, t in named:
        if t.data_ptr() in seen and t.numel():
            raise ValueError(f"prune_nm: {name} and {seen[t.data_ptr()]} share memory; pass each tensor once")
        seen[t.data_ptr()] = name
    kind, score_list = _scores(scores, fisher, named, all_named)
    result = PruneResult(structure=f"{n}:{m}", scores=kind, backend="")
    masks: list[torch.Tensor] = [None] * len(named)  # type: ignore[list-item]
    names = set()
    for device in {t.device for _, t in named}:
        idx = [i for i, (_, t) in enumerate(named) if t.device == device]
        tensors = [named[i][1].detach() for i in idx]
        layout = ParamLayout(tensors, [True] * len(idx), [0.0] * len(idx), [False] * len(idx))
        op = get_backend(backend, device)
        names.add(op.name)
        bits = op.select_nm_mask(layout, [score_list[i] for i in idx], n, m, False, None)
        for i, mask in zip(idx, ref.unpack_mask(layout, bits)):
            masks[i] = mask
    result.backend = ", ".join(sorted(names)) or "none"
    for (name, w), mask in zip(named, masks):  # every mask built: now the weights change
        w.masked_fill_(~mask, 0)
        result.kept[name] = int(torch.count_nonzero(w)) / max(w.numel(), 1)
    result.skipped = skipped
    return result


# --------------------------------------------------------------------------- export
@dataclass
class ExportReport:
    """What :func:`to_semi_structured` did: the Linear weights now semi-structured, and per Linear left
    dense, why."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"to_semi_structured: {len(self.converted)} Linear weights semi-structured, {len(self.skipped)} dense"]
        lines += [f"  {name}: semi-structured" for name in self.converted]
        lines += [f"  {name}: dense, {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


@torch.no_grad()
def to_semi_structured(model: torch.nn.Module) -> ExportReport:
    """Replace each eligible ``nn.Linear`` weight of ``model`` (in place) by
    ``torch.sparse.to_sparse_semi_structured(weight)`` — 2:4 sparse, CUDA compute capability 8.0+,
    float16/bfloat16, shapes PyTorch's kernels take — for inference on sparse tensor cores. Every other
    Linear stays dense and the report says why (not 2:4 sparse, CPU tensor, dtype, torch version, the
    kernels refused the shape). The outputs match the dense 2:4 model's within the dtype's tolerance."""
    report = ExportReport()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        key = f"{name}.weight" if name else "weight"
        w = module._parameters.get("weight")
        if parametrize.is_parametrized(module, "weight") or "weight_orig" in module._parameters:
            report.skipped[key] = "parametrized (pruning not made permanent)"
            continue
        if not isinstance(w, torch.Tensor):
            report.skipped[key] = "no weight parameter"
            continue
        if type(w.data) is not torch.Tensor:
            report.skipped[key] = f"already a {type(w.data).__name__}"
            continue
        reason = None
        if not nm_eligible(w.shape, 4):
            reason = f"shape {tuple(w.shape)}: last dimension not divisible by 4"
        elif bool(((w.detach().reshape(-1, 4) != 0).sum(dim=1) > 2).any()):
            reason = "not 2:4 sparse (a group of 4 holds more than 2 non-zeros); prune it first (prune_nm)"
        else:
            reason = semi_structured_unsupported_reason(w, 2, 4)
        if reason is None:
            try:
                sparse = torch.sparse.to_sparse_semi_structured(w.detach())
            except (RuntimeError, ValueError, NotImplementedError) as exc:  # the prototype's shape limits
                reason = f"to_sparse_semi_structured failed: {exc}"
            else:
                module.weight = torch.nn.Parameter(sparse, requires_grad=False)
                report.converted.append(key)
                continue
        report.skipped[key] = reason
    return report


# --------------------------------------------------------------------------- keep_pruned
def covered(p: torch.Tensor) -> bool:
    """Whether ``FSAM(keep_pruned=True)`` keeps the zeros of a masked tensor zero: weights (>= 2
    dimensions), not biases and norms (1-D, often zero-initialised)."""
    return p.dim() >= 2


def support_bits(layout: ParamLayout) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The packed support of the masked weights (bit set where the weight is non-zero; in the mask's
    layout, 1 bit per element; uncovered tensors' bits all set) and the positions (in masked order) of
    the covered tensors that hold a zero: the only ones :func:`keep_support_` writes."""
    masked = layout.masked_params
    alive = [p.detach().reshape(-1) != 0 if covered(p) else torch.ones(p.numel(), dtype=torch.bool, device=p.device)
             for p in masked]
    bits = ref.pack_mask(layout, alive)
    counts = torch.stack([a.sum() for a in alive]).tolist() if alive else []  # one host sync
    return bits, tuple(j for j, (c, p) in enumerate(zip(counts, masked)) if c < p.numel())


def pruned_positions(layout: ParamLayout, bits: torch.Tensor) -> tuple[int, ...]:
    """:func:`support_bits`'s positions, from a packed support (e.g. a checkpoint's)."""
    return tuple(j for j, p in enumerate(layout.masked_params)
                 if covered(p) and not bool(ref.mask_of(layout, bits, j).all()))


@torch.no_grad()
def keep_support_(layout: ParamLayout, bits: torch.Tensor, positions: Sequence[int]) -> None:
    """Set the weights outside the support to +0.0: the packed bits unpacked once (one kernel, a bool
    per bit, freed on return), then one ``masked_fill_`` per tensor holding a pruned weight."""
    if not positions:
        return
    pruned = (bits.unsqueeze(1) & ref._BIT_WEIGHTS.to(bits.device)).eq(0).reshape(-1)
    for j in positions:
        p = layout.params[layout.masked_index[j]]
        start = layout.bit_offset[j]
        p.masked_fill_(pruned[start:start + p.numel()].view(p.shape), 0)
