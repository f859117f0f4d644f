"""Hints that name their fix: Triton on a CPU needs the interpreter, and the interpreter needs numpy."""
from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("triton")
from fsam_kernels.backends import triton_backend  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIND_SPEC = importlib.util.find_spec


def _backend(monkeypatch, interpreted, numpy_installed=True):
    monkeypatch.setattr(triton_backend, "interpreted", lambda: interpreted)
    monkeypatch.setattr(triton_backend, "interpret_env", lambda: False)
    monkeypatch.setattr(triton_backend, "mode_conflict", lambda: None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numpy" and not numpy_installed else FIND_SPEC(name, *a))
    backend = triton_backend.TritonBackend.__new__(triton_backend.TritonBackend)
    backend._triton_installed = True
    backend._triton_problem = (None,)  # the installed Triton passes the version probe
    return backend


def test_the_cpu_hint_says_the_interpreter_needs_numpy(monkeypatch):
    reason = _backend(monkeypatch, interpreted=False).unsupported_reason("cpu")
    assert "TRITON_INTERPRET=1" in reason and "numpy" in reason


def test_the_interpreter_without_numpy_is_refused_with_the_fix(monkeypatch):
    backend = _backend(monkeypatch, interpreted=True, numpy_installed=False)
    assert backend.unsupported_reason("cpu") == "Triton's interpreter (TRITON_INTERPRET=1) needs numpy: pip install numpy"
    assert _backend(monkeypatch, interpreted=True).unsupported_reason("cpu") is None


def test_the_triton_extra_installs_numpy():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["triton"]
    assert any(req.split(">")[0].split("=")[0].strip() == "numpy" for req in extra)
