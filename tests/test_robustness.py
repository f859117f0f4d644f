"""Nothing corrupts silently: parameters sharing memory, storage replaced between the two passes,
options changed mid-run, numbers of other types — on every backend.

Each case (see robustness_cases.py) asserts an exact outcome: restored bit for bit, or refused with a
message naming the culprit and every weight and optimizer state tensor unchanged. The torch and native
backends run the cases here, except the storage swaps, which run in a child process (a write through a
stale pointer crashes it, and fails those cases only). The Triton backend runs every case in a child
process under TRITON_INTERPRET=1, which must be set before its kernels are imported.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fsam_kernels import available_backends

from helpers import TESTS_DIR, child_env
from robustness_cases import CASES, STORAGE_SWAP

ROOT = Path(__file__).resolve().parents[1]
IN_PROCESS = [name for name in CASES if name not in STORAGE_SWAP]


@functools.lru_cache(maxsize=None)
def _child_results(backend: str, names: tuple[str, ...]) -> tuple[dict, str]:
    env = child_env()
    if backend == "triton":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "robustness_cases.py"), backend, *names], cwd=TESTS_DIR,
                          env=env, capture_output=True, text=True, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            r = json.loads(line[5:])
            results[r["case"]] = r
    return results, f"exit status {proc.returncode}; stderr:\n{proc.stderr[-4000:]}"


def _run_in_child(backend: str, names: list[str], name: str) -> None:
    results, how = _child_results(backend, tuple(names))
    if name not in results:
        pytest.fail(f"{name} on {backend}: the child process died before reporting it ({how})")
    if not results[name]["ok"]:
        pytest.fail(f"{name} on {backend}:\n{results[name]['error']}")


def _require_triton() -> None:
    pytest.importorskip("triton")
    from fsam_kernels.backends.triton_backend import triton_problem

    problem = triton_problem()
    if problem is not None:
        pytest.skip(problem)


def _require(backend: str) -> None:
    if backend not in available_backends("cpu"):
        pytest.skip(f"the {backend} backend does not run on this machine's CPU")


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("name", IN_PROCESS)
def test_case(name, backend):
    _require(backend)
    CASES[name](backend)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
@pytest.mark.parametrize("name", STORAGE_SWAP)
def test_storage_swap_in_child(name, backend):
    if backend == "triton":
        _require_triton()
    else:
        _require(backend)
    _run_in_child(backend, STORAGE_SWAP, name)


@pytest.mark.parametrize("name", IN_PROCESS)
def test_case_triton_interpreted_in_child(name):
    _require_triton()
    _run_in_child("triton", IN_PROCESS, name)
