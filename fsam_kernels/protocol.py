"""The two-step protocol every optimizer of the family follows, and the hooks its variants use.

:class:`TwoStepOptimizer` is the protocol: ``first_step`` (the subclass's: move the weights to
``w + e``; phase ``PERTURBED``, or ``SKIPPED`` when the first gradient is not finite), the caller's
second backward, ``second_step`` (restore, step the base optimizer), or ``step(closure)`` for all of
it. A ``torch.amp.GradScaler`` is an argument of each of them, as torch's fused optimizers take
``grad_scale``/``found_inf``: the first pass is unscaled before anything moves, an overflow skips the
step and the scale backs off. :meth:`TwoStepOptimizer.undo_on_error` undoes a step whose passes fail;
integrations that run their own passes use it too.

A subclass provides ``first_step(zero_grad, *, scaler=None)``, ``restore()``, ``check_options()``,
``_has_any_grad()``, ``_gradient_is_zero()`` and the step snapshot (``_snapshot``, ``_rewind``,
``_release``), and changes a step only through the hooks ``_after_perturbation``, ``_before_base_step``,
``_after_restore`` and ``_after_base_step``.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import itertools
from typing import Any, Callable, Iterator, Optional

import torch
from torch.optim import optimizer as _torch_optimizer


class Phase(enum.Enum):
    """Where an optimizer is in its two-step protocol."""

    IDLE = "idle"  # no step in progress
    PERTURBED = "perturbed"  # first_step moved the weights to w + e; second_step or restore undoes it
    SKIPPED = "skipped"  # first_step saw a non-finite gradient norm and changed nothing


def _forwarded(name: str) -> property:
    """``param_groups``, ``state`` and ``defaults``: always the base optimizer's (also after
    ``opt.base_optimizer.load_state_dict(...)``, which replaces its lists), so an LR scheduler attached
    to either acts on both. Before the base optimizer exists (torch.optim.Optimizer.__init__ assigns
    them) they are held here."""
    own = "_own_" + name

    def get(self: Any) -> Any:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            return getattr(base, name)
        try:
            return self.__dict__[own]
        except KeyError:
            raise AttributeError(name) from None

    def set(self: Any, value: Any) -> None:
        base = self.__dict__.get("base_optimizer")
        if base is not None:
            setattr(base, name, value)
        else:
            self.__dict__[own] = value

    return property(get, set, doc=f"The base optimizer's ``{name}``.")


def _hooked_step(func: Callable) -> Callable:
    """What torch.optim's ``profile_hook_step`` does for ``step``, for the two-call form: the step
    pre-hooks (global, then this optimizer's) before ``first_step``, the post-hooks (this optimizer's,
    then global) after ``second_step``. A pre-hook may return ``(args, kwargs)`` to replace the call's.
    Inside ``step(closure)``, which torch's wrapper already hooks, they do not fire again."""
    pre = func.__name__ == "first_step"

    @functools.wraps(func)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._in_hooked_step:
            return func(self, *args, **kwargs)
        if pre:
            for hook in itertools.chain(_torch_optimizer._global_optimizer_pre_hooks.values(),
                                        self._optimizer_step_pre_hooks.values()):
                result = hook(self, (self, *args), kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"{func.__qualname__}: a step pre-hook must return None or a tuple "
                                           f"(new_args, new_kwargs), got {result!r}")
                    (_, *args), kwargs = result
        out = func(self, *args, **kwargs)
        if not pre:
            for hook in itertools.chain(self._optimizer_step_post_hooks.values(),
                                        _torch_optimizer._global_optimizer_post_hooks.values()):
                hook(self, (self, *args), kwargs)
        return out

    return wrapper


