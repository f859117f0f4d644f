"""The two-pass FSAM step with a ``torch.amp.GradScaler`` (fp16 mixed precision).

The recipe, which these helpers implement::

    with torch.autocast(device, dtype=torch.float16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    if fsam_kernels.amp.first_step(opt, scaler):     # unscale_, then perturb; False on an overflow
        with torch.autocast(device, dtype=torch.float16):
            loss2 = loss_fn(model(x), y)
        scaler.scale(loss2).backward()
    fsam_kernels.amp.second_step(opt, scaler)        # restore, scaler.step(base), scaler.update()

Why it is correct:

* ``scaler.unscale_(opt)`` before :meth:`FSAM.first_step`: the perturbation
  ``rho * g / ||g||`` is invariant to the loss scale, but the batch Fisher mask compares ``g*g``
  across steps only through unscaled values, and an overflow must be seen before anything moves.
* An inf/NaN in the first pass leaves FSAM untouched (non-finite norm: no mask update, no
  perturbation); ``second_step`` then drops the gradients and only lets the scaler back off.
* The second pass is unscaled and checked by ``scaler.step(opt.base_optimizer)``. GradScaler keeps
  its bookkeeping per optimizer object, so unscaling ``opt`` once and ``opt.base_optimizer`` once is
  exactly one unscale per pass, and ``scaler.update()`` sees the overflow flags of both passes.
* The weights are restored *before* the scaler decides whether to step, so a skipped step leaves
  them bit for bit as they were.
* Gradient clipping, torch's recipe: after the second backward, ``scaler.unscale_(opt)`` (or
  ``scaler.unscale_(opt.base_optimizer)``, the optimizer the scaler steps), clip, then :func:`second_step`, which then does not unscale again
  (as ``GradScaler.step`` does). If ``second_step`` fails, the weights are restored before it raises.

These helpers check their arguments and call the optimizer's own ``first_step(scaler=...)``,
``second_step(scaler=...)`` and ``step(closure, scaler=...)``; GSAM's surrogate-gap step works on the
unscaled second gradient. bf16 autocast needs no scaler: use the plain ``first_step``/``second_step``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .optimizer import FSAM
from .protocol import Phase

__all__ = ["first_step", "second_step", "step"]


def _check(optimizer: Any, scaler: Any) -> None:
    if not isinstance(optimizer, FSAM):
        raise TypeError(f"Invalid optimizer: expected an fsam_kernels.FSAM, got {type(optimizer).__name__}")
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"Invalid scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")


def first_step(optimizer: FSAM, scaler: torch.amp.GradScaler, zero_grad: bool = True) -> bool:
    """Unscale the first-pass gradients and move the weights to ``w + e``:
    ``optimizer.first_step(zero_grad, scaler=scaler)``.

    Returns ``True`` when the weights were perturbed (run the second pass), ``False`` when the
    gradients overflowed: nothing changed, the second pass can be skipped, and :func:`second_step`
    must still be called to let the scaler back off. ``zero_grad`` clears the gradients either way,
    ready for the second backward.
    """
    _check(optimizer, scaler)
    optimizer.first_step(zero_grad=zero_grad, scaler=scaler)
    return optimizer.phase is Phase.PERTURBED


def second_step(optimizer: FSAM, scaler: torch.amp.GradScaler, zero_grad: bool = False) -> bool:
    """Restore the weights, step the base optimizer through the scaler, update the scale:
    ``optimizer.second_step(zero_grad, scaler=scaler)``.

    Returns ``True`` when the base optimizer stepped, ``False`` when either pass overflowed (the
    weights are then exactly as before :func:`first_step`).
    """
    _check(optimizer, scaler)
    if optimizer.phase is Phase.IDLE:
        raise RuntimeError("amp.second_step called without amp.first_step")
    return optimizer.second_step(zero_grad, scaler=scaler)


def step(optimizer: FSAM, scaler: torch.amp.GradScaler, closure: Callable[[], Any]) -> Optional[Any]:
    """One scaled FSAM step with ``closure``, which runs the forward under autocast and calls
    ``scaler.scale(loss).backward()`` (and may zero the gradients first):
    ``optimizer.step(closure, scaler=scaler)``.

    As :meth:`FSAM.step`: after the caller's own first backward, the closure does the second pass and
    its loss is returned; when no perturbed parameter has a gradient yet (the ``torch.optim``
    convention), the closure does the first pass too, that first loss is returned, and this way
    sticks. After a first-pass overflow the second pass is skipped and ``None`` is returned. If the
    closure raises (or computes no gradient at ``w + e``), the weights, mask, step count and Fisher
    accumulator are as before the call, the gradients are cleared and the scaler is ready for the next
    step.
    """
    if not callable(closure):
        raise TypeError(f"Invalid closure: expected a callable, got {type(closure).__name__}")
    _check(optimizer, scaler)
    return optimizer.step(closure, scaler=scaler)
