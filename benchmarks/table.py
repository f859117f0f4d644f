"""Markdown tables from a benchmark CSV (what docs/benchmarks.md shows).

    python benchmarks/table.py benchmarks/results/cpu-quick.csv [--shapes roberta-large/8] [--dtype float32]

Per-op p50 ms (method x op) on one parameter set, end-to-end step times, bytes per parameter, and
(when the CSV has the rows, i.e. from a GPU run) each FSAM backend against the GPU targets.
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
        out.append(f"**{model}**\n\n| method | step p50 ms (p20-p80) | with mask updates, amortized | "
                   "optimizer p50 ms | x AdamW |\n|---|---:|---:|---:|---:|")
        for m in dict.fromkeys(r["method"] for r in mine):
            step = [r for r in mine if r["method"] == m and r["op"] == "e2e_step"]
            am = [r for r in mine if r["method"] == m and r["op"] == "e2e_step_amortized"]
            opt = [r for r in mine if r["method"] == m and r["op"] == "e2e_optimizer"]  # CPU runs only
            if not step:
                continue
            s = step[-1]
            shown = am[-1]["p50_ms"] if am else s["p50_ms"]
            out.append(f"| {m} | {_ms(s['p50_ms'])} ({_ms(s['p20_ms'])}-{_ms(s['p80_ms'])}) | "
                       f"{_ms(am[-1]['p50_ms']) if am else '-'} | {_ms(opt[-1]['p50_ms']) if opt else '-'} | "
                       f"{shown / base_ms:.2f} |")
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


# The targets for 355M fp32 parameters at 10 % kept (RoBERTa-large), from the Triton backend's issue.
FISHER_MIN_COPY_FRACTION = 0.90
MASK_MAX_MS = 1.0
MASK_MAX_EXTRA_BYTES = 64e6
PERTURB_RESTORE_MAX_MS = 1.5
E2E_MAX_VS_SAM = 0.98


def _last(rows, op, method, shapes=None, dtype=None):
    hit = [r for r in rows if r["op"] == op and r["method"] == method and (shapes is None or r["shapes"] == shapes)
           and (dtype is None or r["dtype"] == dtype)]
    return hit[-1] if hit else None


def _verdict(value, ok: bool, text: str) -> str:
    return "-" if value is None else f"{text} ({'met' if ok else 'missed'})"


def targets_table(rows, shapes: str, dtype: str = "float32", e2e_model: str = "roberta-large") -> str:
    """One line per FSAM backend: each target, the measured value and whether it is met ("" if the
    CSV lacks the rows, e.g. a CPU run without device-memory counters)."""
    backends = list(dict.fromkeys(r["method"] for r in rows if r["method"].startswith("fsam[")
                                  and r["shapes"] == shapes and r["dtype"] == dtype))
    if not backends:
        return ""
    copy = _last(rows, "copy", "device_copy", shapes, dtype)
    e2e_sam = {m: _last([r for r in rows if r["shapes"].startswith(e2e_model + " ")], "e2e_step", m)
               for m in ("sam_loop", "sam_foreach")}
    lines = [
        f"| backend | Fisher GB/s, % of copy (>= {FISHER_MIN_COPY_FRACTION:.0%}) | mask ms (<= {MASK_MAX_MS:g}) "
        f"| mask extra MB (<= {MASK_MAX_EXTRA_BYTES / 1e6:g}) | perturb + restore ms (<= {PERTURB_RESTORE_MAX_MS:g}) "
        f"| step x SAM loop / foreach (<= {E2E_MAX_VS_SAM:g}) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in backends:
        cells = []
        fisher = _last(rows, "fisher_accumulate", m, shapes, dtype)
        if fisher and copy and copy["gbps"] == copy["gbps"]:
            frac = fisher["gbps"] / copy["gbps"]
            cells.append(_verdict(frac, frac >= FISHER_MIN_COPY_FRACTION, f"{fisher['gbps']:.0f}, {frac:.0%}"))
        else:
            cells.append("-")
        mask = _last(rows, "select_mask", m, shapes, dtype)
        cells.append(_verdict(mask, mask is not None and mask["p50_ms"] <= MASK_MAX_MS,
                              _ms(mask["p50_ms"]) if mask else ""))
        extra = _last(rows, "mask_peak_extra_bytes", m, shapes, dtype)
        cells.append(_verdict(extra, extra is not None and extra["bytes"] <= MASK_MAX_EXTRA_BYTES,
                              f"{extra['bytes'] / 1e6:.1f}" if extra else ""))
        pert, rest = _last(rows, "norm_perturb", m, shapes, dtype), _last(rows, "restore", m, shapes, dtype)
        both = pert["p50_ms"] + rest["p50_ms"] if pert and rest else None
        cells.append(_verdict(both, both is not None and both <= PERTURB_RESTORE_MAX_MS, _ms(both) if both else ""))
        step = _last([r for r in rows if r["shapes"].startswith(e2e_model + " ")], "e2e_step_amortized", m)
        ratios = [step["p50_ms"] / s["p50_ms"] if step and s else None for s in e2e_sam.values()]
        if all(x is None for x in ratios):
            cells.append("-")
        else:
            text = " / ".join("-" if x is None else f"{x:.2f}" for x in ratios)
            cells.append(_verdict(text, all(x is not None and x <= E2E_MAX_VS_SAM for x in ratios), text))
        lines.append(f"| {m} | {' | '.join(cells)} |")
    return "\n".join(lines)


def backend_ranking(rows, shapes: str, dtype: str = "float32", e2e_model: str = "roberta-large") -> str:
    """Which compiled backend was faster (what ``AUTO_ORDER`` should say for this device): by the
    amortized end-to-end step when measured, else by the sum of the per-op p50s."""
    names = [m for m in dict.fromkeys(r["method"] for r in rows) if m in ("fsam[triton]", "fsam[native]")]
    if len(names) < 2:
        return ""
    e2e = [r for r in rows if r["shapes"].startswith(e2e_model + " ")]
    steps = {m: _last(e2e, "e2e_step_amortized", m) for m in names}
    if all(steps.values()):
        cost = {m: steps[m]["p50_ms"] for m in names}
        basis = f"amortized {e2e_model} step, ms"
    else:
        per_op = {m: [_last(rows, op, m, shapes, dtype) for op in OPS] for m in names}
        if not all(all(v) for v in per_op.values()):
            return ""
        cost = {m: sum(r["p50_ms"] for r in per_op[m]) for m in names}
        basis = f"sum of the 4 ops' p50, {shapes} {dtype}, ms"
    order = sorted(names, key=lambda m: cost[m])
    return f"faster first ({basis}): " + ", ".join(f"{m[5:-1]} {_ms(cost[m])}" for m in order)


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
    tt = targets_table(rows, shapes, args.dtype)
    if tt:
        print(f"Targets, {shapes}, {args.dtype} (one GPU run; p50 of the timed rounds):\n\n{tt}\n")
    ranking = backend_ranking(rows, shapes, args.dtype)
    if ranking:
        print(f"Backends, {ranking}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
