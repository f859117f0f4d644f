"""The build record: setup.py writes what it attempted and how each part ended; ``python -m
fsam_kernels`` and ``backend="auto"``'s fallback warning say it. The failing builds are simulated (a
fake ``nvcc`` or C++ compiler that exits 1 at once), so nothing is compiled."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from fsam_kernels import backends, build_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINK_ERROR = "/usr/bin/ld: cannot find -lcudart: No such file or directory"

# torch as setup.py sees a CUDA build of it (this may be a CPU build): a CUDA version, compiled for CUDA
FAKE_CUDA_TORCH = """
import torch.version, torch.cuda
torch.version.cuda = "12.4"
torch.cuda._is_compiled = lambda: True
torch.cuda.is_available = lambda: False
"""


def _script(path, text):
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return str(path)


def _build(tmp_path, env_update):
    """``setup.py build_ext`` into tmp_path; returns (the process, the build record it wrote)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSAM_") and k != "CUDA_HOME"}
    env.update(env_update)
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib"),
                           "--build-temp", str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    record_path = tmp_path / "lib" / "fsam_kernels" / build_info.FILE_NAME
    assert record_path.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, json.loads(record_path.read_text())


def test_a_cuda_build_that_fails_to_link_is_recorded_and_reported(tmp_path):
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    _script(cuda_home / "bin" / "nvcc", f'echo "{LINK_ERROR}" >&2\necho "collect2: error: ld returned 1 exit status" >&2\nexit 1\n')
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAKE_CUDA_TORCH)
    proc, record = _build(tmp_path, {"PYTHONPATH": str(site), "CUDA_HOME": str(cuda_home), "FSAM_FORCE_CUDA": "1",
                                     "PATH": f"{cuda_home / 'bin'}:{os.environ['PATH']}"})
    assert proc.returncode != 0  # FSAM_FORCE_CUDA: a failed CUDA build is fatal
    assert LINK_ERROR in proc.stdout + proc.stderr  # the compiler's output still reaches the terminal
    assert record["torch"] == torch.__version__ and record["torch_cuda"] == "12.4"
    assert record["archs"] and record["cuda_home"] == str(cuda_home)
    cuda = record["parts"]["cuda"]
    assert cuda["attempted"] and cuda["status"] == "failed to link" and cuda["reason"] == "cannot find -lcudart"
    assert LINK_ERROR in cuda["errors"]
    lines = build_info.report_lines(record)
    assert (f"CUDA kernels: tried, failed to link: cannot find -lcudart (CUDA_HOME={cuda_home}); rebuild with "
            "CUDA_HOME set to the toolkit, or FSAM_NO_CUDA=1") in lines
    assert "CPU kernels: not attempted: FSAM_FORCE_CUDA=1 stops the build at the CUDA failure" in lines


def test_a_failing_compiler_falls_back_to_pure_python_and_says_why(tmp_path):
    """Built in place (as pip install -e does), in a copy of the build's files: the record lands in the
    package next to where the extension would be."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "csrc"):
        (shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy)(os.path.join(ROOT, name), src / name)
    (src / "fsam_kernels").mkdir()
    shutil.copy(os.path.join(ROOT, "fsam_kernels", "build_info.py"), src / "fsam_kernels")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cxx = _script(bin_dir / "c++", 'echo "csrc/checks.cpp:1:10: fatal error: no compiler here" >&2\nexit 1\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FSAM_")}
    env.update(CXX=cxx, CC=cxx, FSAM_NO_CUDA="1")
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", str(tmp_path / "tmp")],
                          cwd=src, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]  # degrades to pure Python
    assert not list((src / "fsam_kernels").glob("_C*"))
    record = json.loads((src / "fsam_kernels" / build_info.FILE_NAME).read_text())
    cpu = record["parts"]["cpu"]
    assert cpu["attempted"] and cpu["status"].startswith("failed") and cpu["reason"]
    lines = build_info.report_lines(record)
    assert "CUDA kernels: not attempted: FSAM_NO_CUDA=1" in lines
    assert any(line.startswith("CPU kernels: tried, failed") and line.endswith(build_info.HINTS["cpu"]) for line in lines)


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch is a CUDA build here")
def test_a_cpu_torch_build_does_not_attempt_cuda(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cxx = _script(bin_dir / "c++", "exit 1\n")
    _, record = _build(tmp_path, {"CXX": cxx, "CC": cxx})
    assert build_info.part_line(record, "cuda") == f"CUDA kernels: not attempted: torch {torch.__version__} is a CPU build"


def test_the_recorder_captures_what_child_processes_print():
    def build():
        subprocess.run(["sh", "-c", f'echo "{LINK_ERROR}" >&2; echo "x.cu(3): error: identifier y is undefined"'])
        raise RuntimeError("link failed")

    lines, exc = build_info.captured(build)
    assert isinstance(exc, RuntimeError) and LINK_ERROR in lines
    record = build_info.new_record("2.6.0+cu124", "12.4")
    build_info.attempted(record, "cuda")
    build_info.ended(record, "cuda", lines, exc)
    assert record["parts"]["cuda"]["status"] == "failed to link"
    build_info.attempted(record, "cpu")
    build_info.ended(record, "cpu", ["x.cpp:3:1: error: expected ';' before '}' token"], RuntimeError("x"))
    assert build_info.part_line(record, "cpu").startswith("CPU kernels: tried, failed to compile: x.cpp:3:1: error:")


def _failed_record():
    record = build_info.new_record(torch.__version__, None)
    record["cuda_home"] = "/opt/cuda"
    build_info.attempted(record, "cuda")
    build_info.ended(record, "cuda", [LINK_ERROR], RuntimeError("link"))
    build_info.attempted(record, "cpu")
    build_info.ended(record, "cpu", ["csrc/checks.cpp:1:10: fatal error: omp.h: No such file or directory"],
                     RuntimeError("compile"))
    return record


def test_the_report_prints_the_record_one_line_per_part(monkeypatch):
    from fsam_kernels.__main__ import report

    monkeypatch.setattr(build_info, "load", lambda path=build_info.PATH: _failed_record())
    out = report()
    assert ("  CUDA kernels: tried, failed to link: cannot find -lcudart (CUDA_HOME=/opt/cuda); rebuild with "
            "CUDA_HOME set to the toolkit, or FSAM_NO_CUDA=1") in out.splitlines()
    assert "  CPU kernels: tried, failed to compile: csrc/checks.cpp:1:10: fatal error: omp.h" in out


def test_autos_fallback_warning_names_the_builds_reason(monkeypatch):
    monkeypatch.setattr(build_info, "load", lambda path=build_info.PATH: _failed_record())
    monkeypatch.delitem(backends._loaded, "native", raising=False)
    monkeypatch.setitem(backends._load_errors, "native", "ModuleNotFoundError: fsam_kernels._C is not built")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="pure-torch backend on cpu: the native extension's CPU kernels: tried, "
                                            "failed to compile: csrc/checks.cpp:1:10: fatal error: omp.h"):
        assert backends.get_backend("auto", "cpu").name == "torch"


def test_a_pure_python_install_folds_autos_warning_into_the_report():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FSAM_BACKEND")}
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.modules['fsam_kernels._C'] = None; "
                           "from fsam_kernels.__main__ import main; sys.exit(main())"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RuntimeWarning" not in proc.stderr
    assert "warning: fsam_kernels: backend='auto' uses the slower pure-torch backend on cpu" in proc.stdout
    assert proc.stdout.index("auto -> torch") < proc.stdout.index("warning: ")
