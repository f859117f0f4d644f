"""FSAM's checkpoints and copies.

* :func:`state_dict` / :func:`load_state_dict`: the base optimizer's state dict plus an ``"fsam"``
  entry (version 2: step count, packed mask, fp32 Fisher accumulator, the masked sizes and every
  parameter's shape). Version 1 checkpoints (no shapes) still load. A checkpoint that does not fit the
  parameters is refused before anything changes, naming what differs; a failure while loading puts
  everything back. The entry also records ``structure`` and ``preserve_zeros`` (absent from older
  checkpoints, whose mask is then checked against the optimizer's options instead); a plain state dict
  of the base optimizer is a warm start (:func:`warm_start_entry`).
* :func:`copy_state`: what ``copy.deepcopy``, ``pickle`` and ``torch.save(opt)`` copy.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any, Mapping

import torch

from . import reference as ref
from .layout import MASK_ALIGN_BITS, align_up, full_mask

STATE_VERSION = 2  # 2 added every parameter's shape
LOADABLE_VERSIONS = (1, 2)

# torch.optim.Optimizer drops its hooks from copies; an LR scheduler's wrapper of this instance's
# ``step`` would step the original.
_NOT_COPIED = (
    "step", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def copy_state(opt: Any) -> dict[str, Any]:
    """The attributes a copy of ``opt`` takes: all but torch's hooks, with ``opt._REBUILT_ON_USE``
    (caches derived from the rest: layouts, per-step plans) left to be rebuilt on first use."""
    name = type(opt).__name__
    if opt.phase.name == "PERTURBED":
        raise RuntimeError(f"{name}: cannot copy or pickle the optimizer while the weights are perturbed; "
                           "call second_step() or restore() first")
    if opt._mask.shards is not None:
        raise RuntimeError(f"{name}: an optimizer of FSDP2-sharded parameters cannot be copied or pickled; "
                           "checkpoint it with fsam_kernels.fsdp.fsam_state_dict and torch.distributed.checkpoint")
    state = {k: v for k, v in opt.__dict__.items() if k not in _NOT_COPIED}
    state.update(dict.fromkeys(opt._REBUILT_ON_USE))
    return state  # torch.optim.Optimizer.__setstate__ adds empty hooks


# Attributes renamed since a copy could have been pickled: old name -> new name.
_RENAMED = {"eps": "perturb_eps"}  # FSAM's norm epsilon; ``eps`` now goes to the base optimizer


def renamed_state(state: dict[str, Any]) -> dict[str, Any]:
    """A pickled copy's attributes under today's names (the options keep their values)."""
    if not any(old in state for old in _RENAMED):
        return state
    state = dict(state)
    for old, new in _RENAMED.items():
        if old in state:
            state.setdefault(new, state.pop(old))
    return state


def state_dict(opt: Any) -> dict[str, Any]:
    if opt.phase.name == "PERTURBED":
        raise RuntimeError("state_dict: the weights are perturbed; call second_step() or restore() first")
    sd = opt.base_optimizer.state_dict()
    layout = opt._current_layout()
    mask = opt._mask
    sd["fsam"] = {
        "version": STATE_VERSION,
        "step_count": opt.step_count,
        "mask": None if mask.bits is None else mask.bits.clone(),
        "fisher_accum": None if mask.fisher is None else [f.clone() for f in mask.fisher],
        "fisher_count": mask.fisher_count,
        "masked_numel": [layout.numel[i] for i in layout.masked_index],
        # Every parameter's shape (version 2), so that a checkpoint never loads into other shapes.
        "param_shapes": [[list(p.shape) for p in g["params"]] for g in opt.param_groups],
    }
    sd["fsam"].update(mask_options(opt))
    if mask.keep_pruned:  # keep_pruned: the packed support of the masked weights (1 bit per element)
        sd["fsam"]["support"] = None if mask.support is None else mask.support.clone()
    return sd


def load_state_dict(opt: Any, state_dict: dict[str, Any]) -> None:
    state_dict = dict(state_dict)
    fsam = state_dict.pop("fsam", None)
    if fsam is None:
        fsam = warm_start_entry(opt, state_dict)
        state_dict["param_groups"] = _with_fsam_options(opt, state_dict["param_groups"])
    elif fsam.get("version") not in LOADABLE_VERSIONS:
        raise ValueError(f"load_state_dict: unsupported FSAM state version {fsam.get('version')!r}; "
                         f"expected one of {LOADABLE_VERSIONS}")
    check_loadable(opt, state_dict, fsam)  # before anything changes
    check_mask_options(opt, fsam)
    check_support(opt, fsam)
    # torch's load_state_dict replaces the state and groups objects, leaving the old ones intact:
    # whatever fails from here on is undone by putting them (and FSAM's attributes) back.
    before = (dict(opt.__dict__), dict(opt._mask.__dict__), opt.base_optimizer.state, opt.base_optimizer.param_groups)
    try:
        _load_checked(opt, state_dict, fsam)
    except BaseException:
        opt.__dict__.clear()
        opt.__dict__.update(before[0])
        opt._mask.__dict__.clear()
        opt._mask.__dict__.update(before[1])
        opt.base_optimizer.state, opt.base_optimizer.param_groups = before[2], before[3]
        raise


def mask_options(opt: Any) -> dict[str, Any]:
    """How the optimizer builds its mask, recorded in its checkpoints (since 0.x, without a new version:
    a checkpoint without them was written before, and its mask is checked against these options)."""
    return {"structure": None if opt.structure is None else "%d:%d" % opt.structure,
            "preserve_zeros": bool(opt.preserve_zeros)}


def check_mask_options(opt: Any, fsam: Mapping[str, Any], what: str = "load_state_dict") -> None:
    """Refuse a checkpoint written with another ``structure`` or ``preserve_zeros`` (naming both), and a
    mask that this optimizer's options could not have built: with a structure, more than N set of some M
    consecutive elements of an N:M tensor (exactly N without ``preserve_zeros``); and, in a checkpoint
    that does not record the options, with ``preserve_zeros`` a set bit on a weight that is zero now (a
    recorded one was built on the support of its time: weights pruned since, before the next mask
    update, do not make it unloadable)."""
    ours = mask_options(opt)
    recorded = "structure" in fsam or "preserve_zeros" in fsam
    if recorded:
        theirs = {k: fsam.get(k) for k in ours}
        if theirs != ours:
            raise ValueError(f"{what}: the checkpoint was written with " + _options_text(theirs) +
                             "; this optimizer has " + _options_text(ours) + " (they choose how the mask is built; "
                             "create the optimizer with the checkpoint's options)")
    bits = fsam["mask"]
    if bits is None or (opt.structure is None and not opt.preserve_zeros):
        return
    layout = opt._current_layout()
    groups = opt.param_groups
    masked_at = [(gi, i) for gi, g in enumerate(groups) if g.get("perturb", True) and g.get("fisher_mask", True)
                 for i in range(len(g["params"]))]
    for (gi, i), p, keep in zip(masked_at, layout.masked_params, ref.unpack_mask(layout, bits.to(layout.device))):
        where = f"param_groups[{gi}]['params'][{i}]"
        if opt.preserve_zeros and not recorded and bool((keep & (p.detach() == 0)).any()):
            raise ValueError(f"{what}: the checkpoint's mask perturbs weights of {where} that are zero, "
                             f"which preserve_zeros=True never does (written without it?)")
        if opt.structure is None or not ref.nm_eligible(p.shape, opt.structure[1]):
            continue
        n, m = opt.structure
        per_group = keep.reshape(-1, m).sum(dim=1)
        wrong = (per_group > n) if opt.preserve_zeros else (per_group != n)
        if bool(wrong.any()):
            raise ValueError(f"{what}: the checkpoint's mask of {where} is not {n}:{m}: {int(wrong.sum())} "
                             f"groups of {m} have {'more than' if opt.preserve_zeros else 'other than'} {n} elements "
                             "set (written without this structure?)")


def _options_text(options: Mapping[str, Any]) -> str:
    return f"structure={options['structure']!r}, preserve_zeros={options['preserve_zeros']!r}"


WARM_START = 0  # the "version" of a plain base optimizer state dict (no "fsam" entry)


def warm_start_entry(opt: Any, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``"fsam"`` entry that a plain state dict of the base optimizer stands for: FSAM's state afresh
    (step count 0, no mask, no Fisher accumulator), checked like a version 1 checkpoint."""
    if not isinstance(state_dict.get("param_groups"), list) or not isinstance(state_dict.get("state"), Mapping):
        raise ValueError("load_state_dict: expected an FSAM state dict, or a torch.optim state dict (with "
                         "'state' and 'param_groups') of the base optimizer to warm-start from; got one with keys "
                         f"{sorted(map(str, state_dict))}")
    layout = opt._current_layout()
    return {"version": WARM_START, "step_count": 0, "mask": None, "fisher_accum": None, "fisher_count": 0,
            "masked_numel": [layout.numel[i] for i in layout.masked_index]}