def outside_inference_mode(func: Callable) -> Callable:
    """FSAM's entry points run with inference mode off: called inside torch.inference_mode() they behave
    as outside, on every backend, and create no inference tensor (which a later step outside could not
    update). Outside it (the usual case) this costs one check, not a context switch."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_inference_mode_enabled():
            return func(*args, **kwargs)
        with torch.inference_mode(False):
            return func(*args, **kwargs)

    return wrapper


class TwoStepOptimizer(torch.optim.Optimizer):
    """Base of :class:`fsam_kernels.FSAM`: the step protocol around ``self.base_optimizer``.

    torch.optim's step hooks (``register_step_pre_hook``/``register_step_post_hook`` and the global
    ``register_optimizer_step_pre_hook``/``post_hook``) fire once per step: around ``step(closure)``
    (torch's own wrapper), and in the two-call form the pre-hooks when ``first_step`` begins and the
    post-hooks when ``second_step`` returns (a step abandoned with ``restore()`` fires no post-hook).
    """

    base_optimizer: torch.optim.Optimizer
    _phase: Phase = Phase.IDLE
    _closure_first = False  # step(closure) computes the first gradient too (torch.optim convention)
    _norm_ahead = None  # a subclass's first-pass norm computed early in step(closure), for its first_step
    _in_hooked_step = False  # inside step(closure): its first_step/second_step fire no step hooks

    param_groups = _forwarded("param_groups")
    state = _forwarded("state")
    defaults = _forwarded("defaults")

    def _share_base_optimizer(self, base: torch.optim.Optimizer) -> None:
        """Make ``base`` the holder of ``param_groups``, ``state`` and ``defaults`` (keeping this
        optimizer's defaults the base optimizer lacks, e.g. ``rho``)."""
        own = self.defaults
        self.base_optimizer = base
        for key, value in own.items():
            base.defaults.setdefault(key, value)
        for name in ("param_groups", "state", "defaults"):
            self.__dict__.pop("_own_" + name, None)

    @property
    def phase(self) -> Phase:
        self._settle()
        return self._phase

    def _require_idle(self, what: str) -> None:
        if self.phase is Phase.PERTURBED:
            raise RuntimeError(f"{what}: the weights are perturbed; call second_step() or restore() first")

    # ------------------------------------------------------------------ what a subclass provides
    def first_step(self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None) -> torch.Tensor:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def check_options(self):  # -> the current layout
        raise NotImplementedError

    def _has_any_grad(self) -> bool:
        raise NotImplementedError

    def _gradient_is_zero(self) -> bool:
        """Whether the gradients now in ``.grad`` are zero everywhere (so no first pass)."""
        raise NotImplementedError

    def _settle(self) -> bool:
        """Take a skip decision ``first_step`` left to the end of the step (PERTURBED may become SKIPPED);
        returns whether this call skipped."""
        return False

    def _snapshot(self) -> Any:
        """What a step may change besides the weights, to undo it (see :meth:`undo_on_error`)."""
        raise NotImplementedError

    def _rewind(self, state: Any) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        """The snapshot will not be rewound to."""

    # ------------------------------------------------------------------ the protocol
    @_hooked_step
    @outside_inference_mode
    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Optional[torch.amp.GradScaler] = None) -> bool:
        """Restore the weights and step the base optimizer with the current (perturbed-point) gradient.

        With ``scaler``: the gradient is unscaled, the base optimizer stepped through the scaler (which
        skips the step on inf/NaN) after the restore, and the scale updated; after a skipped
        first_step the base optimizer is not stepped. Returns whether the base optimizer stepped.

        torch's clipping recipe works as with ``scaler.step``: ``scaler.unscale_(opt)`` (or
        ``scaler.unscale_(opt.base_optimizer)``), clip, then this call (the gradients are not unscaled twice). If anything here fails, the
        weights are restored first (the step is abandoned, phase ``IDLE``) and the error raised."""
        if self._phase is Phase.IDLE:
            raise RuntimeError("second_step called without a first_step")
        _check_scaler(scaler)
        self._settle()
        perturbed = self._phase is Phase.PERTURBED
        if scaler is not None:
            self._take_callers_unscale(scaler)
        try:
            if perturbed and scaler is not None and _unscale_pending(scaler, self.base_optimizer):
                scaler.unscale_(self.base_optimizer)  # the hook works on true gradients
            self._before_base_step()
        except BaseException:
            self.restore()
            if scaler is not None and scaler.is_enabled():
                scaler.update()  # clears this step's unscale_ records, so the next step can unscale
            raise
        self.restore()  # before the scaler's step, so a skipped step leaves the weights untouched
        if scaler is None:
            self._step_base()
            stepped = True
        else:
            before = scaler.get_scale()
            if perturbed:
                self._step_base(scaler)  # skips on inf/NaN
            else:
                self.zero_grad()
                self._opt_called = True  # the step was taken, as torch's AMP recipe counts it
            scaler.update()
            stepped = perturbed and (not scaler.is_enabled() or scaler.get_scale() >= before)
        if zero_grad:
            self.zero_grad()
        return stepped

    def _set_aside_first_unscale(self, scaler: torch.amp.GradScaler) -> None:
        """After first_step's ``scaler.unscale_(self)``: its record (the first pass's overflow flags) is
        set aside, so the caller may ``scaler.unscale_(opt)`` the second gradient, as torch's clipping
        recipe does; :meth:`_take_callers_unscale` puts it back before ``scaler.update()``."""
        if scaler.is_enabled():
            self._first_unscale = scaler._per_optimizer_states.pop(id(self), None)

    def _take_callers_unscale(self, scaler: torch.amp.GradScaler) -> None:
        """Before the base step: a ``scaler.unscale_(opt)`` of the second gradient is moved to the base
        optimizer (the one the scaler steps, which then does not unscale again), and the first pass's
        record comes back under a key of its own, for ``scaler.update()``."""
        if not scaler.is_enabled():
            return
        states = scaler._per_optimizer_states
        mine = states.get(id(self))
        if mine is not None and mine["stage"] is torch.amp.grad_scaler.OptState.UNSCALED:
            states[id(self.base_optimizer)] = states.pop(id(self))
        first = self.__dict__.pop("_first_unscale", None)
        if first is not None:
            states[("first pass", id(self))] = first

    def _step_base(self, scaler: Optional[torch.amp.GradScaler] = None) -> Any:
        """Step the base optimizer (through ``scaler``); returns what its step returns."""
        out = self.base_optimizer.step() if scaler is None else scaler.step(self.base_optimizer)
        self._opt_called = True  # tells an LR scheduler attached to this optimizer that it stepped
        self._after_base_step()
        return out

    @outside_inference_mode
    def step(self, closure: Optional[Callable[[], Any]] = None, *,
             scaler: Optional[torch.amp.GradScaler] = None) -> Any:
        """One FSAM step with ``closure`` (a function that computes the loss, calls ``backward()`` and
        returns the loss; with ``scaler``, ``scaler.scale(loss).backward()``).

        davda54/sam style, when the caller has already done the first backward: ``closure`` does the
        second forward/backward (gradients zeroed before it) and its loss is returned. The
        ``torch.optim`` convention (e.g. PyTorch Lightning's automatic optimization, whose closure
        zeroes the gradients itself), when no perturbed parameter has a gradient at the first such
        call (``zero_grad()`` sets them to ``None``): the closure runs first for the gradient at ``w``
        too, and that first loss is returned; once taken, this way sticks for later steps, whose
        leftover gradients (from ``w + e``) are then not mistaken for a first pass. Gradients that are zero
        everywhere (``zero_grad(set_to_none=False)``, torch.optim's closure loop) are never taken for a
        first pass either: decided at each call, the closure then runs first. A first closure that
        computes no gradient (e.g. a skipped batch) skips the step and returns ``None``.

        When the first gradient's norm is not finite the step is skipped (weights, base optimizer and
        mask untouched, one warning; with a scaler none, and the scale backs off) and ``None`` is
        returned. If the closure raises, the weights, the mask, the step count and the Fisher
        accumulator are as before the call and the gradients are cleared; a closure that computes no
        gradient at ``w + e`` raises the same way."""
        if closure is None:
            raise RuntimeError(
                "FSAM.step needs a closure that recomputes the loss and calls backward(); or call "
                "first_step() and second_step() yourself"
            )
        if self.phase is Phase.PERTURBED:
            raise RuntimeError("first_step called twice: call second_step() or restore() before the next first_step()")
        _check_scaler(scaler)
        self.check_options()  # before the closure runs
        if not self._closure_first and not self._has_any_grad():
            self._closure_first = True  # sticky, see above
        # Gradients zeroed in place (zero_grad(set_to_none=False), torch.optim's closure loop) are no first
        # pass either: decided at each call, since a davda54-style caller's gradient may be zero once.
        try:
            return self._step_with_closure(closure, scaler)
        finally:
            self._norm_ahead = None  # a norm _gradient_is_zero left for first_step lives for this call only

    def _step_with_closure(self, closure: Callable[[], Any], scaler: Optional[torch.amp.GradScaler]) -> Any:
        closure_first = self._closure_first or self._gradient_is_zero()
        first_loss = None
        if closure_first:
            try:
                with torch.enable_grad():
                    first_loss = closure()
            except BaseException:
                self.zero_grad()  # no partial gradient may pass for a first pass later
                raise
            if not self._has_any_grad():
                return None

        def second_pass() -> Any:
            with torch.enable_grad():
                loss = closure()
            self._require_second_gradient("FSAM.step" if scaler is None else "amp.step")
            return loss

        perturbed, loss = self._two_passes(second_pass, scaler)
        if not perturbed:
            return None
        return first_loss if closure_first else loss

    def _two_passes(self, second_pass: Callable[[], Any], scaler: Optional[torch.amp.GradScaler] = None) -> tuple[bool, Any]:
        """What every ``step(closure)`` does after the first backward: :meth:`first_step`,
        ``second_pass()`` at ``w + e``, :meth:`second_step`; undone if ``second_pass`` raises. After a
        non-finite first gradient the rest is skipped: ``(False, None)``."""
        hooked, self._in_hooked_step = self._in_hooked_step, True  # torch's step wrapper fired the hooks
        try:
            return self._two_passes_unhooked(second_pass, scaler)
        finally:
            self._in_hooked_step = hooked

    def _two_passes_unhooked(self, second_pass: Callable[[], Any],
                             scaler: Optional[torch.amp.GradScaler] = None) -> tuple[bool, Any]:
        with self.undo_on_error(scaler):
            self.first_step(zero_grad=True, scaler=scaler)
            self._settle()  # before the second pass, which a skipped step does not run
            if self._phase is Phase.SKIPPED:
                if scaler is not None:
                    self.second_step(scaler=scaler)  # lets the scaler back off
                self._phase = Phase.IDLE
                return False, None
            result = second_pass()
        self.second_step(scaler=scaler)
        return True, result

    @contextlib.contextmanager
    def undo_on_error(self, scaler: Optional[torch.amp.GradScaler] = None) -> Iterator[None]:
        """If the enclosed code (e.g. ``accumulate_fisher()``, ``first_step()`` and a second pass)
        raises, undo what it did: the weights restored (never left perturbed), the gradients cleared,
        the mask, step count and Fisher accumulator as on entry, and ``scaler`` ready for the next step."""
        state = self._snapshot()
        try:
            yield
        except BaseException:
            self.restore()
            self.zero_grad()
            self._rewind(state)
            if scaler is not None:
                self._take_callers_unscale(scaler)  # the first pass's record: update() needs one
                scaler.update()  # clears the record of this step's unscale_, so the next one can unscale
            raise
        finally:
            self._release()

    def _require_second_gradient(self, what: str) -> None:
        # The gradients were cleared before the second pass: none now means the closure never ran
        # backward(), and stepping on would count a step that changed nothing.
        if not self._has_any_grad():
            raise RuntimeError(
                f"{what}: the closure computed no gradient at the perturbed weights (did it call "
                "loss.backward()?); the weights were restored and the step not taken"
            )

    def zero_grad(self, set_to_none: bool = True) -> None:
        base = self.base_optimizer
        if set_to_none and getattr(base.zero_grad, "__func__", None) is torch.optim.Optimizer.zero_grad:
            # What torch's zero_grad does with set_to_none, without its profiler range and setup: a
            # step clears the gradients twice, and on a small model that cost shows in the step time.
            for group in base.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        base.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ hooks
    def _after_perturbation(self) -> None:
        """Called once the weights hold ``w + e``, the first gradient still in ``.grad``."""

    def _before_base_step(self) -> None:
        """Called by second_step before the weights are restored and the base optimizer steps, on the
        second gradient (unscaled when a scaler is given and the step was perturbed)."""

    def _after_restore(self) -> None:
        """Called when a pending step ends (restored, stepped or abandoned)."""

    def _after_base_step(self) -> None:
        """Called right after the base optimizer's step (also one a GradScaler skipped)."""


def _unscale_pending(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.step(optimizer)`` would still unscale ``optimizer``'s gradients (its stage is
    READY), as GradScaler.step decides; False after the caller's own ``scaler.unscale_(optimizer)``."""
    if not scaler.is_enabled():
        return False
    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    return stage is torch.amp.grad_scaler.OptState.READY


def _check_scaler(scaler: Optional[Any]) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"Invalid scaler: expected a torch.amp.GradScaler, got {type(scaler).__name__}")
