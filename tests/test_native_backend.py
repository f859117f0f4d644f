"""How the native backend is found, loaded and refused: lazy loading, diagnoses, setup.py switches."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fsam_kernels import BackendUnavailable
from fsam_kernels.backends import get_backend

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.environ.get("FSAM_NO_NATIVE") == "1", reason="native extension not built")


def run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)


def test_extension_is_not_loaded_at_package_import():
    r = run_python("import sys, fsam_kernels; print('fsam_kernels._C' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_native_runs_on_cpu_and_reports_build():
    b = get_backend("native", "cpu")
    assert b.name == "native" and b.supports(torch.device("cpu"))
    assert b.unsupported_reason(torch.device("cpu")) is None
    assert b._ext.torch_version == torch.__version__  # built against the torch that runs it


def test_other_device_types_are_refused_with_a_reason():
    b = get_backend("native", "cpu")
    assert "CPU and CUDA only" in b.unsupported_reason(torch.device("meta"))
    with pytest.raises(BackendUnavailable, match="CPU and CUDA only"):
        get_backend("native", "meta")


def test_cuda_without_kernels_or_gpu_explains_why():
    b = get_backend("native", "cpu")
    if b._ext.with_cuda and torch.cuda.is_available() and b.supports(torch.device("cuda")):
        pytest.skip("this build runs on this GPU")
    reason = b.unsupported_reason(torch.device("cuda"))
    assert "torch" in reason and ("CPU only" in reason or "GPU" in reason or "CUDA" in reason)
    with pytest.raises(BackendUnavailable, match="cannot run on cuda"):
        get_backend("native", "cuda")


def test_device_support_is_probed_once_per_device(monkeypatch):
    from fsam_kernels.backends.native_backend import NativeBackend

    b = NativeBackend()  # a fresh instance: its own cache
    calls = []
    real_is_available = torch.cuda.is_available

    def counting_is_available():
        calls.append(1)
        return real_is_available()

    monkeypatch.setattr(torch.cuda, "is_available", counting_is_available)
    first = b.unsupported_reason(torch.device("cuda"))
    n = len(calls)
    assert n >= 1
    for _ in range(5):
        assert b.unsupported_reason(torch.device("cuda")) == first
        assert b.supports(torch.device("cuda")) == (first is None)
        assert b.supports(torch.device("cpu"))
    assert len(calls) == n  # cached: no more CUDA probing per call
    assert b.unsupported_reason("meta") == b.unsupported_reason(torch.device("meta"))


@pytest.mark.parametrize("error,expected,words", [
    (ModuleNotFoundError("No module named 'fsam_kernels._C'"), ModuleNotFoundError, r"not built.*--no-build-isolation"),
    (ImportError("undefined symbol: _ZN3c10"), ImportError, r"built but does not load.*undefined symbol.*another torch"),
], ids=["missing", "broken"])
def test_unloadable_extension_raises_with_advice(monkeypatch, error, expected, words):
    from fsam_kernels import _native_ops
    from fsam_kernels.backends import native_backend

    def load_library():
        raise error

    monkeypatch.setattr(native_backend, "_ops", None)
    monkeypatch.setattr(_native_ops, "load_library", load_library)
    with pytest.raises(expected, match=words) as info:
        native_backend.NativeBackend()
    # a missing extension is quietly skipped by backend="auto"; a broken one gets a warning
    assert (type(info.value) is ModuleNotFoundError) == (expected is ModuleNotFoundError)


def test_setup_no_native_installs_pure_python():
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FSAM_NO_NATIVE": "1"})
    assert r.returncode == 0, r.stderr
    assert "FSAM_NO_NATIVE=1: installing pure Python" in r.stderr


def test_setup_force_cuda_fails_without_a_cuda_torch():
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "FSAM_FORCE_CUDA": "1"})
    assert r.returncode != 0
    assert "FSAM_FORCE_CUDA=1 but torch" in r.stderr
