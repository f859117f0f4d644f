"""Run the benchmarks and append their rows to a CSV under benchmarks/results/.

    python benchmarks/run.py --quick          # small sizes, any machine (about three minutes on 2 CPU cores)
    python benchmarks/run.py --full           # real model sizes, on a GPU
    python benchmarks/run.py --quick --parts ops,memory --csv /tmp/x.csv

Every backend that ``fsam_kernels.available_backends(device)`` lists is measured, next to the
baselines of benchmarks/baselines.py. pytest-benchmark times the rounds (``benchmarks/bench_*.py``);
this script only chooses the options and prints a summary of the rows it added.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/run.py` puts benchmarks/, not the root, on the path
    sys.path.insert(0, str(REPO_ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_const", const="quick", dest="mode", help="small sizes (default)")
    size.add_argument("--full", action="store_const", const="full", dest="mode", help="real model sizes (GPU)")
    size.add_argument("--tiny", action="store_const", const="tiny", dest="mode",
                      help="toy sizes, one round: checks the plumbing, measures nothing useful")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--csv", default=None, help="CSV to append to (default: benchmarks/results/<device>-<mode>.csv)")
    ap.add_argument("--parts", default="e2e,launches,memory,ops", help="comma-separated: ops, memory, launches, e2e")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds; cases that would start later are skipped")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's choice; 1 is steadier on a busy machine)")
    ap.add_argument("-k", default=None, help="pytest -k expression to select cases")
    args, extra = ap.parse_known_args(argv)
    mode = args.mode or "quick"

    import pytest
    import torch

    from benchmarks.harness import RESULTS_DIR, read_rows

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    csv = Path(args.csv) if args.csv else RESULTS_DIR / f"{device}-{mode}.csv"
    before = len(read_rows(csv)) if csv.exists() else 0
    pytest_args = [
        str(REPO_ROOT / "benchmarks"), "-p", "no:cacheprovider", "-q", "-s", "--benchmark-quiet",
        "--rootdir", str(REPO_ROOT), "-W", "ignore::DeprecationWarning",
        f"--fsam-mode={mode}", f"--fsam-device={device}", f"--fsam-csv={csv}", f"--fsam-parts={args.parts}",
        f"--fsam-budget={args.budget}", f"--fsam-threads={args.threads}",
    ]
    if args.k:
        pytest_args += ["-k", args.k]
    start = time.monotonic()
    rc = pytest.main(pytest_args + extra)
    rows = read_rows(csv)[before:] if csv.exists() else []
    print(f"\n{len(rows)} rows appended to {csv} in {time.monotonic() - start:.0f} s")
    _summary(rows)
    return int(rc)


def _summary(rows) -> None:
    timed = [r for r in rows if r["p50_ms"] == r["p50_ms"]]  # not NaN
    if not timed:
        return
    print(f"{'op':<20} {'method':<16} {'shapes':<26} {'dtype':<14} {'p50 ms':>10} {'GB/s':>8}")
    for r in timed:
        print(f"{r['op']:<20} {r['method']:<16} {r['shapes']:<26} {r['dtype']:<14} {r['p50_ms']:>10.3f} {r['gbps']:>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
