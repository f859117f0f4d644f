"""Host time of a plain step (first_step + second_step, launches recorded instead of run) at
RoBERTa-large's 393 tensors, FSAM on Triton and native beside foreach dense SAM: part ``launches``
(see :mod:`benchmarks.host_time`). Runs in a child process, which sets ``TRITON_INTERPRET=1``."""
import json
import os
import subprocess
import sys

import pytest
import torch

from .harness import REPO_ROOT, Row

ROUNDS = 300


def test_host_step(plan, record):
    if "launches" not in plan.parts or plan.mode != "quick":
        pytest.skip("host_step: part launches in --quick only (a CPU measure; the GPU runs have their own budget)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-m", "benchmarks.host_time", "--json", "--rounds",
                          str(ROUNDS)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"benchmarks.host_time failed:\n{out.stderr[-3000:]}")
    rows = []
    for line in out.stdout.splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        t = r["times"]
        q = lambda f: t[min(len(t) - 1, int(f * len(t)))] * 1e3
        backend = r["method"].removeprefix("fsam-") if r["method"].startswith("fsam-") else "torch"
        rows.append(Row(op="host_step", method=r["method"], backend=backend, shapes=r["shapes"], size=r["size"],
                        n_tensors=r["n_tensors"], dtype="float32", p20_ms=q(0.2), p50_ms=q(0.5), p80_ms=q(0.8),
                        count=len(r["launches"]), rounds=len(t)).with_conditions(torch.device("cpu"), plan.mode))
    assert rows, out.stdout[-2000:]
    record(rows)
