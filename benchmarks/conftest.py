"""pytest plumbing of the benchmarks: options, the parameter grid, shared workloads, the CSV sink,
a time budget and a progress bar. ``benchmarks/run.py`` is the usual entry point.

Options: ``--fsam-mode quick|full|tiny``, ``--fsam-device cpu|cuda`` (default: cuda when available),
``--fsam-csv PATH``, ``--fsam-budget SECONDS`` (tests starting after it are skipped, so a time-limited
run still writes whole rows), ``--fsam-parts ops,memory,launches,e2e``, ``--fsam-threads N`` (torch
CPU threads; 1 gives steadier numbers on a shared machine, where OpenMP threads contend).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from .harness import RESULTS_DIR, append_rows, cuda_event_timer
from .ops import benchmark_backends
from .plan import Plan

PARTS = ("ops", "memory", "launches", "e2e")


def pytest_addoption(parser):
    group = parser.getgroup("fsam benchmarks")
    group.addoption("--fsam-mode", default="quick", choices=("quick", "full", "tiny"))
    group.addoption("--fsam-device", default=None, help="cpu or cuda (default: cuda when available)")
    group.addoption("--fsam-csv", default=None, help="CSV to append rows to (default: results/<device>-<mode>.csv)")
    group.addoption("--fsam-budget", type=float, default=0.0, help="seconds; skip tests that would start later")
    group.addoption("--fsam-parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    group.addoption("--fsam-threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")


def pytest_configure(config):
    threads = config.getoption("--fsam-threads", default=0)
    if threads:
        torch.set_num_threads(threads)


def _plan(config) -> Plan:
    if not hasattr(config, "_fsam_plan"):
        dev = config.getoption("--fsam-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(dev)
        mode = config.getoption("--fsam-mode")
        parts = tuple(p for p in config.getoption("--fsam-parts").split(",") if p)
        unknown = set(parts) - set(PARTS)
        if unknown:
            raise pytest.UsageError(f"--fsam-parts: unknown part(s) {sorted(unknown)}; expected some of {PARTS}")
        csv = config.getoption("--fsam-csv") or RESULTS_DIR / f"{device.type}-{mode}.csv"
        config._fsam_plan = Plan(mode=mode, device=device, backends=benchmark_backends(device), parts=parts,
                                 csv=Path(csv))
        config._fsam_start = time.monotonic()
    return config._fsam_plan


def pytest_collect_file(file_path, parent):
    # bench_*.py are collected here, whatever python_files says, so `pytest benchmarks` runs them
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    plan = _plan(metafunc.config)
    for fixture, cases in (("op_case", plan.op_cases), ("memory_case", plan.memory_cases),
                           ("launch_case", plan.launch_cases), ("e2e_case", plan.e2e_cases)):
        if fixture in metafunc.fixturenames:
            items = cases()
            metafunc.parametrize(fixture, items, ids=[c.id for c in items])


def pytest_collection_modifyitems(config, items):
    if _plan(config).device.type == "cuda":
        for item in items:
            item.add_marker(pytest.mark.benchmark(timer=cuda_event_timer))


@pytest.fixture(scope="session")
def plan(request) -> Plan:
    return _plan(request.config)


@pytest.fixture(scope="session")
def record(plan):
    """``record(rows)`` appends rows to the run's CSV at once (a killed run keeps what it measured)."""

    def _record(rows):
        append_rows(plan.csv, list(rows))

    return _record


@pytest.fixture(autouse=True)
def _time_budget(request):
    budget = request.config.getoption("--fsam-budget")
    if budget and time.monotonic() - request.config._fsam_start > budget:
        pytest.skip(f"time budget of {budget:.0f} s spent")


# --------------------------------------------------------------------------- progress bar
def pytest_collection_finish(session):
    try:
        from tqdm import tqdm
    except ImportError:
        return
    if session.config.getoption("collectonly"):
        return
    session.config._fsam_bar = tqdm(total=len(session.items), desc="benchmarks", unit="case", leave=True)


def pytest_runtest_logreport(report):
    if report.when == "call" and report.failed:
        import sys

        sys.stderr.write(f"\nFAILED {report.nodeid}\n{report.longreprtext[-3000:]}\n")


def pytest_runtest_logfinish(nodeid, location):
    import gc

    gc.collect()  # large workloads of finished cases must not pile up


def pytest_runtest_teardown(item):
    bar = getattr(item.config, "_fsam_bar", None)
    if bar is not None:
        bar.set_postfix_str(item.callspec.id[:60] if hasattr(item, "callspec") else item.name, refresh=False)
        bar.update(1)


def pytest_sessionfinish(session):
    bar = getattr(session.config, "_fsam_bar", None)
    if bar is not None:
        bar.close()
