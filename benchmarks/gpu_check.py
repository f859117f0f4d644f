"""The Python side of ``benchmarks/gpu_check.sh``: the machine's versions, which backends load, which
tests a stage must run, how they are spread over parallel pytest processes, and which of them failed
or never ran.

    python -m benchmarks.gpu_check env                                  # versions; last line: check: key=value...
    python -m benchmarks.gpu_check backends DEVICE                      # fails if native or triton is missing
    python -m benchmarks.gpu_check ids COLLECT_LOG [RERUN_FILE] > IDS   # node ids of `pytest --collect-only -q`
    python -m benchmarks.gpu_check split IDS N PREFIX                   # PREFIX0 .. PREFIX{N-1}
    python -m benchmarks.gpu_check report STAGE IDS RERUN_FILE PROGRESS...

As a pytest plugin (``-p benchmarks.gpu_check``) it appends one line per test phase to the file named by
``FSAM_CHECK_PROGRESS`` as the phase ends (and a ``start`` line as a test begins), so a pytest killed by
its stage's time limit still leaves what it finished: ``report`` then lists the failed tests, the one
each process was running when it was killed, and those never started, and appends them all to
RERUN_FILE (the input of ``FSAM_CHECK_RERUN``, to run just those again).
"""
from __future__ import annotations

import os
import random
import sys

SHOWN = 30  # node ids listed per kind in the summary; the rerun file has them all
GIB_PER_PROCESS = 20  # GPU memory one test process may hold (RoBERTa-large-sized cases, cached by torch)
MAX_PROCESSES = 4


# ---- the pytest plugin -------------------------------------------------------------------------

def _record(line: str) -> None:
    path = os.environ.get("FSAM_CHECK_PROGRESS")
    if path:
        with open(path, "a", encoding="utf-8") as f:  # opened per line: nothing buffered at a kill
            f.write(line + "\n")


def pytest_runtest_logstart(nodeid, location):
    _record(f"start {nodeid}")


def pytest_runtest_logreport(report):
    _record(f"{report.when} {report.outcome} {report.nodeid}")


# ---- reading and splitting ---------------------------------------------------------------------

def collected_ids(collect_output: str) -> list[str]:
    """The node ids in ``pytest --collect-only -q`` output, in order."""
    return [ln.strip() for ln in collect_output.splitlines() if "::" in ln and not ln.startswith(("=", " "))]


def select_rerun(ids: list[str], rerun: list[str] | None) -> list[str]:
    """``ids`` limited to those listed in ``rerun`` (all of them when there is no rerun list)."""
    if rerun is None:
        return ids
    wanted = set(rerun)
    return [i for i in ids if i in wanted]