def _with_fsam_options(opt: Any, saved_groups: list) -> list:
    """The saved groups, each completed with the FSAM options (rho, ...) of this optimizer's group that
    it lacks (a base optimizer's state dict knows none of them; torch takes a loaded group's options)."""
    return [{**{k: v for k, v in g.items() if k != "params"}, **sg} if isinstance(sg, Mapping) else sg
            for sg, g in zip(saved_groups, opt.param_groups)] + saved_groups[len(opt.param_groups):]


def _load_checked(opt: Any, state_dict: dict[str, Any], fsam: dict[str, Any]) -> None:
    opt.base_optimizer.load_state_dict(state_dict)  # opt.param_groups and opt.state follow (properties)
    layout = opt._current_layout()
    # Masks and accumulators keep their own dtypes (uint8 / fp32), never the parameters'.
    bits = fsam["mask"]
    bits = None if bits is None else bits.to(device=layout.device, dtype=torch.uint8).clone()
    acc = fsam["fisher_accum"]
    acc = None if acc is None else [
        a.to(device=p.device, dtype=torch.float32).clone() for a, p in zip(acc, layout.masked_params)
    ]
    opt._mask.load(layout, bits, acc, fsam["fisher_count"])
    if opt._mask.keep_pruned:
        opt._mask.load_support(layout, fsam["support"].to(device=layout.device).clone())
    opt._loaded(fsam["step_count"])


