"""One rule for every numeric option (constructor arguments, param-group options, values changed mid-run).

A real number is a Python ``int`` or ``float``, any other ``numbers.Real`` (numpy's scalars register
there, ``fractions.Fraction``) or a 0-dim tensor of a real dtype (read once, on any device). ``bool``,
``numpy.bool_``, bool tensors, complex numbers and tensors with more than one dimension are not
numbers here. Accepted values are stored as Python ``float`` (``int`` for counts), so a step never
converts or synchronises. Each check raises ``ValueError("Invalid <name><where>: <value>; expected
...")`` naming the option and where it lives (e.g. `` in param_groups[1]``).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch


def _real(value: Any) -> Optional[float]:
    """``value`` as a Python number (``int`` kept as ``int``), or ``None`` if it is not a real number."""
    kind = type(value)
    if kind is float or kind is int:  # what every step reads once stored; skips the ABC checks below
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if (isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype != torch.bool
            and not value.is_complex() and value.device.type != "meta"):
        return value.item()
    return None


def _invalid(name: str, where: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"Invalid {name}{where}: {value!r}; expected {expected}")


def positive(value: Any, name: str, where: str = "") -> float:
    """A finite number > 0 (``rho``, ``eps``)."""
    v = _real(value)
    if v is None or not math.isfinite(v) or v <= 0:
        raise _invalid(name, where, value, "a finite number > 0")
    return float(v)


def finite(value: Any, name: str, where: str = "", *, low: Optional[float] = None) -> float:
    """A finite number, ``>= low`` when given."""
    v = _real(value)
    if v is None or not math.isfinite(v) or (low is not None and v < low):
        raise _invalid(name, where, value, "a finite number" + ("" if low is None else f" >= {low:g}"))
    return float(v)


def fraction(value: Any, name: str, where: str = "", *, zero: bool = True) -> float:
    """A number in [0, 1] (``zero=False``: in (0, 1])."""
    v = _real(value)
    if v is None or not (0.0 <= v <= 1.0 if zero else 0.0 < v <= 1.0):
        raise _invalid(name, where, value, f"a number in {'[' if zero else '('}0, 1]")
    return float(v)


def count(value: Any, name: str, where: str = "") -> int:
    """An integer >= 1 (any ``numbers.Integral`` or 0-dim integer tensor; not a float)."""
    v = _real(value)
    if not isinstance(v, int) or v < 1:
        raise _invalid(name, where, value, "an int >= 1")
    return v


def flag(value: Any, name: str, where: str = "") -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}{where}: {value!r}; expected True or False")
    return value
