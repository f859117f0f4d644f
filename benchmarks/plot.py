"""PNG figures from a benchmark CSV: time per op vs parameters, memory per method, end-to-end steps.

    python benchmarks/plot.py benchmarks/results/cpu-quick.csv            # PNGs next to the CSV
    python benchmarks/plot.py results.csv --out figures/ --dtype bfloat16

When a CSV holds several runs, the last row of each (op, method, shapes, dtype, device) is drawn.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OPS = ("fisher_accumulate", "select_mask", "norm_perturb", "restore")


def latest(rows):
    last = {}
    for r in rows:
        last[(r["op"], r["method"], r["shapes"], r["dtype"], r["device_name"])] = r
    return list(last.values())


_COLORS: dict[str, str] = {}


def _color(method: str) -> str:
    # one colour per method in every figure
    if method not in _COLORS:
        palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                   "tab:gray", "tab:olive", "tab:cyan"]
        _COLORS[method] = palette[len(_COLORS) % len(palette)]
    return _COLORS[method]


def _style(method: str) -> dict:
    fsam = method.startswith("fsam[")
    return {"linestyle": "-" if fsam else "--", "marker": "o" if fsam else "s", "color": _color(method)}


def plot_ops(rows, dtype: str, path: Path) -> bool:
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["op"] in OPS and r["dtype"] == dtype and r["p50_ms"] == r["p50_ms"]]
    if not sel:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, op in zip(axes.flat, OPS):
        mine = [r for r in sel if r["op"] == op]
        for method in sorted({r["method"] for r in mine}):
            pts = sorted((r["size"], r["p50_ms"], r["shapes"]) for r in mine if r["method"] == method)
            sweep = [(s, t) for s, t, name in pts if name.startswith("sweep")]
            models = [(s, t) for s, t, name in pts if not name.startswith("sweep")]
            line = None
            if sweep:
                line, = ax.plot(*zip(*sweep), label=method, **_style(method))
            if models:
                ax.scatter(*zip(*models), marker="*", s=90, color=_color(method), label=None if line else method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("parameters (lines: size sweep; stars: model-shaped sets)")
        ax.set_ylabel("p50 time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        if mine:
            ax.legend(fontsize=7)
    fig.suptitle(f"Time per op, {dtype} - {sel[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_memory(rows, path: Path) -> bool:
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["op"] in ("state_bytes", "saved_bytes", "peak_extra_bytes") and r["size"] > 0]
    measured = {r["method"] for r in sel if r["op"] == "state_bytes"}  # the memory part's methods only
    sel = [r for r in sel if r["method"] in measured]
    if not sel:
        return False
    biggest = max(sel, key=lambda r: r["size"])["shapes"]
    sel = [r for r in sel if r["shapes"] == biggest]
    dtypes = sorted({r["dtype"] for r in sel})
    kinds = [k for k in ("state_bytes", "saved_bytes", "peak_extra_bytes") if any(r["op"] == k for r in sel)]
    methods = sorted({r["method"] for r in sel})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    width = 0.8 / len(kinds)
    for ax, dtype in zip(axes.flat, dtypes):
        for i, kind in enumerate(kinds):
            vals = []
            for m in methods:
                hit = [r for r in sel if r["dtype"] == dtype and r["method"] == m and r["op"] == kind]
                vals.append(hit[-1]["bytes"] / hit[-1]["size"] if hit else 0.0)
            ax.bar([x + i * width for x in range(len(methods))], vals, width, label=kind.replace("_", " "))
        ax.set_xticks([x + width * (len(kinds) - 1) / 2 for x in range(len(methods))])
        ax.set_xticklabels(methods, rotation=20, fontsize=8)
        ax.set_ylabel("bytes per parameter")
        ax.set_title(f"{biggest}, {dtype}")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Memory held by each method - {sel[0]['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_e2e(rows, path: Path) -> bool:
    import matplotlib.pyplot as plt

    def shown(r):  # a masked method's step counts its mask updates, amortized
        masked = any(x["op"] == "e2e_step_amortized" and x["method"] == r["method"] and x["shapes"] == r["shapes"]
                     for x in rows)
        return r["op"] == ("e2e_step_amortized" if masked else "e2e_step")

    sel = [r for r in rows if r["op"].startswith("e2e_step") and shown(r)]
    if not sel:
        return False
    models = sorted({r["shapes"] for r in sel})
    fig, axes = plt.subplots(1, len(models), figsize=(max(7, 6 * len(models)), 4.8), squeeze=False)
    for ax, model in zip(axes.flat, models):
        mine = [r for r in sel if r["shapes"] == model]
        names = [r["method"] for r in mine]
        p50 = [r["p50_ms"] for r in mine]
        err = [[r["p50_ms"] - r["p20_ms"] for r in mine], [r["p80_ms"] - r["p50_ms"] for r in mine]]
        bars = ax.bar(names, p50, yerr=err, capsize=3,
                      color=[_color(n) for n in names])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_ylabel("ms per training step (p50, whiskers p20-p80)")
        ax.set_title(model, fontsize=9)
        ax.tick_params(axis="x", rotation=20, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"End-to-end training step (masked methods: amortized over mask updates)\n{sel[0]['device_name']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: next to the CSV)")
    ap.add_argument("--dtype", default="float32", help="dtype of the per-op figure")
    ap.add_argument("--device-name", default=None,
                    help="draw the rows of this device_name only (default: the newest row's, so one figure never "
                         "mixes machines or thread counts)")
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    from benchmarks.harness import read_rows

    if not args.csv.exists():
        ap.error(f"csv: {args.csv} does not exist")
    rows = read_rows(args.csv)
    if rows:
        device_name = args.device_name or rows[-1]["device_name"]
        rows = [r for r in rows if r["device_name"] == device_name]
    rows = latest(rows)
    for m in sorted({r["method"] for r in rows}):
        _color(m)
    out = args.out or args.csv.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.csv.stem
    made = []
    for name, fn in ((f"{stem}-ops-{args.dtype}.png", lambda p: plot_ops(rows, args.dtype, p)),
                     (f"{stem}-memory.png", lambda p: plot_memory(rows, p)),
                     (f"{stem}-e2e.png", lambda p: plot_e2e(rows, p))):
        if fn(out / name):
            made.append(out / name)
    for p in made:
        print(f"wrote {p}")
    return 0 if made else 1


if __name__ == "__main__":
    sys.exit(main())