def check_loadable(opt: Any, state_dict: dict[str, Any], fsam: dict[str, Any]) -> None:
    """Raise ValueError, naming what differs, if the checkpoint does not fit ``opt``'s parameters.

    Version 2 checkpoints carry every parameter's shape. Version 1 ones carry the masked sizes
    only; their base optimizer state is checked instead: a state tensor with as many elements as
    its parameter but another shape (e.g. Adam's ``exp_avg`` of an (8, 2) weight for a (2, 8) one)
    was made for another parameter. Dtypes may differ: the base optimizer casts its state to the
    parameters' dtypes (as torch does) and FSAM's mask and Fisher keep their own.
    """
    saved_groups, groups = state_dict.get("param_groups", []), opt.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"load_state_dict: the checkpoint has {len(saved_groups)} param groups, this optimizer {len(groups)}")
    for gi, (sg, g) in enumerate(zip(saved_groups, groups)):
        if len(sg["params"]) != len(g["params"]):
            raise ValueError(f"load_state_dict: param_groups[{gi}] holds {len(g['params'])} parameters, the "
                             f"checkpoint's {len(sg['params'])}")

    def where(gi: int, i: int) -> str:
        names = groups[gi].get("param_names")
        return f"param_groups[{gi}]['params'][{i}]" + (f" ({names[i]})" if names else "")

    if fsam["version"] >= 2:
        shapes = fsam.get("param_shapes")
        if not isinstance(shapes, list) or [len(s) for s in shapes] != [len(g["params"]) for g in groups]:
            raise ValueError("load_state_dict: the checkpoint's 'param_shapes' do not follow its param groups")
        for gi, (g, group_shapes) in enumerate(zip(groups, shapes)):
            for i, (p, shape) in enumerate(zip(g["params"], group_shapes)):
                if tuple(shape) != tuple(p.shape):
                    raise ValueError(f"load_state_dict: {where(gi, i)} has shape {tuple(p.shape)}, the "
                                     f"checkpoint's {tuple(shape)}")
    else:  # only version 2 says which shapes its state was made for (some optimizers keep flat state)
        positions = [(gi, i) for gi, g in enumerate(groups) for i in range(len(g["params"]))]
        saved_ids = dict(zip((k for sg in saved_groups for k in sg["params"]), positions))
        for key, entry in state_dict.get("state", {}).items():
            if key not in saved_ids or not isinstance(entry, Mapping):
                continue
            gi, i = saved_ids[key]
            p = groups[gi]["params"][i]
            for name, value in entry.items():
                if (isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() == p.numel()
                        and value.shape != p.shape):
                    raise ValueError(f"load_state_dict: the checkpoint's state {name!r} of {where(gi, i)} has "
                                     f"shape {tuple(value.shape)}, the parameter {tuple(p.shape)}")

    masked_at = [
        (gi, i) for gi, (sg, g) in enumerate(zip(saved_groups, groups))
        if sg.get("perturb", True) and sg.get("fisher_mask", True) for i in range(len(g["params"]))
    ]
    if not any(sg.get("perturb", True) and g["params"] for sg, g in zip(saved_groups, groups)):
        raise ValueError("load_state_dict: the checkpoint's param groups perturb no parameter (perturb=False everywhere)")
    masked = [groups[gi]["params"][i] for gi, i in masked_at]
    if opt._mask.shards is not None:
        masked = opt._mask.shards.local_tensors(masked)
    numels = [p.numel() for p in masked]
    if list(fsam["masked_numel"]) != numels:
        raise ValueError("load_state_dict: the masked parameters' sizes differ from the checkpoint's "
                         f"({numels} here, {list(fsam['masked_numel'])} there)")
    for name in ("step_count", "fisher_count"):
        if isinstance(fsam[name], bool) or not isinstance(fsam[name], int) or fsam[name] < 0:
            raise ValueError(f"load_state_dict: the checkpoint's {name} is {fsam[name]!r}; expected an int >= 0")
    bits = fsam["mask"]
    if bits is not None:
        valid = full_mask(numels)
        if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.shape != valid.shape:
            got = f"{bits.dtype} of shape {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits).__name__
            raise ValueError(f"load_state_dict: the checkpoint's mask is {got}; expected the packed uint8 mask of "
                             f"{valid.numel()} bytes")
        stray = (bits.cpu() & ~valid).nonzero()
        if stray.numel():
            ends = list(itertools.accumulate(align_up(n, MASK_ALIGN_BITS) // 8 for n in numels))
            j = bisect.bisect_right(ends, int(stray[0]))  # the masked tensor owning that byte
            raise ValueError(f"load_state_dict: the checkpoint's mask sets padding bits past the {numels[j]} "
                             f"elements of masked tensor {j} ({where(*masked_at[j])}); it is corrupt")
    acc = fsam["fisher_accum"]
    if acc is not None:
        if len(acc) != len(masked):
            raise ValueError(f"load_state_dict: the checkpoint's Fisher accumulator holds {len(acc)} tensors, "
                             f"expected {len(masked)} (one per masked parameter)")
        for j, (a, p) in enumerate(zip(acc, masked)):
            if not isinstance(a, torch.Tensor) or not a.is_floating_point() or a.shape != p.shape:
                got = f"{a.dtype} of shape {tuple(a.shape)}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise ValueError(f"load_state_dict: the checkpoint's Fisher accumulator for {where(*masked_at[j])} "
                                 f"is {got}; expected floating point of shape {tuple(p.shape)}")


def check_support(opt: Any, fsam: Mapping[str, Any], what: str = "load_state_dict") -> None:
    """``keep_pruned``: the checkpoint and the optimizer must agree on it, and the weights must be zero
    wherever the checkpoint's support says pruned (load the model's weights first)."""
    support = fsam.get("support")
    keep = opt._mask.keep_pruned
    if keep and support is None:
        raise ValueError(f"{what}: the checkpoint holds no support of pruned weights (it was saved without "
                         "keep_pruned=True, or before any parameter was known); load it into an optimizer with "
                         "keep_pruned=False, or start this one from the pruned model without it")
    if not keep and "support" in fsam:
        raise ValueError(f"{what}: the checkpoint keeps pruned weights at zero (keep_pruned=True); construct "
                         "the optimizer with keep_pruned=True to resume it")
    if not keep:
        return
    layout = opt._current_layout()
    valid = layout.full_mask()
    if not isinstance(support, torch.Tensor) or support.dtype != torch.uint8 or support.shape != valid.shape:
        got = f"{support.dtype} of shape {tuple(support.shape)}" if isinstance(support, torch.Tensor) else type(support).__name__
        raise ValueError(f"{what}: the checkpoint's support is {got}; expected the packed uint8 support of "
                         f"{valid.numel()} bytes")
    support = support.to(valid.device)
    if bool((support & ~valid).any()):
        raise ValueError(f"{what}: the checkpoint's support sets padding bits; it is corrupt")
    from . import reference as ref
    from .sparsity import covered

    for j, p in enumerate(layout.masked_params):
        if not covered(p):
            continue
        alive = ref.mask_of(layout, support, j).view(p.shape)
        stray = int(((p.detach() != 0) & ~alive).sum())
        if stray:
            raise ValueError(f"{what}: the checkpoint's support prunes {stray} weights of masked parameter {j} "
                             f"(shape {tuple(p.shape)}) that are non-zero here; load the pruned model's weights "
                             "before the optimizer's state")
