"""Adam vs SAM vs FSAM on scikit-learn's handwritten digits (a small real dataset shipped with sklearn).

For each optimizer it prints test accuracy (mean ± std over seeds), time per training step and the
bytes of optimizer state: the base optimizer's and what SAM/FSAM keep on top of it, both between steps
(persistent) and at the peak of a step. The optimizers train interleaved, one epoch of each in turn (the
order rotating every epoch), so that a machine busy with something else slows them alike; each run keeps
its own random stream, so its results are those of running it alone. Runs on the CPU by default in well under two minutes on two
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


class Run:
    """One optimizer and seed: its model, optimizer, data order and its own random stream (dropout), so
    that runs interleaved epoch by epoch give what each gives alone."""

    def __init__(self, name: str, seed: int, data, args, device: torch.device) -> None:
        self.name, self.data, self.args, self.device = name, data, args, device
        torch.manual_seed(seed)
        self.model = make_model(args.hidden).to(device)
        self.opt = make_optimizer(name, self.model, args)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.rng = self._rng_state()
        self.steps, self.step_time, self.peak_extra = 0, 0.0, 0

    def _rng_state(self):
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _set_rng_state(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def epoch(self) -> None:
        """One epoch of training; only the steps are timed."""
        x_tr, y_tr = self.data[0], self.data[1]
        model, opt, device = self.model, self.opt, self.device
        loss_fn = torch.nn.CrossEntropyLoss()
        outer = self._rng_state()
        self._set_rng_state(self.rng)
        model.train()
        order = torch.randperm(x_tr.shape[0], generator=self.gen).to(device)
        for start in range(0, x_tr.shape[0], self.args.batch_size):
            idx = order[start : start + self.args.batch_size]
            xb, yb = x_tr[idx], y_tr[idx]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss_fn(model(xb), yb).backward()
            if isinstance(opt, FSAM):
                opt.first_step(zero_grad=True)
                self.peak_extra = max(self.peak_extra,
                                      sum(v for k, v in opt.memory_stats().items() if k != "persistent"))
                loss_fn(model(xb), yb).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.step_time += time.perf_counter() - t0
            self.steps += 1
        self.rng = self._rng_state()
        self._set_rng_state(outer)

    def result(self) -> dict:
        x_te, y_te = self.data[2], self.data[3]
        self.model.eval()
        with torch.no_grad():
            acc = (self.model(x_te).argmax(dim=1) == y_te).float().mean().item()
        opt = self.opt
        extra = opt.memory_stats()["persistent"] if isinstance(opt, FSAM) else 0
        n_params = sum(p.numel() for p in self.model.parameters())
        return dict(acc=acc, ms_per_step=1e3 * self.step_time / self.steps, base_state=state_bytes(opt),
                    extra_persistent=extra, extra_peak=self.peak_extra, n_params=n_params)


def interleaved(runs: list[Run], epochs: int):
    """(epoch, run) in the order they train: one epoch of each run in turn, the order rotating every
    epoch so that no method is always first (or last) after a pause."""
    for e in range(epochs):
        k = e % len(runs)
        for run in runs[k:] + runs[:k]:
            yield e, run


def train_seed(names: list[str], seed: int, data, args, device: torch.device, bar=None) -> dict[str, dict]:
    runs = [Run(name, seed, data, args, device) for name in names]
    for _, run in interleaved(runs, args.epochs):
        run.epoch()
        if bar is not None:
            bar.update(1)
    return {run.name: run.result() for run in runs}


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

    results: dict[str, list[dict]] = {name: [] for name in args.optimizers}
    with tqdm(total=args.seeds * args.epochs * len(args.optimizers), desc="training", unit="epoch") as bar:
        for seed in range(args.seeds):
            for name, r in train_seed(args.optimizers, seed, data, args, device, bar).items():
                results[name].append(r)

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
    print("(ms/step: mean wall time of a training step, forward, backward(s) and optimizer, with the optimizers "
          "interleaved one epoch each in turn, so a busy machine slows them alike; bytes: 'extra' is what "
          "SAM/FSAM hold beyond the base optimizer: the packed mask between steps, plus the saved originals "
          "of the perturbed weights during a step)")
    return summary


if __name__ == "__main__":
    main()
