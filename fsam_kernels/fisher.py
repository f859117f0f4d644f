"""Empirical Fisher information from per-sample gradients (the paper's Eq. 9)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch.utils._pytree import tree_map

__all__ = ["empirical_fisher"]


def _add_batch_dim(x: Any) -> Any:
    return tree_map(lambda t: t.unsqueeze(0) if isinstance(t, torch.Tensor) else t, x)


def _call(model: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _batch_size(inputs: Any) -> int:
    leaves = []
    tree_map(lambda t: leaves.append(t) if isinstance(t, torch.Tensor) else None, inputs)
    if not leaves:
        raise ValueError("empirical_fisher: a batch's inputs hold no tensor")
    return leaves[0].shape[0]


def _slice(x: Any, i: int) -> Any:
    return tree_map(lambda t: t[i] if isinstance(t, torch.Tensor) else t, x)


def empirical_fisher(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    batches: Iterable[tuple[Any, Any]],
    *,
    params: Optional[Iterable[torch.nn.Parameter]] = None,
    method: str = "auto",
) -> dict[torch.nn.Parameter, torch.Tensor]:
    r"""Empirical Fisher :math:`F = \frac{1}{N_F}\sum_i (\nabla_w \log p(y_i|x_i))^2`, per parameter, fp32.

    Args:
        model: the network; called as ``model(x)``, ``model(*x)`` or ``model(**x)`` when the inputs
            ``x`` are a tensor, a tuple or a dict of tensors with the batch in dimension 0.
        loss_fn: ``loss_fn(output, target) -> scalar`` for a batch of one sample; with the negative
            log-likelihood (e.g. cross-entropy) its gradient squared is the empirical Fisher term.
        batches: iterable of ``(inputs, targets)``; every sample of every batch counts once.
        params: the parameters to compute it for (default: every parameter that requires grad).
        method: ``"vmap"`` (per-sample gradients with ``torch.func``), ``"loop"`` (one backward per
            sample) or ``"auto"`` (``vmap``, falling back to ``loop`` with a warning when ``torch.func``
            cannot handle the model).

    Returns:
        A dict parameter -> fp32 tensor of its shape, ready for ``FSAM.update_mask(fisher=...)``.

    The model is called in its current mode (e.g. dropout active in train mode) and left as it was:
    every buffer (BatchNorm's running statistics, ``num_batches_tracked``) and every module's train/eval
    mode are restored, whichever method ran.
    """
    if method not in ("auto", "vmap", "loop"):
        raise ValueError(f"Invalid method: {method!r}; expected 'auto', 'vmap' or 'loop'")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is not None:
        wanted = {id(p) for p in params}
        named = {n: p for n, p in named.items() if id(p) in wanted}
    if not named:
        raise ValueError("empirical_fisher: the model has no parameter that requires grad")
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named.items()}
    with _model_state_kept(model):
        count = _accumulate(model, loss_fn, named, batches, method, sums)
    if count == 0:
        raise ValueError("empirical_fisher: batches yielded no sample")
    return {named[n]: s.div_(count) for n, s in sums.items()}


@contextlib.contextmanager
def _model_state_kept(model: torch.nn.Module) -> Iterator[None]:
    """Every buffer (BatchNorm's running statistics, ``num_batches_tracked``, ...) and every module's
    train/eval mode as on entry once the block ends, however it ends: computing a Fisher is a
    measurement, not a training step."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = []
    for m in model.modules():
        for name, b in m._buffers.items():
            if b is not None:
                buffers.append((m, name, b, b.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, name, b, value in buffers:
                m._buffers[name] = b  # in case the module replaced it
                b.copy_(value)
        for m, training in modes:
            m.training = training


def _accumulate(model, loss_fn, named, batches, method, sums) -> int:
    count = 0
    use_vmap = method in ("auto", "vmap")
    for inputs, targets in batches:
        n_samples = _batch_size(inputs)
        if use_vmap:
            try:
                _accumulate_vmap(model, loss_fn, named, inputs, targets, sums)
            except Exception as exc:
                if method == "vmap":
                    raise
                warnings.warn(
                    f"empirical_fisher: torch.func could not compute per-sample gradients ({type(exc).__name__}: "
                    f"{exc}); using a per-sample loop",
                    RuntimeWarning,
                    stacklevel=2,
                )
                use_vmap = False
        if not use_vmap:
            _accumulate_loop(model, loss_fn, named, inputs, targets, n_samples, sums)
        count += n_samples
    return count


def _accumulate_vmap(model, loss_fn, named, inputs, targets, sums) -> None:
    from torch.func import grad, vmap

    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in named}
    buffers = dict(model.named_buffers())

    def sample_loss(trainable, x, y):
        out = _functional(model, {**frozen, **trainable}, buffers, _add_batch_dim(x))
        return loss_fn(out, _add_batch_dim(y))

    detached = {n: p.detach() for n, p in named.items()}
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), randomness="different")(detached, inputs, targets)
    for n, g in per_sample.items():
        g32 = g.float()
        sums[n].add_((g32 * g32).sum(0))


def _functional(model, params_and_frozen, buffers, x):
    from torch.func import functional_call

    if isinstance(x, dict):
        return functional_call(model, (params_and_frozen, buffers), args=(), kwargs=x)
    if isinstance(x, (tuple, list)):
        return functional_call(model, (params_and_frozen, buffers), args=tuple(x))
    return functional_call(model, (params_and_frozen, buffers), args=(x,))


def _accumulate_loop(model, loss_fn, named, inputs, targets, n_samples, sums) -> None:
    names, params = list(named), list(named.values())
    for i in range(n_samples):
        with torch.enable_grad():
            loss = loss_fn(_call(model, _add_batch_dim(_slice(inputs, i))), _add_batch_dim(_slice(targets, i)))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                g32 = g.float()
                sums[n].add_(g32 * g32)
