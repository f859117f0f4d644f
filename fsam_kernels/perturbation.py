"""A pending perturbation: the weights moved to ``w + e`` by ``first_step``, and what undoes it bit for bit.

All or nothing: :meth:`Perturbation.prepare` checks and allocates everything (the backend's
``prepare_perturb``) without writing a weight; the optimizer records it as pending, and only then
:meth:`Perturbation.write` moves the weights. Whatever stops the write (an interrupt, an allocation, a
kernel launch) leaves a pending perturbation whose undo puts back exactly what was written over. A
SIGINT (Ctrl-C), SIGTERM or other stop signal that arrives during the write is handled once it is done
(:func:`interrupts_held`): a backend's one kernel call writes the weights and the saved originals
together, and it must be known afterwards whether it ran.

A parameter's memory is perturbed by one optimizer at a time: the live optimizers with a pending
perturbation are registered here (weakly), and :func:`check_unclaimed` refuses memory another one has
perturbed and not restored (its restore would write back the weights with both perturbations).
"""
from __future__ import annotations

import bisect
import contextlib
import signal
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from . import param_groups, storage
from .backends.base import Backend
from .layout import ParamLayout, storage_signature


@dataclass
class Perturbation:
    layout: ParamLayout  # the layout perturbed with (its rho may be a variant's)
    bits: Optional[torch.Tensor]
    aux: Any
    backend: Backend  # the backend that perturbed, and saved the originals in its own format
    saved: Any
    signature: tuple  # layout.storage_signature of the perturbed tensors at first_step

    @classmethod
    def prepare(cls, backend: Backend, plan: tuple, grads: Sequence[Optional[torch.Tensor]], norm: torch.Tensor,
                eps: float, signature: tuple) -> "Perturbation":
        """The perturbation of the weights along ``grads`` with ``plan`` = (layout, packed mask, aux),
        allocated and not yet written (:meth:`write`); :meth:`undo` applies at any point."""
        layout, bits, aux = plan
        return cls(layout, bits, aux, backend, backend.prepare_perturb(layout, grads, bits, aux, norm, eps), signature)

    @classmethod
    def apply(cls, backend: Backend, plan: tuple, grads: Sequence[Optional[torch.Tensor]], norm: torch.Tensor,
              eps: float, signature: tuple) -> "Perturbation":
        """Perturb the weights along ``grads`` with ``plan`` = (layout, packed mask, aux)."""
        perturbation = cls.prepare(backend, plan, grads, norm, eps, signature)
        perturbation.write()
        return perturbation

    def write(self) -> None:
        """Move the weights to ``w + e`` (once)."""
        with interrupts_held():
            self.backend.write_perturb(self.saved)

    def nbytes(self) -> int:
        return self.backend.saved_nbytes(self.saved)

    def undo(self, tensors: Sequence[torch.Tensor], groups: Sequence[dict]) -> Optional[ValueError]:
        """Put the originals back into ``tensors`` (the perturbed parameters' tensors now). Returns the
        error to raise once the optimizer is idle when some could not be put back."""
        if storage_signature(tensors) == self.signature:
            self.backend.restore(self.layout, self.bits, self.aux, self.saved)
            return None
        # Storage replaced since first_step (model.to(...), p.data = ...): the backend's restore would
        # write into the old one; put the originals into the current one instead.
        originals = self.backend.saved_originals(self.layout, self.bits, self.aux, self.saved)
        if originals is None:
            return None
        shapes = self.layout.shapes
        moved = storage.restore_into(tensors, self.layout, self.bits, originals, shapes)
        if not moved:
            return None
        changes = ", ".join(f"{param_groups.perturbed_label(groups, i)} from {tuple(shapes[i])} to "
                            f"{tuple(tensors[i].shape)}" for i in moved)
        return ValueError(
            f"restore: parameters changed shape between first_step and restore ({changes}); their perturbed "
            "values could not be undone and they still hold w + e (every other parameter was restored)")


