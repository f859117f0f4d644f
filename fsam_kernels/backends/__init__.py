"""Backend registry: each backend is loaded lazily, the first time it is asked for.

``backend="auto"`` (or the ``FSAM_BACKEND`` environment variable) picks, per device, the first backend
of :data:`AUTO_ORDER` that loads and supports the device. A backend that fails to load degrades to the
next one with one warning; a backend requested by name that cannot run raises
:class:`BackendUnavailable` with the reason. Nothing probes the GPU at import time.
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Optional, Union

import torch

from .base import Backend

# name -> "module:Class" (relative to this package)
_REGISTRY: dict[str, str] = {
    "torch": "torch_backend:TorchBackend",
    "triton": "triton_backend:TritonBackend",
    "native": "native_backend:NativeBackend",
}

# Preference of backend="auto", per device type. On CUDA "native" and "triton" are ordered by what the
# benchmarks measured (see docs/benchmarks.md); on the CPU the compiled extension beats the reference.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "native", "torch"),
    "cpu": ("native", "torch"),
}

_loaded: dict[str, Backend] = {}
_load_errors: dict[str, str] = {}
_warned: set[str] = set()


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run here."""


def backend_names() -> list[str]:
    return list(_REGISTRY)


def _load(name: str) -> Optional[Backend]:
    if name in _loaded:
        return _loaded[name]
    if name in _load_errors:
        return None
    module_name, cls_name = _REGISTRY[name].split(":")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
        backend = getattr(module, cls_name)()
    except Exception as exc:  # a missing or broken backend must not break the package
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = backend
    return backend


def load_error(name: str) -> Optional[str]:
    """Why backend ``name`` failed to load (``None`` if it loaded or was never tried)."""
    _load(name)
    return _load_errors.get(name)


def available_backends(device: Union[str, torch.device, None] = None) -> list[str]:
    """Names of the backends that load and can run on ``device`` (default: the CPU), in ``"auto"``'s
    order of preference (its first is what ``"auto"`` picks)."""
    dev = torch.device(device if device is not None else "cpu")
    order = AUTO_ORDER.get(dev.type, ())
    names = []
    for name in [*order, *(n for n in _REGISTRY if n not in order)]:
        b = _load(name)
        if b is not None and b.supports(dev):
            names.append(name)
    return names


_FIXES = {
    "native": "the native extension was not built (a pure-Python install); reinstall with "
              "`pip install --no-build-isolation .` in an environment with the torch you use",
    "triton": "Triton is not installed (`pip install triton`)",
}


def _fix(name: str, dev: torch.device) -> str:
    """Why compiled backend ``name`` does not serve ``dev`` and how to get it: for the native extension
    the build record's line for that part (see :mod:`fsam_kernels.build_info`) where there is one."""
    if name == "native":
        from .. import build_info

        why = build_info.reason("cuda" if dev.type == "cuda" else "cpu")
        if why is not None:
            return f"the native extension's {why}"
    b = _loaded.get(name)
    reason = None if b is None else getattr(b, "unsupported_reason", lambda d: None)(dev)
    if reason:
        return f"backend {name!r}: {reason}"
    return _FIXES.get(name, f"backend {name!r} is not installed")


def _warn_not_built(missing: list[str], dev: torch.device) -> None:
    """Once per device type: "auto" fell back to the pure-torch backend because a compiled one that
    would serve this device is not there, and how to get it."""
    key = f"not-built:{dev.type}"
    if key in _warned:
        return
    _warned.add(key)
    fixes = "; ".join(_fix(name, dev) for name in missing)
    warnings.warn(
        f"fsam_kernels: backend='auto' uses the slower pure-torch backend on {dev.type}: {fixes}. "
        "`python -m fsam_kernels` shows what was built.",
        RuntimeWarning,
        stacklevel=4,
    )


def requested_backend(name: str) -> str:
    """``name``, where ``"auto"`` defers to the ``FSAM_BACKEND`` environment variable (``"auto"`` when
    unset or empty); an unknown value of the variable raises a ValueError naming it."""
    if name != "auto":
        return name
    env = os.environ.get("FSAM_BACKEND", "") or "auto"
    if env != "auto" and env not in _REGISTRY:
        raise ValueError(f"Invalid FSAM_BACKEND environment variable: {env!r}; expected 'auto' or one of {backend_names()}")
    return env


def get_backend(name: str, device: Union[str, torch.device]) -> Backend:
    """The backend called ``name`` ("auto" resolves per device) for tensors on ``device``."""
    dev = torch.device(device)
    name = requested_backend(name)
    if name == "auto":
        missing = []  # compiled backends that would serve this device but are not built or installed
        for candidate in AUTO_ORDER.get(dev.type, ("torch",)):
            b = _load(candidate)
            if b is None:
                err = _load_errors[candidate]
                if err.startswith("ModuleNotFoundError"):
                    missing.append(candidate)
                elif candidate not in _warned:
                    _warned.add(candidate)
                    warnings.warn(
                        f"fsam_kernels: backend {candidate!r} failed to load ({err}); falling back",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                continue
            if b.supports(dev):
                if b.name == "torch" and missing:
                    _warn_not_built(missing, dev)
                return b
            if candidate != "torch":  # loaded, but not built for this device (native without CUDA kernels)
                missing.append(candidate)
        return _load("torch")
    if name not in _REGISTRY:
        raise ValueError(f"Invalid backend: {name!r}; expected 'auto' or one of {backend_names()}")
    b = _load(name)
    if b is None:
        raise BackendUnavailable(f"fsam_kernels: backend {name!r} is not available: {_load_errors[name]}")
    if not b.supports(dev):
        reason = getattr(b, "unsupported_reason", lambda d: f"it does not run on {d}")(dev)
        raise BackendUnavailable(f"fsam_kernels: backend {name!r} cannot run on {dev}: {reason}")
    return b