def split(ids: list[str], n: int, seed: int = 0) -> list[list[str]]:
    """``n`` shards of about equal length, each a share of every test function's cases, in collection
    order. The ids are dealt in a shuffled order (the same for the same ids): dealt in collection order,
    a parameter that alternates (float32, bfloat16...) would send all of its slow cases to one shard."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    order = list(range(len(ids)))
    random.Random(seed).shuffle(order)
    return [[ids[i] for i in sorted(order[k::n])] for k in range(n)]


def outcomes(progress_lines: list[str]) -> tuple[dict[str, str], set[str]]:
    """({node id: passed | failed | skipped} for tests that finished, node ids started but not finished).

    A test finished once its teardown is recorded; it failed if any phase failed (an error in setup or
    teardown counts), else it was skipped if any phase was."""
    phases: dict[str, list[str]] = {}
    started: set[str] = set()
    done: set[str] = set()
    for line in progress_lines:
        parts = line.rstrip("\n").split(" ", 2)
        if len(parts) == 2 and parts[0] == "start":
            started.add(parts[1])
        elif len(parts) == 3 and parts[0] in ("setup", "call", "teardown"):
            when, outcome, nodeid = parts
            phases.setdefault(nodeid, []).append(outcome)
            if when == "teardown":
                done.add(nodeid)
    result = {}
    for nodeid in done:
        got = phases[nodeid]
        result[nodeid] = "failed" if "failed" in got else "skipped" if "skipped" in got else "passed"
    return result, started - done


def report(stage: str, ids: list[str], progress_lines: list[str]) -> tuple[str, list[str]]:
    """(the summary's text for one test stage, the node ids to run again: failed, killed, not run)."""
    result, running = outcomes(progress_lines)
    failed = [i for i in ids if result.get(i) == "failed"]
    killed = [i for i in ids if i in running]
    not_run = [i for i in ids if i not in result and i not in running]
    counts = {k: sum(1 for i in ids if result.get(i) == k) for k in ("passed", "skipped")}
    lines = [f"{stage}: {len(ids)} selected, {counts['passed']} passed, {len(failed)} failed, "
             f"{counts['skipped']} skipped, {len(killed)} running when stopped, {len(not_run)} not run"]
    for what, group in (("failed", failed), ("running when stopped", killed), ("not run", not_run)):
        lines += [f"  {what}: {i}" for i in group[:SHOWN]]
        if len(group) > SHOWN:
            lines.append(f"  {what}: ... and {len(group) - SHOWN} more (all in the rerun file)")
    return "\n".join(lines), failed + killed + not_run


# ---- the machine ------------------------------------------------------------------------------

def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or no metadata
        return "missing"


def processes_for(free_gib: float | None, cpus: int) -> int:
    """How many pytest processes a test stage runs at once: on a GPU, as many as its free memory holds
    at ``GIB_PER_PROCESS`` each (1 to ``MAX_PROCESSES``); on the CPU (the dry run, which exercises the
    split too), 2 where there are 2 cores."""
    if free_gib is None:
        return max(1, min(2, cpus))
    return max(1, min(MAX_PROCESSES, int(free_gib // GIB_PER_PROCESS)))


def env() -> int:
    import platform

    import torch

    print("python", platform.python_version(), sys.executable)
    for name in ("torch", "triton", "setuptools", "wheel", "ninja", "pytest", "pytest-timeout", "pytest-xdist",
                 "transformers", "numpy"):
        print(f"{name} {_version(name)}")
    print("torch.version.cuda", torch.version.cuda)
    cpus = os.cpu_count() or 1
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name(0)
        print(f"{name}: compute capability {major}.{minor}, {torch.cuda.get_device_properties(0).multi_processor_count} "
              f"SMs, {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
        gpu = name.lower().replace("nvidia ", "nvidia-").replace(" ", "-")
        fields = dict(gpu=gpu, cc=f"{major}{minor}", arch=f"{major}.{minor}", procs=processes_for(free / 2**30, cpus))
    else:
        print("no CUDA device")
        fields = dict(gpu="cpu", cc="none", arch="none", procs=processes_for(None, cpus))
    timeout = "no" if _version("pytest-timeout") == "missing" else "yes"
    print("check: " + " ".join(f"{k}={v}" for k, v in {**fields, "cpus": cpus, "timeout": timeout}.items()))
    return 0


def backends(device: str) -> int:
    """Which backends load and run on ``device``, and why the others do not; 1 when a compiled backend
    that must run there is missing (on CUDA native and triton, on the CPU native)."""
    import fsam_kernels
    from fsam_kernels.backends import backend_names, load_error

    have = fsam_kernels.available_backends(device)
    print(device, have)
    for n in backend_names():
        print(n, "->", load_error(n) or "loaded")
    try:
        import fsam_kernels._C as C

        print("native extension:", {k: getattr(C, k, None) for k in ("with_cuda", "cuda_build", "cuda_archs",
                                                                      "torch_version")})
    except ImportError as exc:
        print("native extension: not importable:", exc)
    need = ["native", "triton"] if device == "cuda" else ["native"]
    missing = [n for n in need if n not in have]
    if missing:
        print(f"FAILED: {missing} cannot run on {device}")
        return 1
    return 0


def _read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [ln.rstrip("\n") for ln in f if ln.strip()]


def main(argv: list[str]) -> int:
    cmd, args = (argv[0], argv[1:]) if argv else ("help", [])
    if cmd == "env":
        return env()
    if cmd == "backends":
        return backends(args[0])
    if cmd == "ids":
        with open(args[0], encoding="utf-8") as f:
            ids = collected_ids(f.read())
        rerun = _read_lines(args[1]) if len(args) > 1 and args[1] else None
        print("\n".join(select_rerun(ids, rerun)))
        return 0 if ids else 1
    if cmd == "split":
        ids, n, prefix = _read_lines(args[0]), int(args[1]), args[2]
        for k, shard in enumerate(split(ids, n)):
            with open(f"{prefix}{k}", "w", encoding="utf-8") as f:
                f.write("".join(i + "\n" for i in shard))
        return 0
    if cmd == "report":
        stage, ids, rerun_file = args[0], _read_lines(args[1]), args[2]
        progress = [ln for p in args[3:] for ln in _read_lines(p)]
        text, again = report(stage, ids, progress)
        print(text)
        with open(rerun_file, "a", encoding="utf-8") as f:
            f.write("".join(i + "\n" for i in again))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
