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

bf16 autocast needs no scaler: use the plain ``first_step``/``second_step``.
"""
from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, Optional

import torch

from .optimizer import FSAM

__all__ = ["first_step", "second_step", "step"]

# Whether each optimizer's last amp.first_step perturbed the weights (False: it saw an overflow).
_perturbed: "weakref.WeakKeyDictionary[FSAM, bool]" = weakref.WeakKeyDictionary()


def _check(optimizer: Any, scaler: Any) -> None:
    if not isinstance(optimizer, FSAM):
        raise TypeError(f"Invalid optimizer: expected an fsam_kernels.FSAM, got {type(optimizer).__name__}")
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"Invalid scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")


def first_step(optimizer: FSAM, scaler: torch.amp.GradScaler, zero_grad: bool = True) -> bool:
    """Unscale the first-pass gradients and move the weights to ``w + e``.

    Returns ``True`` when the weights were perturbed (run the second pass), ``False`` when the
    gradients overflowed: nothing changed, the second pass can be skipped, and :func:`second_step`
    must still be called to let the scaler back off. ``zero_grad`` clears the gradients either way,
    ready for the second backward.
    """
    _check(optimizer, scaler)
    optimizer._check_options()  # a bad option must not leave an unscale_ recorded
    scaler.unscale_(optimizer)  # a no-op when the scaler is disabled
    with warnings.catch_warnings():
        # An overflow is routine under a loss scaler: no warning, the step is skipped below.
        warnings.filterwarnings("ignore", message="FSAM.first_step: non-finite", category=RuntimeWarning)
        norm = optimizer.first_step(zero_grad=zero_grad)
    perturbed = math.isfinite(norm.item())  # (torch.isfinite would add kernel launches)
    if not perturbed:
        optimizer.restore()  # leaves the optimizer idle; there is nothing to undo
    _perturbed[optimizer] = perturbed
    return perturbed


def second_step(optimizer: FSAM, scaler: torch.amp.GradScaler, zero_grad: bool = False) -> bool:
    """Restore the weights, step the base optimizer through the scaler, update the scale.

    Returns ``True`` when the base optimizer stepped, ``False`` when either pass overflowed (the
    weights are then exactly as before :func:`first_step`).
    """
    _check(optimizer, scaler)
    if optimizer not in _perturbed:
        raise RuntimeError("amp.second_step called without amp.first_step")
    perturbed = _perturbed.pop(optimizer)
    optimizer.restore()  # before the scaler's step, so a skipped step leaves the weights untouched
    before = scaler.get_scale()
    if perturbed:
        scaler.step(optimizer.base_optimizer)  # unscales the second-pass gradients, skips on inf/NaN
    else:
        optimizer.zero_grad()
    # Tells an LR scheduler attached to the FSAM optimizer that this step was taken (or skipped by
    # the scaler, as torch's own AMP recipe does), so it does not warn about the call order.
    optimizer._opt_called = True  # type: ignore[attr-defined]
    scaler.update()
    stepped = perturbed and (not scaler.is_enabled() or scaler.get_scale() >= before)
    if zero_grad:
        optimizer.zero_grad()
    return stepped


def step(optimizer: FSAM, scaler: torch.amp.GradScaler, closure: Callable[[], Any]) -> Optional[Any]:
    """One scaled FSAM step with ``closure``, which runs the forward under autocast and calls
    ``scaler.scale(loss).backward()`` (and may zero the gradients first).

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
    optimizer._check_options()  # before the closure runs
    closure_first = optimizer._closure_gives_first_pass()
    first_loss = None
    if closure_first:
        first_loss = optimizer._first_pass_from(closure)
        if not optimizer._has_any_grad():  # e.g. a skipped batch: no step
            return None
    state = optimizer._step_state()
    loss = None
    perturbed = first_step(optimizer, scaler, zero_grad=True)
    if perturbed:
        try:
            with torch.enable_grad():
                loss = closure()
            optimizer._require_second_gradient("amp.step")
        except BaseException:
            _perturbed.pop(optimizer, None)
            optimizer._abandon_step(state)
            # The scaler recorded an unscale_ of this optimizer; update() clears that record so the
            # next step can unscale again (the failed step is simply not taken).
            scaler.update()
            raise
    second_step(optimizer, scaler)
    if not perturbed:  # a first-pass overflow: the step was skipped
        return None
    return first_loss if closure_first else loss
