"""End to end: one training step of a RoBERTa-shaped sequence classifier or of an MLP stack (random
init, bf16 autocast).

The MLP (``mlp-*``: a few million values in ~50 tensors, one feature vector per example) is where the
optimizer's work weighs in a step; in the tiny RoBERTa the forward and backward passes dominate.

Methods: the base AdamW step, dense SAM (davda54-style loop and ``_foreach``), naive FSAM, and
:class:`fsam_kernels.FSAM` on each backend. ``e2e_step`` is a step without a mask update (the mask is
rebuilt every ``mask_update_interval=100`` steps); ``e2e_mask_step`` is a step that rebuilds it, and
``e2e_step_amortized`` = ``e2e_step + (e2e_mask_step - e2e_step) / 100``, per percentile. On the CPU the
interleaved timing adds ``e2e_optimizer``: the part of each ``e2e_step`` spent in the optimizer's calls
(perturb, restore, base step, zero_grad; not the forward and backward passes), so that methods whose
steps differ by less than the step's noise can still be compared.

:func:`measure_e2e_interleaved` times several methods in turn, one step each per round, so that load
changing during the run (a shared machine) weighs on every method alike and their ratios hold.
"""
from __future__ import annotations

import copy
import random
import time

from types import SimpleNamespace
from typing import Any, Callable, Optional

import torch

from fsam_kernels import FSAM

from .baselines import ForeachSAM, LoopSAM, NaiveFSAM
from .harness import Row, run_rounds, synchronize, timed_row, timer_for
from .ops import EPS, RHO, SPARSITY

MASK_UPDATE_INTERVAL = 100
LR = 1e-5

# Hugging Face RoBERTa configurations; the tiny ones keep the layer structure at toy width for CPUs.
MODEL_CONFIGS: dict[str, dict[str, int]] = {
    "roberta-large": dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                          intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1),
    "roberta-base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1),
    "tiny-roberta-L4-H128": dict(vocab_size=2000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=512, max_position_embeddings=514, type_vocab_size=1),
    "tiny-roberta-L2-H64": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=256, max_position_embeddings=514, type_vocab_size=1),
}
# MLP stacks: ``layers`` Linear(width, width) + GELU, then a Linear(width, 2) head.
MLP_CONFIGS: dict[str, dict[str, int]] = {
    "mlp-L24-W512": dict(width=512, layers=24),  # 50 tensors, 6.3M values
}


class MLPClassifier(torch.nn.Module):
    """An MLP stack over one feature vector per example, with the Hugging Face call convention."""

    def __init__(self, width: int, layers: int, num_labels: int = 2) -> None:
        super().__init__()
        blocks: list[torch.nn.Module] = []
        for _ in range(layers):
            blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.body = torch.nn.Sequential(*blocks)
        self.head = torch.nn.Linear(width, num_labels)
        self.config = SimpleNamespace(width=width)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        logits = self.head(self.body(features))
        return SimpleNamespace(loss=torch.nn.functional.cross_entropy(logits.float(), labels), logits=logits)


