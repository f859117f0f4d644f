"""Markdown tables from a benchmark CSV (what the README's benchmark section shows).

    python benchmarks/table.py benchmarks/results/cpu-quick.csv [--shapes roberta-large/8] [--dtype float32]

Per-op p50 ms (method x op) on one parameter set, end-to-end step times, and bytes per parameter.
The last row of each (op, method, shapes, dtype, device) counts, as in the plots.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OPS = ("fisher_accumulate", "select_mask", "norm_perturb", "restore")


def _ms(v: float) -> str:
    return "" if v != v else (f"{v:.3f}" if v < 10 else f"{v:.1f}")


def ops_table(rows, shapes: str, dtype: str) -> str:
    sel = [r for r in rows if r["shapes"] == shapes and r["dtype"] == dtype and r["op"] in OPS]
    methods = list(dict.fromkeys(r["method"] for r in sel))
    head = f"| method | {' | '.join(OPS)} |\n|---|{'---:|' * len(OPS)}\n"
    lines = []
    for m in methods:
        cells = []
        for op in OPS:
            hit = [r for r in sel if r["method"] == m and r["op"] == op]
            cells.append(_ms(hit[-1]["p50_ms"]) if hit else "-")
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return head + "\n".join(lines)


def e2e_table(rows) -> str:
    sel = [r for r in rows if r["op"].startswith("e2e_")]
    models = list(dict.fromkeys(r["shapes"] for r in sel))
    out = []
    for model in models:
        mine = [r for r in sel if r["shapes"] == model]
        base = [r for r in mine if r["method"] == "adamw" and r["op"] == "e2e_step"]
        base_ms = base[-1]["p50_ms"] if base else float("nan")
        out.append(f"**{model}**\n\n| method | step p50 ms (p20-p80) | with mask updates, amortized | x AdamW |\n|---|---:|---:|---:|")
        for m in dict.fromkeys(r["method"] for r in mine):
            step = [r for r in mine if r["method"] == m and r["op"] == "e2e_step"]
            am = [r for r in mine if r["method"] == m and r["op"] == "e2e_step_amortized"]
            if not step:
                continue
            s = step[-1]
            shown = am[-1]["p50_ms"] if am else s["p50_ms"]
            out.append(f"| {m} | {_ms(s['p50_ms'])} ({_ms(s['p20_ms'])}-{_ms(s['p80_ms'])}) | "
                       f"{_ms(am[-1]['p50_ms']) if am else '-'} | {shown / base_ms:.2f} |")
        out.append("")
    return "\n".join(out)


def memory_table(rows, shapes: str) -> str:
    kinds = ("state_bytes", "saved_bytes", "peak_extra_bytes")
    sel = [r for r in rows if r["shapes"] == shapes and r["op"] in kinds and r["size"] > 0]
    measured = {r["method"] for r in sel if r["op"] == "state_bytes"}  # the memory part's methods only
    sel = [r for r in sel if r["method"] in measured]
    present = [k for k in kinds if any(r["op"] == k for r in sel)]
    keys = list(dict.fromkeys((r["method"], r["dtype"]) for r in sel))
    head = f"| method | dtype | {' | '.join(k.replace('_bytes', ' B/param') for k in present)} |\n|---|---|{'---:|' * len(present)}\n"
    lines = []
    for m, d in keys:
        cells = []
        for k in present:
            hit = [r for r in sel if r["method"] == m and r["dtype"] == d and r["op"] == k]
            cells.append(f"{hit[-1]['bytes'] / hit[-1]['size']:.3f}" if hit else "-")
        lines.append(f"| {m} | {d} | {' | '.join(cells)} |")
    return head + "\n".join(lines)


def launches_table(rows) -> str:
    sel = [r for r in rows if r["op"].startswith(("launches_", "aten_ops_"))]
    if not sel:
        return ""
    kind = "CUDA kernels" if sel[0]["op"].startswith("launches") else "top-level ATen ops (CPU)"
    methods = list(dict.fromkeys(r["method"] for r in sel))
    lines = [f"| method | {kind} per step | per mask update |", "|---|---:|---:|"]
    for m in methods:
        step = [r["count"] for r in sel if r["method"] == m and r["op"].endswith("_step")]
        upd = [r["count"] for r in sel if r["method"] == m and r["op"].endswith("_mask_update")]
        lines.append(f"| {m} | {step[-1] if step else '-'} | {upd[-1] if upd else '-'} |")
    return f"({sel[0]['shapes']}, {sel[0]['dtype']})\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    from benchmarks.harness import read_rows
    from benchmarks.plot import latest

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--shapes", default=None, help="parameter set of the per-op and memory tables (default: the largest model-shaped one)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    rows = latest(read_rows(args.csv))
    op_rows = [r for r in rows if r["op"] in OPS]
    model_sets = [r for r in op_rows if not r["shapes"].startswith("sweep")] or op_rows
    shapes = args.shapes or (max(model_sets, key=lambda r: r["size"])["shapes"] if model_sets else "")
    print(f"Per op, p50 ms, {shapes}, {args.dtype}:\n\n{ops_table(rows, shapes, args.dtype)}\n")
    print(f"End to end:\n\n{e2e_table(rows)}")
    print(f"Memory held, bytes per parameter, {shapes}:\n\n{memory_table(rows, shapes)}\n")
    lt = launches_table(rows)
    if lt:
        print(f"Launches:\n\n{lt}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
