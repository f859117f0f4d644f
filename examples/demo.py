"""Adam vs SAM vs FSAM on scikit-learn's handwritten digits (a small real dataset shipped with sklearn).

For each optimizer it prints test accuracy (mean ± std over seeds), time per training step and the
bytes of optimizer state: the base optimizer's and what SAM/FSAM keep on top of it, both between steps
(persistent) and at the peak of a step. Runs on the CPU by default in well under two minutes on two
cores; ``--device auto`` uses a GPU when one is present.

    python examples/demo.py                      # the full demo
    python examples/demo.py --epochs 1 --seeds 1 # a quick look
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm

from fsam_kernels import FSAM, SAM


def load_digits_split(device: torch.device, seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    return x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device)


def make_model(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1),
        torch.nn.Linear(hidden, 10),
    )


def make_optimizer(name: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    common = dict(lr=args.lr, weight_decay=args.weight_decay)
    if name == "adam":
        return torch.optim.AdamW(model.parameters(), **common)
    if name == "sam":  # dense SAM: no mask at all
        return SAM(model.parameters(), torch.optim.AdamW, rho=args.rho, backend=args.backend, **common)
    return FSAM(model.parameters(), torch.optim.AdamW, rho=args.rho, sparsity=args.sparsity,
                mask_update_interval=args.mask_update_interval, backend=args.backend, **common)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    base = opt.base_optimizer if isinstance(opt, FSAM) else opt
    return sum(t.numel() * t.element_size() for s in base.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def train_one(name: str, seed: int, data, args, device: torch.device) -> dict:
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = make_model(args.hidden).to(device)
    opt = make_optimizer(name, model, args)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    steps, step_time, peak_extra = 0, 0.0, 0
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(x_tr.shape[0], generator=gen).to(device)
        for start in range(0, x_tr.shape[0], args.batch_size):
            idx = order[start : start + args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss_fn(model(xb), yb).backward()
            if isinstance(opt, FSAM):
                opt.first_step(zero_grad=True)
                peak_extra = max(peak_extra, sum(v for k, v in opt.memory_stats().items() if k != "persistent"))
                loss_fn(model(xb), yb).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_time += time.perf_counter() - t0
            steps += 1
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(dim=1) == y_te).float().mean().item()
    extra = opt.memory_stats()["persistent"] if isinstance(opt, FSAM) else 0
    n_params = sum(p.numel() for p in model.parameters())
    return dict(acc=acc, ms_per_step=1e3 * step_time / steps, base_state=state_bytes(opt),
                extra_persistent=extra, extra_peak=peak_extra, n_params=n_params)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", nargs="+", default=["adam", "sam", "fsam"], choices=["adam", "sam", "fsam"])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--mask-update-interval", type=int, default=10)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when available)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    data = load_digits_split(device)

    results = {}
    runs = [(name, seed) for name in args.optimizers for seed in range(args.seeds)]
    for name, seed in tqdm(runs, desc="training", unit="run"):
        results.setdefault(name, []).append(train_one(name, seed, data, args, device))

    n_params = results[args.optimizers[0]][0]["n_params"]
    print(f"\ndigits: {data[0].shape[0]} train / {data[2].shape[0]} test, MLP with {n_params:,} params, "
          f"{args.epochs} epochs, {args.seeds} seed(s), device {device}")
    header = f"{'optimizer':<10}{'test acc':>18}{'ms/step':>10}{'base state':>12}{'extra (between)':>17}{'extra (peak)':>14}"
    print(header)
    print("-" * len(header))
    summary = {}
    for name, rs in results.items():
        accs = [r["acc"] for r in rs]
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ms = statistics.mean(r["ms_per_step"] for r in rs)
        label = {"adam": "AdamW", "sam": "SAM", "fsam": f"FSAM {args.sparsity:g}"}[name]
        r0 = rs[0]
        print(f"{label:<10}{100 * mean:>11.2f} ± {100 * std:4.2f}{ms:>10.2f}{r0['base_state']:>12,}"
              f"{r0['extra_persistent']:>17,}{r0['extra_peak']:>14,}")
        summary[name] = dict(acc_mean=mean, acc_std=std, ms_per_step=ms, **{k: r0[k] for k in ("base_state", "extra_persistent", "extra_peak")})
    print("(bytes; 'extra' is what SAM/FSAM hold beyond the base optimizer: the packed mask between steps, "
          "plus the saved originals of the perturbed weights during a step)")
    return summary


if __name__ == "__main__":
    main()
