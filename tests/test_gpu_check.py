"""The GPU check's bookkeeping (benchmarks/gpu_check.py): a stage stopped by its time limit must still
say which tests failed, which one each process was running, and which never started."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parents[1]
TESTS = """
import pytest

def test_pass():
    pass

def test_fail():
    assert 0

def test_skip():
    pytest.skip("not here")

@pytest.fixture
def broken():
    raise RuntimeError("setup")

def test_setup_error(broken):
    pass

@pytest.mark.parametrize("x", ["a b", "c::d"])
def test_odd_ids(x):
    pass
"""


def test_split_deals_every_id_once_in_balanced_shards():
    ids = [f"t::{i:03d}" for i in range(101)]
    shards = gc.split(ids, 3)
    assert sorted(i for s in shards for i in s) == ids
    assert [len(s) for s in shards] == [34, 34, 33] and all(s == sorted(s) for s in shards)
    assert gc.split(ids, 3) == shards  # the same ids, the same shards (a rerun reproduces them)
    # a parameter that alternates (every second case slow) is spread, not dealt to one shard
    slow_per_shard = [sum(int(i[-3:]) % 2 for i in s) for s in gc.split(ids, 2)]
    assert min(slow_per_shard) >= 20, slow_per_shard
    assert len(gc.split(ids, 200)) == 200
    with pytest.raises(ValueError, match="n must be at least 1"):
        gc.split(ids, 0)


def test_report_lists_failed_running_and_not_started_tests():
    ids = ["a::ok", "a::bad", "a::setup_err", "a::skipped", "a::killed", "a::never"]
    progress = [
        "start a::ok", "setup passed a::ok", "call passed a::ok", "teardown passed a::ok",
        "start a::bad", "setup passed a::bad", "call failed a::bad", "teardown passed a::bad",
        "start a::setup_err", "setup failed a::setup_err", "teardown passed a::setup_err",
        "start a::skipped", "setup skipped a::skipped", "teardown passed a::skipped",
        "start a::killed", "setup passed a::killed",
    ]
    text, again = gc.report("triton", ids, progress)
    assert text.splitlines()[0] == ("triton: 6 selected, 1 passed, 2 failed, 1 skipped, 1 running when stopped, "
                                    "1 not run")
    assert "  failed: a::bad" in text and "  failed: a::setup_err" in text
    assert "  running when stopped: a::killed" in text and "  not run: a::never" in text
    assert again == ["a::bad", "a::setup_err", "a::killed", "a::never"]


def test_report_shortens_long_lists_and_the_rerun_list_keeps_all():
    ids = [f"t::{i}" for i in range(gc.SHOWN + 5)]
    text, again = gc.report("native", ids, [])
    assert "not run: ... and 5 more" in text
    assert text.count("  not run: t::") == gc.SHOWN and again == ids


def test_rerun_list_selects_from_the_collected_ids_in_their_order():
    ids = ["x::1", "x::2", "x::3"]
    assert gc.select_rerun(ids, None) == ids
    assert gc.select_rerun(ids, ["x::3", "other::9", "x::1"]) == ["x::1", "x::3"]


@pytest.mark.parametrize("free_gib, cpus, want", [(78.0, 16, 3), (139.0, 16, 4), (15.0, 16, 1), (None, 2, 2),
                                                  (None, 1, 1)])
def test_test_processes_fit_the_gpu_memory(free_gib, cpus, want):
    assert gc.processes_for(free_gib, cpus) == want


def test_plugin_records_each_test_as_it_ends(tmp_path):
    # a real pytest run with the plugin, from the collected ids (odd parametrize ids included)
    (tmp_path / "test_demo.py").write_text(TESTS)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FSAM_CHECK_PROGRESS": str(tmp_path / "progress")}
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q"]
    collect = subprocess.run(base + ["--collect-only"], cwd=tmp_path, env=env, capture_output=True, text=True)
    ids = gc.collected_ids(collect.stdout)
    assert len(ids) == 6 and "test_demo.py::test_odd_ids[c::d]" in ids, collect.stdout
    run = subprocess.run(base + ["-p", "benchmarks.gpu_check"] + ids[:-1], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    result, running = gc.outcomes((tmp_path / "progress").read_text().splitlines())
    assert running == set()
    assert result == {"test_demo.py::test_pass": "passed", "test_demo.py::test_fail": "failed",
                      "test_demo.py::test_skip": "skipped", "test_demo.py::test_setup_error": "failed",
                      "test_demo.py::test_odd_ids[a b]": "passed"}
    _, again = gc.report("demo", ids, (tmp_path / "progress").read_text().splitlines())
    assert again == ["test_demo.py::test_fail", "test_demo.py::test_setup_error", "test_demo.py::test_odd_ids[c::d]"]


def test_gpu_check_needs_a_call_and_a_folder():
    for args in ([], ["tests", "/tmp/x"], ["test"]):
        r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True, text=True)
        assert r.returncode == 2 and "usage: bash benchmarks/gpu_check.sh test|bench OUTPUT_FOLDER" in r.stderr
