"""Timing, environment and result rows shared by every benchmark.

A row is one measurement: ``op`` (what), ``method`` (whose implementation), ``backend``, the parameter
set, its size and dtype, p20/p50/p80 milliseconds, effective GB/s, a byte count, an event count, and
the conditions (device, versions, commit). Rows are appended to a CSV; :mod:`benchmarks.plot` and the
README tables read nothing else.

Column meanings that depend on ``op``:

* timed ops (``fisher_accumulate``, ``select_mask``, ``norm_perturb``, ``restore``, ``e2e_*``):
  ``bytes`` is the least memory traffic of the op as the method defines it; ``gbps = bytes / p50``.
* ``state_bytes`` / ``saved_bytes`` / ``peak_extra_bytes``: the value is in ``bytes`` (no timing).
* ``launches`` (CUDA kernels) / ``aten_ops`` (CPU, top-level ATen ops): the value is in ``count``.
"""
from __future__ import annotations

import csv
import functools
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- conditions
@functools.lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """Short commit of the working tree ('+dirty' when it has changes); FSAM_COMMIT overrides."""
    if os.environ.get("FSAM_COMMIT"):
        return os.environ["FSAM_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=None)
def versions() -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = ""
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda or ""}


# --------------------------------------------------------------------------- rows
@dataclass
class Row:
    op: str
    method: str
    backend: str
    shapes: str
    size: int
    n_tensors: int
    dtype: str
    p20_ms: float = float("nan")
    p50_ms: float = float("nan")
    p80_ms: float = float("nan")
    gbps: float = float("nan")
    bytes: int = 0
    count: int = 0
    rounds: int = 0
    mode: str = ""
    device: str = ""
    device_name: str = ""
    torch: str = ""
    triton: str = ""
    cuda: str = ""
    commit: str = ""
    time_utc: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def with_conditions(self, device: torch.device, mode: str) -> "Row":
        self.mode, self.device, self.device_name = mode, device.type, device_name(device)
        v = versions()
        self.torch, self.triton, self.cuda = v["torch"], v["triton"], v["cuda"]
        self.commit = commit()
        return self


COLUMNS = [f.name for f in fields(Row)]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def append_rows(path: Path, rows: list[Row]) -> None:
    """Append rows to a CSV, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV with numbers parsed (missing values become NaN)."""
    numeric_float = {"p20_ms", "p50_ms", "p80_ms", "gbps"}
    numeric_int = {"size", "n_tensors", "bytes", "count", "rounds"}
    out = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            for k in numeric_float:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else float("nan")
            for k in numeric_int:
                r[k] = int(float(r[k])) if r.get(k) not in (None, "") else 0
            out.append(r)
    return out


# --------------------------------------------------------------------------- timing
class _CudaStamp:
    """A point on the GPU's timeline; the difference of two stamps is seconds of device time."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, other: "_CudaStamp") -> float:
        self.event.synchronize()
        return other.event.elapsed_time(self.event) / 1e3


def cuda_event_timer() -> _CudaStamp:
    """Timer for pytest-benchmark on CUDA: stamps are CUDA events, so a round is timed on the device
    (launch overhead included, host work overlapping the GPU not counted twice)."""
    return _CudaStamp()


def timer_for(device: torch.device) -> Callable[[], Any]:
    return cuda_event_timer if device.type == "cuda" else time.perf_counter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rounds(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    rounds: int,
    warmup: int,
    setup: Optional[Callable[[], Any]] = None,
    teardown: Optional[Callable[[], Any]] = None,
    pedantic: Optional[Callable[..., Any]] = None,
) -> list[float]:
    """Seconds per round of ``fn`` (``setup``/``teardown`` run untimed around each round).

    With ``pedantic`` (pytest-benchmark's ``benchmark.pedantic``) pytest-benchmark runs the rounds with
    the timer of its ``benchmark`` marker and the times are read back from its stats; without it the
    same schedule runs here with :func:`timer_for`.
    """

    def _setup():
        if setup is not None:
            setup()
        synchronize(device)  # nothing from the setup may leak into the timed region

    def _teardown(*_args, **_kwargs):
        if teardown is not None:
            teardown()

    if pedantic is not None:
        bench = pedantic.__self__
        pedantic(fn, setup=_setup, teardown=_teardown, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return list(bench.stats.stats.data)
    timer = timer_for(device)
    times = []
    for i in range(warmup + rounds):
        _setup()
        start = timer()
        fn()
        end = timer()
        _teardown()
        if i >= warmup:
            times.append(float(end - start))
    return times


def percentiles_ms(times_s: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 in milliseconds (inclusive quantiles; a single round gives it three times)."""
    ms = sorted(t * 1e3 for t in times_s)
    if len(ms) == 1:
        return ms[0], ms[0], ms[0]
    q = statistics.quantiles(ms, n=10, method="inclusive")
    return q[1], statistics.median(ms), q[7]


def timed_row(row: Row, times_s: list[float], bytes_moved: int) -> Row:
    row.p20_ms, row.p50_ms, row.p80_ms = percentiles_ms(times_s)
    row.rounds = len(times_s)
    row.bytes = int(bytes_moved)
    row.gbps = bytes_moved / (row.p50_ms * 1e-3) / 1e9 if row.p50_ms > 0 and bytes_moved else float("nan")
    return row
