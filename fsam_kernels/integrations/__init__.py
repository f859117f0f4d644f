"""Integrations with training frameworks. Each is imported only when used, so its framework stays an
optional dependency: ``from fsam_kernels.integrations.hf import FSAMTrainer`` needs ``transformers``
(``pip install fsam_kernels[hf]``)."""
from __future__ import annotations

from typing import Any

__all__ = ["FSAMTrainer", "FSAMTrainingArguments"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
