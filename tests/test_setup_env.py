"""scripts/setup_env.sh installs the torch it is told to (FSAM_TORCH_SPEC, FSAM_TORCH_INDEX_URL), only from
pip's default index otherwise, and says which torch it installed and how big it is. The script runs
against a stub venv whose ``python`` logs its arguments: nothing is installed, nothing is downloaded."""
from __future__ import annotations

import os
import subprocess
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import torch_size  # noqa: E402

STUB_PYTHON = """#!/bin/sh
echo "$@" >> "$STUB_LOG"
case "$1" in
  scripts/torch_size.py) echo "setup_env: torch (stub), the CPU build: 0.7 GB installed" ;;
esac
exit 0
"""


def _setup_env(tmp_path, **env):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(STUB_PYTHON)
    python.chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    log = tmp_path / "log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FSAM_")}
    full_env.update(FSAM_VENV=str(venv), STUB_LOG=str(log), **env)
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout, log.read_text().splitlines()


def _torch_installs(calls):
    return [c for c in calls if c.startswith("-m pip install") and "torch" in c and "-r" not in c.split()]


def test_default_installs_the_pinned_torch_from_the_default_index(tmp_path):
    out, calls = _setup_env(tmp_path)
    assert _torch_installs(calls) == ["-m pip install -q torch==2.13.0"]  # no other host
    assert "setup_env: torch (stub), the CPU build: 0.7 GB installed" in out


def test_the_index_and_the_exact_requirement_are_passed(tmp_path):
    out, calls = _setup_env(tmp_path, FSAM_TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu",
                            FSAM_TORCH_SPEC="torch==2.13.0+cpu")
    assert _torch_installs(calls) == ["-m pip install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0+cpu"]
    assert "installing torch==2.13.0+cpu from https://download.pytorch.org/whl/cpu" in out
    # a second run with the same choice skips the install; another index installs again
    _, again = _setup_env(tmp_path, FSAM_TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu",
                          FSAM_TORCH_SPEC="torch==2.13.0+cpu")
    assert _torch_installs(again[len(calls):]) == []
    _, other = _setup_env(tmp_path, FSAM_TORCH_SPEC="torch==2.13.0+cpu")
    assert _torch_installs(other[len(again):]) == ["-m pip install -q torch==2.13.0+cpu"]


def _dist(name, version, sizes):
    files = [types.SimpleNamespace(size=s) for s in sizes]
    return types.SimpleNamespace(metadata={"Name": name}, version=version, files=files)


def test_torch_size_tells_the_cpu_build_from_a_cuda_build():
    cpu = torch_size.describe([_dist("torch", "2.13.0+cpu", [700_000_000, 50_000_000]), _dist("numpy", "2", [10**9])])
    assert cpu == "setup_env: torch 2.13.0+cpu, the CPU build: 0.8 GB installed"
    cuda = torch_size.describe([_dist("torch", "2.13.0", [1_500_000_000]), _dist("nvidia-cudnn-cu12", "9", [900_000_000]),
                                _dist("nvidia-cublas-cu12", "12", [3_000_000_000])])
    assert cuda.startswith("setup_env: torch 2.13.0, a CUDA build (2 nvidia-* libraries): 5.4 GB installed")
    assert "FSAM_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cuda
    assert torch_size.describe([]) == "setup_env: torch is not installed"