# The signals whose Python handlers are held back while a kernel writes the weights: Ctrl-C's, those
# used to stop a process (torchrun's elastic agent turns SIGTERM, SIGINT, SIGHUP and SIGQUIT into
# exceptions; job schedulers send SIGTERM or SIGUSR1 ahead of a kill) and SIGALRM (timeouts).
HELD_SIGNALS = tuple(getattr(signal, name) for name in
                     ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM") if hasattr(signal, name))
_PUT_BACK_TRIES = 8  # signal.signal runs pending handlers first and, if one raises, changes nothing


class _Hold:
    """What replaces the held handlers: while the block runs it records the signals; after it (``open``
    false) it forwards each to the handler it replaced, so one left installed (when a raising handler
    stopped the putting back) loses nothing."""

    def __init__(self) -> None:
        self.handlers: dict = {}  # signum -> the handler replaced
        self.received: list = []  # (signum, frame), in arrival order
        self.open = True

    def __call__(self, signum: int, frame: Any) -> None:
        if self.open:
            self.received.append((signum, frame))
        else:
            self.handlers[signum](signum, frame)

    def release(self) -> Optional[BaseException]:
        """Put the handlers back, then run each one received (once, in arrival order) with the handler
        now installed; returns the first exception anything raised (the rest are dropped, as when
        CPython's own handlers run one after another and the first raises)."""
        self.open = False
        errors: list = []
        for signum, handler in self.handlers.items():
            for _ in range(_PUT_BACK_TRIES):
                try:
                    signal.signal(signum, handler)
                    break
                except BaseException as exc:  # a pending handler raised: the handler was not changed yet
                    errors.append(exc)
        delivered: set = set()
        for signum, frame in self.received:
            if signum in delivered:
                continue  # a signal pending twice runs its handler once, as in CPython
            delivered.add(signum)
            handler = signal.getsignal(signum)
            if handler is self:
                handler = self.handlers[signum]
            if callable(handler):  # not SIG_DFL/SIG_IGN (set by a handler that ran meanwhile): dropped, as in CPython
                try:
                    handler(signum, frame)
                except BaseException as exc:
                    errors.append(exc)
        return errors[0] if errors else None


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Run the block with the Python handlers of :data:`HELD_SIGNALS` held back: a signal that arrives
    in it is handed to its handler (``KeyboardInterrupt`` for SIGINT by default) when the block ends,
    in arrival order; the first exception a handler raises is raised then. Only the main thread runs
    Python signal handlers; elsewhere the block just runs, and a signal without a Python handler
    (ignored, default, or handled outside Python) is left alone. A handler that raises while the
    handlers are swapped in stops the hold before the block runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hold = _Hold()
    try:
        for signum in HELD_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                hold.handlers[signum] = handler  # first: if the swap raises, putting it back is harmless
                signal.signal(signum, hold)
    except ValueError as exc:
        if "main thread of the main interpreter" not in str(exc) or len(hold.handlers) > 1:
            hold.release()
            raise
        hold.handlers.clear()  # not the main interpreter: no handler can be replaced
    except BaseException:  # a handler not held (yet) raised: the block never ran; that exception goes on
        hold.release()
        raise
    if not hold.handlers:
        yield
        return
    try:
        yield
    finally:
        error = hold.release()
        if error is not None:
            raise error


# The live optimizers with a pending perturbation (added by first_step, removed by restore).
_perturbing: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _spans(tensors: Sequence[torch.Tensor]) -> list[tuple]:
    out = []
    for i, t in enumerate(tensors):
        span = storage._memory_span(t)
        if span is not None:
            out.append((str(span[0]), span[1], span[2], i))
    return sorted(out)


def check_unclaimed(owner: Any, tensors: Sequence[torch.Tensor], label: Callable[[int], str]) -> None:
    """Raise ``RuntimeError`` when one of ``tensors`` (``owner``'s perturbed tensors, ``label(i)`` naming
    the i-th) shares memory with a tensor another live optimizer has perturbed and not restored."""
    others = [o for o in list(_perturbing) if o is not owner and getattr(o, "_pending", None) is not None]
    if not others:
        return
    mine = _spans(tensors)
    for other in others:
        theirs = _spans(other._pending.layout.params)  # disjoint (one optimizer's parameters never overlap)
        starts = [b[:2] for b in theirs]
        for a in mine:
            k = bisect.bisect_left(starts, (a[0], a[2])) - 1  # the last of theirs starting before a ends
            if k >= 0:
                b = theirs[k]
                if b[0] == a[0] and b[2] > a[1]:
                    raise RuntimeError(
                        f"first_step: {label(a[3])} (shape {tuple(tensors[a[3]].shape)}) of {_name(owner)} shares "
                        f"memory with {param_groups.perturbed_label(other.param_groups, b[3])} of {_name(other)}, "
                        "which that optimizer has perturbed and not restored: its restore would write back the "
                        "weights with both perturbations. Call second_step() or restore() on it first (or drop "
                        "it: one optimizer per parameter); nothing was changed")


def _name(opt: Any) -> str:
    return f"{type(opt).__name__} at {id(opt):#x}"


def register(owner: Any) -> None:
    _perturbing.add(owner)


def unregister(owner: Any) -> None:
    _perturbing.discard(owner)
