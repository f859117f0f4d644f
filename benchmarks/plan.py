"""What a run measures: the cases of each part for a mode (``quick``, ``full``, ``tiny``) and device,
and the settings (rounds, models, batch) that go with the mode."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import shapes as S
from .ops import Workload, method_names, method_ops

DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Settings:
    rounds: int
    warmup: int
    e2e_models: tuple[tuple[str, int, int], ...]  # (model, batch, seq)
    e2e_rounds: int
    e2e_warmup: int
    # all methods of a model timed in one case, their steps interleaved (steady ratios on a shared
    # machine; every method's optimizer state at once, so only for small models)
    e2e_interleaved: bool = False
    # more rounds for a model whose ratios sit near 1 (the tiny model: FSAM's parity with dense SAM)
    e2e_rounds_by_model: tuple[tuple[str, int], ...] = ()

    def e2e_rounds_for(self, model: str) -> int:
        return dict(self.e2e_rounds_by_model).get(model, self.e2e_rounds)


SETTINGS = {
    "full": Settings(rounds=10, warmup=2, e2e_rounds=10, e2e_warmup=3,
                     e2e_models=(("roberta-large", 16, 128), ("roberta-base", 32, 128))),
    "quick": Settings(rounds=5, warmup=1, e2e_rounds=60, e2e_warmup=3, e2e_interleaved=True,
                      e2e_models=(("tiny-roberta-L2-H64", 16, 32), ("mlp-L24-W512", 16, 1)),
                      e2e_rounds_by_model=(("tiny-roberta-L2-H64", 200),)),
    "tiny": Settings(rounds=1, warmup=0, e2e_rounds=1, e2e_warmup=0, e2e_interleaved=True,
                     e2e_models=(("tiny-roberta-L2-H64", 2, 8),)),
}


@dataclass(frozen=True)
class OpCase:
    shape_set: S.ShapeSet
    dtype: torch.dtype
    method: str
    op: str

    @property
    def id(self) -> str:
        return f"{self.shape_set.name}-{str(self.dtype)[6:]}-{self.method}-{self.op}"


@dataclass(frozen=True)
class WorkloadCase:
    """A parameter set and dtype, for the memory and launch-count parts."""

    shape_set: S.ShapeSet
    dtype: torch.dtype
    method: str

    @property
    def id(self) -> str:
        return f"{self.shape_set.name}-{str(self.dtype)[6:]}-{self.method}"


@dataclass(frozen=True)
class E2ECase:
    model: str
    batch: int
    seq: int
    methods: tuple[str, ...]  # several: timed interleaved

    @property
    def id(self) -> str:
        return f"{self.model}-b{self.batch}-s{self.seq}-{'+'.join(self.methods)}"


@dataclass
class Plan:
    mode: str
    device: torch.device
    backends: list[str]
    parts: tuple[str, ...]
    csv: Path
    settings: Settings = field(init=False)

    def __post_init__(self) -> None:
        self.settings = SETTINGS[self.mode]

    def _model_sets(self) -> list[S.ShapeSet]:
        return [s for s in S.shape_sets(self.mode) if not s.name.startswith("sweep")] or S.shape_sets(self.mode)[:1]

    def op_cases(self) -> list[OpCase]:
        if "ops" not in self.parts:
            return []
        return [OpCase(s, d, m, op) for s in S.shape_sets(self.mode) for d in DTYPES if s.measures(d)
                for m in method_names(self.backends) for op in method_ops(m)]

    def memory_cases(self) -> list[WorkloadCase]:
        if "memory" not in self.parts:
            return []
        from .memory import MEMORY_METHODS

        methods = [f"fsam[{b}]" for b in self.backends] + list(MEMORY_METHODS)
        sets = self._model_sets()
        if len(sets) > 2:  # bytes per parameter hardly depend on the model: the smallest and largest suffice
            sets = [min(sets, key=lambda s: s.numel), max(sets, key=lambda s: s.numel)]
        return [WorkloadCase(s, d, m) for s in sets for d in DTYPES if s.measures(d) for m in methods]

    def launch_cases(self) -> list[WorkloadCase]:
        if "launches" not in self.parts:
            return []
        methods = [m for m in method_names(self.backends) if "norm_perturb" in method_ops(m)]
        sets = self._model_sets()
        chosen = [s for s in sets if s.name.startswith("roberta-large")] or sets[-1:]  # the reference model
        return [WorkloadCase(s, torch.float32, m) for s in chosen[:1] for m in methods]

    def e2e_cases(self) -> list[E2ECase]:
        if "e2e" not in self.parts:
            return []
        from .e2e import e2e_methods

        methods = e2e_methods(self.backends)
        if self.settings.e2e_interleaved:
            return [E2ECase(model, b, s, tuple(methods)) for model, b, s in self.settings.e2e_models]
        return [E2ECase(model, b, s, (m,)) for model, b, s in self.settings.e2e_models for m in methods]


# --------------------------------------------------------------------------- shared workloads
_current: dict[tuple, Workload] = {}


def workload(shape_set: S.ShapeSet, dtype: torch.dtype, device: torch.device) -> Workload:
    """The workload of consecutive cases on the same parameter set is built once; only one is kept."""
    key = (shape_set, dtype, str(device))
    if key not in _current:
        _current.clear()
        _models.clear()
        _current[key] = Workload(shape_set, dtype, device)
    return _current[key]


def fits(shape_set: S.ShapeSet, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why the parameter set does not fit the device's free memory (None when it fits)."""
    if device.type != "cuda" or (shape_set, dtype, str(device)) in _current:
        return None
    _current.clear()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    need = Workload.bytes_needed(shape_set, dtype)
    if need > 0.85 * free:
        return f"{shape_set.name} in {dtype} needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


_models: dict[tuple, torch.nn.Module] = {}


def model(name: str, device: torch.device) -> torch.nn.Module:
    """The end-to-end model, built once for all methods (one kept at a time)."""
    from .e2e import build_model

    key = (name, str(device))
    if key not in _models:
        _models.clear()
        _current.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _models[key] = build_model(name, device)
    return _models[key]
