"""Training-loop helpers: keep normalization layers' running statistics out of FSAM's second pass.

The second forward pass runs at the perturbed weights ``w + e``; its batch statistics describe a
model that is never kept, so they must not leak into BatchNorm's running mean and variance (nor
count in ``num_batches_tracked``). Normalization still uses the batch statistics in that pass, as in
any training-mode forward.

    loss_fn(model(x), y).backward()           # first pass: running stats update as usual
    opt.first_step(zero_grad=True)
    with frozen_running_stats(model):         # second pass: they do not
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)

Toggling a module attribute makes a ``torch.compile``-d model compile one more graph for the second
pass (once); after that both graphs are reused. Where TorchDynamo does not guard that attribute (it
does not inline built-in modules: the default before torch 2.5) the compiled graph keeps updating the
statistics, so :func:`frozen_running_stats` then also puts the running buffers back on exit.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["disable_running_stats", "enable_running_stats", "frozen_running_stats"]

_SAVED_ATTR = "_fsam_saved_track_running_stats"


def _norm_layers(model: torch.nn.Module) -> Iterator[_NormBase]:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    # BatchNorm*d, SyncBatchNorm, InstanceNorm*d and their lazy variants.
    return (m for m in model.modules() if isinstance(m, _NormBase))


def disable_running_stats(model: torch.nn.Module) -> None:
    """Stop every normalization layer of ``model`` from updating its running statistics.

    In training mode a layer with ``track_running_stats=False`` normalizes with the batch statistics
    and leaves its running buffers untouched (bit for bit). Undo with :func:`enable_running_stats`.
    Calling it twice is harmless.
    """
    for m in _norm_layers(model):
        if not hasattr(m, _SAVED_ATTR):
            setattr(m, _SAVED_ATTR, m.track_running_stats)
        m.track_running_stats = False


def enable_running_stats(model: torch.nn.Module) -> None:
    """Undo :func:`disable_running_stats` (each layer gets its own previous setting back)."""
    for m in _norm_layers(model):
        if hasattr(m, _SAVED_ATTR):
            m.track_running_stats = getattr(m, _SAVED_ATTR)
            delattr(m, _SAVED_ATTR)


@contextmanager
def frozen_running_stats(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Context manager form: running statistics are frozen inside, restored on exit (even on error)."""
    layers = list(_norm_layers(model))
    saved = [m.track_running_stats for m in layers]
    buffers = _running_buffers(layers) if _compiled_graphs_may_ignore_the_flag() else []
    originals = [b.clone() for b in buffers]
    for m in layers:
        m.track_running_stats = False
    try:
        yield model
    finally:
        for m, value in zip(layers, saved):
            m.track_running_stats = value
        with torch.no_grad():
            for b, original in zip(buffers, originals):
                b.copy_(original)


def _compiled_graphs_may_ignore_the_flag() -> bool:
    """Whether a graph compiled by TorchDynamo may not recompile when ``track_running_stats`` changes:
    built-in modules not inlined (torch < 2.5 by default) are guarded by identity, not by attribute."""
    dynamo = sys.modules.get("torch._dynamo")  # not imported: nothing was compiled
    return dynamo is not None and not getattr(dynamo.config, "inline_inbuilt_nn_modules", False)


def _running_buffers(layers: list[_NormBase]) -> list[torch.Tensor]:
    names = ("running_mean", "running_var", "num_batches_tracked")
    return [b for m in layers for b in (getattr(m, n, None) for n in names) if isinstance(b, torch.Tensor)]
