"""Hugging Face Transformers: a ``Trainer`` whose optimizer step is the two-pass FSAM step.

    from fsam_kernels.integrations.hf import FSAMTrainer, FSAMTrainingArguments

    args = FSAMTrainingArguments(output_dir="out", fsam_rho=0.05, fsam_sparsity=0.9)
    trainer = FSAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
    trainer.train()

Every ``fsam_*`` field is also a command-line flag through ``HfArgumentParser``. The FSAM optimizer
wraps the optimizer the Trainer would have built (``--optim``, learning rate, weight-decay groups,
``optimizer_cls_and_kwargs``). Everything else is the Trainer's own machinery: the accelerator's
backward and autocast (``--bf16``/``--fp16``), gradient accumulation, clipping, LR schedule,
logging and checkpoints (the mask is part of the optimizer state).

One optimizer step, with ``gradient_accumulation_steps = n``:

1. micro-batches 1..n: the Trainer's forward/backward at ``w`` (first pass, accumulated);
2. after micro-batch n: ``first_step`` (mask + perturbation from the accumulated gradient; with an
   fp16 loss scaler the gradient is unscaled first), then forward/backward of the same n
   micro-batches at ``w + e`` (second pass), BatchNorm running statistics frozen, and the weights
   restored;
3. the Trainer clips ``g_SAM``, steps (through its loss scaler, which may skip an overflowing step:
   the weights were already restored) and steps the LR schedule.

If the first gradient is not finite the perturbation and the second pass are skipped and the
gradient is left as is: with an fp16 loss scaler the step is then skipped and the scale backed off.
The logged loss is the first pass's (at ``w``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

try:
    from transformers import Trainer, TrainingArguments
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "fsam_kernels.integrations.hf needs the transformers and accelerate packages: "
        "pip install fsam_kernels[hf]"
    ) from exc

import torch

from .. import options
from ..optimizer import FISHER_MODES, FSAM
from ..utils import frozen_running_stats

__all__ = ["FSAMTrainer", "FSAMTrainingArguments"]


@dataclass
class FSAMTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus FSAM's own options (each also a ``--fsam_*`` command-line flag)."""

    fsam_enabled: bool = field(default=True, metadata={"help": "Train with FSAM; False: the plain Trainer step."})
    fsam_rho: float = field(default=0.05, metadata={"help": "FSAM neighbourhood size rho (> 0)."})
    fsam_sparsity: float = field(
        default=0.9, metadata={"help": "Fraction of weights not perturbed, in [0, 1] (0: dense SAM)."}
    )
    fsam_mask_update_interval: int = field(default=100, metadata={"help": "Rebuild the Fisher mask every N steps."})
    fsam_adaptive: bool = field(default=False, metadata={"help": "ASAM's scale-invariant perturbation."})
    fsam_fisher: str = field(
        default="batch",
        metadata={
            "help": "'batch': mask from the step's gradient; 'empirical': mask from the squared gradients "
            "summed over the steps since the last mask update.",
            "choices": list(FISHER_MODES),
        },
    )
    fsam_backend: str = field(default="auto", metadata={"help": "'auto', 'torch', 'triton' or 'native'."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.fsam_rho = options.positive(self.fsam_rho, "fsam_rho")
        self.fsam_sparsity = options.fraction(self.fsam_sparsity, "fsam_sparsity")
        self.fsam_mask_update_interval = options.count(self.fsam_mask_update_interval, "fsam_mask_update_interval")
        if self.fsam_fisher not in FISHER_MODES:
            raise ValueError(f"Invalid fsam_fisher: {self.fsam_fisher!r}; expected one of {FISHER_MODES}")
        if not isinstance(self.fsam_backend, str):
            raise ValueError(f"Invalid fsam_backend: {self.fsam_backend!r}; expected a backend name")


_FSAM_DEFAULTS = {f: getattr(FSAMTrainingArguments, f) for f in (
    "fsam_enabled", "fsam_rho", "fsam_sparsity", "fsam_mask_update_interval", "fsam_adaptive", "fsam_fisher",
    "fsam_backend",
)}


class TrainerFSAM(FSAM):
    """The FSAM optimizer the Trainer holds. :class:`FSAMTrainer` runs both passes and restores the
    weights inside ``training_step``; the Trainer's closure-less ``optimizer.step()`` then steps the
    base optimizer with the accumulated (clipped, unscaled) ``g_SAM``."""

    # A step is the Trainer's optimizer.step(), where torch's wrapper fires the step hooks; the
    # first_step inside training_step fires none (else pre-hooks would fire twice per step).
    _in_hooked_step = True

    def step(self, closure: Optional[Any] = None, **kwargs: Any) -> Any:
        if closure is not None:
            return super().step(closure, **kwargs)
        self.restore()  # a no-op: training_step restored already
        return self._step_base()


class FSAMTrainer(Trainer):
    """``transformers.Trainer`` with the two-pass FSAM step (see the module docstring).

    FSAM's options come from ``args`` when it is an :class:`FSAMTrainingArguments`; with plain
    ``TrainingArguments`` the defaults apply. The optimizer is built by the Trainer (do not pass one
    through ``optimizers``; choose the base optimizer with ``--optim`` or ``optimizer_cls_and_kwargs``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fsam_window: list[tuple[Any, Any]] = []

    # ------------------------------------------------------------------ options
    def _fsam_option(self, name: str) -> Any:
        return getattr(self.args, name, _FSAM_DEFAULTS[name])

    @property
    def fsam_enabled(self) -> bool:
        return bool(self._fsam_option("fsam_enabled"))

    @property
    def fsam_optimizer(self) -> Optional[FSAM]:
        """The FSAM optimizer in use (``None`` before training starts or when FSAM is disabled)."""
        opt = self.optimizer
        while opt is not None and not isinstance(opt, FSAM) and hasattr(opt, "optimizer"):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer wraps it
        return opt if isinstance(opt, FSAM) else None

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        if self.optimizer is not None or not self.fsam_enabled:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        saved = self.optimizer_cls_and_kwargs
        base_cls, base_kwargs = saved if saved is not None else self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
            raise ValueError(
                f"FSAMTrainer: the base optimizer must be a torch.optim.Optimizer subclass, got {base_cls!r} "
                f"(optim={self.args.optim!r}); choose another --optim"
            )
        unsupported = {"params", "model", "optimizer_dict"} & set(base_kwargs)
        if unsupported:
            raise ValueError(
                f"FSAMTrainer: optim={self.args.optim!r} builds its own parameter list ({sorted(unsupported)}); "
                "FSAM cannot wrap it, choose another --optim"
            )
        fsam_kwargs = dict(
            base_optimizer=base_cls,
            rho=self._fsam_option("fsam_rho"),
            sparsity=self._fsam_option("fsam_sparsity"),
            mask_update_interval=self._fsam_option("fsam_mask_update_interval"),
            adaptive=self._fsam_option("fsam_adaptive"),
            fisher=self._fsam_option("fsam_fisher"),
            backend=self._fsam_option("fsam_backend"),
        )
        self.optimizer_cls_and_kwargs = (TrainerFSAM, {**fsam_kwargs, **base_kwargs})
        try:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        finally:
            self.optimizer_cls_and_kwargs = saved

    # ------------------------------------------------------------------ the step
    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if not self.fsam_enabled:
            return super().training_step(model, inputs, num_items_in_batch)
        opt = self.fsam_optimizer
        if not isinstance(opt, TrainerFSAM):
            raise TypeError(
                "FSAMTrainer: the optimizer must be the one FSAMTrainer builds (got "
                f"{type(opt or self.optimizer).__name__}); do not pass `optimizers=`, set the base optimizer "
                "with --optim or optimizer_cls_and_kwargs"
            )
        loss = super().training_step(model, inputs, num_items_in_batch)  # first pass, at w
        self._fsam_window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:
            return loss  # more micro-batches of this optimizer step to come
        window, self._fsam_window = self._fsam_window, []

        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        scaler = getattr(self.accelerator, "scaler", None)
        with torch.no_grad():
            if grads and scaler is not None and scaler.is_enabled():
                # fp16 loss scaling: FSAM works on the true gradient. The Trainer's own unscale_ (at
                # clipping / step) then acts on the second pass only.
                torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
            # element-wise: a norm in fp16 overflows long before the gradients do
            finite = not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if not finite:
            # Leave the non-finite gradient for the Trainer: a loss scaler skips the step.
            return loss
        # A failure anywhere in here leaves the optimizer as before this step (this batch's Fisher included).
        with opt.undo_on_error():
            if opt.fisher == "empirical":
                opt.accumulate_fisher()
            opt.first_step(zero_grad=True)
            with frozen_running_stats(model):
                for micro_inputs, micro_items in window:  # second pass, at w + e
                    super().training_step(model, micro_inputs, micro_items)
        opt.restore()  # the Trainer clips and steps from w
        return loss
