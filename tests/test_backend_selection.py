"""backend="auto": the order of preference, and the one warning when a compiled backend is missing."""
import warnings

import pytest
import torch

from fsam_kernels import backends


@pytest.fixture
def registry(monkeypatch):
    """The registry's caches, restored afterwards (tests below simulate missing backends)."""
    monkeypatch.setattr(backends, "_loaded", dict(backends._loaded))
    monkeypatch.setattr(backends, "_load_errors", dict(backends._load_errors))
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.delenv("FSAM_BACKEND", raising=False)
    return backends


def test_available_backends_are_listed_in_auto_order(registry):
    names = registry.available_backends("cpu")
    order = [n for n in registry.AUTO_ORDER["cpu"] if n in names]
    assert names[: len(order)] == order
    assert names[0] == registry.get_backend("auto", "cpu").name


def test_auto_warns_once_when_the_native_extension_was_not_built(registry):
    # a pure-Python install: importing the extension fails with ModuleNotFoundError
    registry._loaded.pop("native", None)
    registry._load_errors["native"] = "ModuleNotFoundError: No module named 'fsam_kernels._C'"
    with pytest.warns(RuntimeWarning, match=r"pure-torch backend on cpu: the native extension was not built.*"
                                            r"pip install --no-build-isolation"):
        assert registry.get_backend("auto", "cpu").name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device type
        assert registry.get_backend("auto", torch.device("cpu")).name == "torch"
        assert registry.get_backend("torch", "cpu").name == "torch"  # asked for by name: no warning


def test_auto_with_the_native_extension_built_does_not_warn(registry):
    if "native" not in registry.available_backends("cpu"):
        pytest.skip("the native extension is not built here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.get_backend("auto", "cpu").name == "native"