def build_model(name: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    if name in MLP_CONFIGS:
        torch.manual_seed(seed)
        with torch.device(device):
            return MLPClassifier(**MLP_CONFIGS[name]).train()
    from transformers import RobertaConfig, RobertaForSequenceClassification

    if name not in MODEL_CONFIGS:
        raise ValueError(f"Invalid model: {name!r}; expected one of {list(MODEL_CONFIGS) + list(MLP_CONFIGS)}")
    torch.manual_seed(seed)
    config = RobertaConfig(**MODEL_CONFIGS[name], num_labels=2)
    with torch.device(device):  # initialise on the device: much faster than init on the CPU + copy
        model = RobertaForSequenceClassification(config)
    return model.train()


def make_batch(model: torch.nn.Module, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict:
    """Random inputs and labels; for an MLP, ``batch`` feature vectors (``seq`` must be 1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(model, MLPClassifier):
        if seq != 1:
            raise ValueError(f"Invalid seq for an MLP: {seq}; expected 1 (one feature vector per example)")
        features = torch.randn(batch, model.config.width, generator=gen)
        labels = torch.randint(0, 2, (batch,), generator=gen)
        return {"features": features.to(device), "labels": labels.to(device)}
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    labels = torch.randint(0, 2, (batch,), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


class Trainer:
    """One training step of ``method`` on ``model`` (the first and second forward/backward included)."""

    def __init__(self, model: torch.nn.Module, batch: dict, method: str, mask_update_interval: int) -> None:
        self.model, self.batch, self.method = model, batch, method
        self.device = next(model.parameters()).device
        params = [p for p in model.parameters() if p.requires_grad]
        adamw_kwargs: dict[str, Any] = dict(lr=LR, fused=True) if self.device.type == "cuda" else dict(lr=LR)
        self.fsam: Optional[FSAM] = None
        self.two_step: Any = None
        self.base: Optional[torch.optim.Optimizer] = None
        self.interval = mask_update_interval
        self.steps = 0
        # Host seconds of the last step spent in the optimizer's calls (everything but the forward and
        # backward passes). Meaningful on the CPU only: on a GPU the calls return before the work is done.
        self.optimizer_seconds = 0.0
        if method == "adamw":
            self.base = torch.optim.AdamW(params, **adamw_kwargs)
        elif method.startswith("fsam["):
            self.fsam = FSAM(params, torch.optim.AdamW, rho=RHO, sparsity=SPARSITY, perturb_eps=EPS,
                             mask_update_interval=mask_update_interval, backend=method[5:-1], **adamw_kwargs)
        else:
            base = torch.optim.AdamW(params, **adamw_kwargs)
            if method == "sam_loop":
                self.two_step = LoopSAM(params, rho=RHO, eps=EPS, base_optimizer=base)
            elif method == "sam_foreach":
                self.two_step = ForeachSAM(params, rho=RHO, eps=EPS, base_optimizer=base)
            elif method == "fsam_naive":
                self.two_step = NaiveFSAM(params, rho=RHO, sparsity=SPARSITY, eps=EPS, base_optimizer=base)
            else:
                raise ValueError(f"Invalid method: {method!r}")

    def _loss_backward(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(**self.batch).loss
        loss.backward()

    def step(self) -> None:
        clock = time.perf_counter
        self._loss_backward()
        start = clock()
        if self.base is not None:
            self.base.step()
            self.base.zero_grad(set_to_none=True)
            spent = clock() - start
        elif self.fsam is not None:
            self.fsam.first_step(zero_grad=True)
            spent = clock() - start
            self._loss_backward()
            start = clock()
            self.fsam.second_step(zero_grad=True)
            spent += clock() - start
        else:
            if isinstance(self.two_step, NaiveFSAM) and self.steps % self.interval == 0:
                self.two_step.update_mask()
            self.two_step.first_step()
            self.two_step.zero_grad()
            spent = clock() - start
            self._loss_backward()
            start = clock()
            self.two_step.second_step()
            self.two_step.zero_grad()
            spent += clock() - start
        self.optimizer_seconds = spent
        self.steps += 1


def e2e_methods(backends: list[str]) -> list[str]:
    return ["adamw", "sam_loop", "sam_foreach", "fsam_naive"] + [f"fsam[{b}]" for b in backends]


def _is_masked(method: str) -> bool:
    return method == "fsam_naive" or method.startswith("fsam[")


def measure_e2e(model: torch.nn.Module, batch: dict, model_name: str, method: str, *, rounds: int, warmup: int,
                mode: str, pedantic_for: Optional[Callable[[str], Callable[..., Any]]] = None) -> list[Row]:
    """Rows ``e2e_step`` (and for the masked methods ``e2e_mask_step`` and ``e2e_step_amortized``).

    ``pedantic_for(op)`` may hand out a pytest-benchmark ``pedantic`` per timed op.
    """
    device = next(model.parameters()).device
    plans = [("e2e_step", MASK_UPDATE_INTERVAL)] + ([("e2e_mask_step", 1)] if _is_masked(method) else [])
    times: dict[str, list[float]] = {}
    for op, interval in plans:
        trainer = _ready_trainer(model, batch, method, interval)
        pedantic = pedantic_for(op) if pedantic_for is not None else None
        times[op] = run_rounds(trainer.step, device, rounds=rounds, warmup=warmup, pedantic=pedantic)
        del trainer
        model.zero_grad(set_to_none=True)
    return _rows(model, batch, model_name, method, times, mode)


def measure_e2e_interleaved(model: torch.nn.Module, batch: dict, model_name: str, methods: list[str], *, rounds: int,
                            warmup: int, mode: str) -> list[Row]:
    """The rows of :func:`measure_e2e` for every method, their steps interleaved: each round times one
    step of every (method, op) in a new random order (seeded), so no method always follows the same
    one (a rotation would keep one method behind another's cache-thrashing mask update every round).
    Every (method, op) trains its own copy of the model with its own optimizer state (more memory than
    one at a time: for CPU-sized models). A shared model would let one method's step disturb another's:
    davda54-style SAM and the naive FSAM rebind ``p.data`` to their copies at every restore, so FSAM would
    find new storage at each of its steps and rebuild its layout (as it must when a user does that). On
    the CPU each method's steady steps also give an ``e2e_optimizer`` row (see the module docstring)."""
    device = next(model.parameters()).device
    trainers = []
    for method in methods:
        for op, interval in [("e2e_step", MASK_UPDATE_INTERVAL)] + ([("e2e_mask_step", 1)] if _is_masked(method) else []):
            trainers.append((method, op, _ready_trainer(copy.deepcopy(model), batch, method, interval)))
    timer = timer_for(device)
    times: dict[tuple[str, str], list[float]] = {(m, op): [] for m, op, _ in trainers}
    in_situ = device.type == "cpu"  # the optimizer's share of a step (see Trainer.optimizer_seconds)
    order = random.Random(0)
    for r in range(warmup + rounds):
        for method, op, trainer in order.sample(trainers, len(trainers)):
            synchronize(device)
            start = timer()
            trainer.step()
            end = timer()
            if r >= warmup:
                times[(method, op)].append(float(end - start))
                if in_situ and op == "e2e_step":
                    times.setdefault((method, "e2e_optimizer"), []).append(trainer.optimizer_seconds)
    rows = []
    for method in methods:
        rows += _rows(model, batch, model_name, method, {op: t for (m, op), t in times.items() if m == method}, mode)
    return rows


def _ready_trainer(model: torch.nn.Module, batch: dict, method: str, interval: int) -> Trainer:
    trainer = Trainer(model, batch, method, interval)
    if interval > 1:
        trainer.step()  # the first step builds the mask; the timed ones must not
    return trainer


def _rows(model: torch.nn.Module, batch: dict, model_name: str, method: str, times: dict[str, list[float]],
          mode: str) -> list[Row]:
    """``e2e_step`` (and ``e2e_mask_step``, ``e2e_step_amortized``) rows from the seconds per step."""
    device = next(model.parameters()).device
    size = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    inputs = batch["input_ids"] if "input_ids" in batch else batch["features"][:, None]
    shapes = f"{model_name} b{inputs.shape[0]} s{inputs.shape[1]}"
    rows: dict[str, Row] = {}
    for op, op_times in times.items():
        row = Row(op=op, method=method, backend=method[5:-1] if method.startswith("fsam[") else "", shapes=shapes,
                  size=size, n_tensors=n_tensors, dtype="bf16-autocast").with_conditions(device, mode)
        rows[op] = timed_row(row, op_times, 0)
    if _is_masked(method):
        steady, update = rows["e2e_step"], rows["e2e_mask_step"]
        am = Row(op="e2e_step_amortized", method=method, backend=steady.backend, shapes=shapes, size=size,
                 n_tensors=n_tensors, dtype=steady.dtype, rounds=steady.rounds).with_conditions(device, mode)
        for col in ("p20_ms", "p50_ms", "p80_ms"):
            s, u = getattr(steady, col), getattr(update, col)
            setattr(am, col, s + (u - s) / MASK_UPDATE_INTERVAL)
        rows[am.op] = am
    return list(rows.values())
