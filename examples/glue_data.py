"""GLUE / SuperGLUE task files and metrics for the fine-tuning example.

Loads RTE, MRPC, CoLA, STS-B and CB from the Hugging Face hub with ``datasets`` (:func:`load_hub_task`:
``nyu-mll/glue`` and ``aps/super_glue``, train and validation splits), or reads them (GLUE ``.tsv``,
SuperGLUE ``.jsonl``) from a data directory in the standard layout (:func:`load_task`:
``<data_dir>/glue/<TASK>/{train,dev}.tsv``, ``<data_dir>/superglue/CB/{train,val}.jsonl``; the task
folders may also sit directly in ``data_dir``), and computes each task's metrics with numpy only.

The GLUE TSVs are not quoted (several fields start with ``"``), so lines are split on tabs, never
parsed with a quote-aware reader; MRPC's header starts with a byte-order mark; CoLA has no header.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: Optional[str]
    label: float  # class index, or the similarity score for STS-B


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: tuple[str, ...]  # path below the data directory
    files: tuple[str, str]  # train, dev
    labels: Optional[tuple[str, ...]]  # None: regression
    metrics: tuple[str, ...]  # reported; the first is the primary metric of plots and tables

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None


TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("CoLA", ("glue", "CoLA"), ("train.tsv", "dev.tsv"), ("0", "1"), ("matthews",)),
    "mrpc": TaskSpec("MRPC", ("glue", "MRPC"), ("train.tsv", "dev.tsv"), ("0", "1"), ("f1", "accuracy")),
    "stsb": TaskSpec("STS-B", ("glue", "STS-B"), ("train.tsv", "dev.tsv"), None, ("pearson", "spearman")),
    "rte": TaskSpec("RTE", ("glue", "RTE"), ("train.tsv", "dev.tsv"), ("entailment", "not_entailment"), ("accuracy",)),
    "cb": TaskSpec("CB", ("superglue", "CB"), ("train.jsonl", "val.jsonl"), ("entailment", "contradiction", "neutral"), ("accuracy", "macro_f1")),
}


def task_spec(task: str) -> TaskSpec:
    key = task.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"Invalid task: {task!r}; expected one of {sorted(TASKS)}")
    return TASKS[key]


def task_dir(data_dir: str, task: str) -> str:
    """The folder holding ``task``'s files under ``data_dir`` (standard layout or flat)."""
    spec = task_spec(task)
    candidates = [os.path.join(data_dir, *spec.folder), os.path.join(data_dir, spec.folder[-1])]
    for c in candidates:
        if os.path.isfile(os.path.join(c, spec.files[0])):
            return c
    raise FileNotFoundError(
        f"No {spec.name} data under {data_dir!r}: expected {os.path.join(candidates[0], spec.files[0])}"
    )


def _tsv_rows(path: str, header: bool) -> list[list[str]]:
    # utf-8-sig drops MRPC's byte-order mark; no quoting: fields may start with '"'.
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    rows = [line.rstrip("\r").split("\t") for line in lines if line.strip()]
    return rows[1:] if header else rows


def _label_index(spec: TaskSpec, value: str, path: str, row: int) -> float:
    assert spec.labels is not None
    try:
        return float(spec.labels.index(value))
    except ValueError:
        raise ValueError(f"{path}: row {row}: unknown label {value!r}; expected one of {spec.labels}") from None


def _read_file(spec: TaskSpec, path: str) -> list[Example]:
    key = spec.name
    if key == "CB":
        out = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if line.strip():
                    d = json.loads(line)
                    out.append(Example(d["premise"], d["hypothesis"], _label_index(spec, d["label"], path, n)))
        return out
    # (has header, column of text_a, column of text_b or None, column of the label, columns expected)
    columns = {
        "CoLA": (False, 3, None, 1, 4),
        "MRPC": (True, 3, 4, 0, 5),
        "STS-B": (True, 7, 8, 9, 10),
        "RTE": (True, 1, 2, 3, 4),
    }[key]
    header, a, b, y, width = columns
    out = []
    for n, row in enumerate(_tsv_rows(path, header)):
        if len(row) != width:
            raise ValueError(f"{path}: row {n}: expected {width} tab-separated fields, got {len(row)}")
        label = float(row[y]) if spec.is_regression else _label_index(spec, row[y], path, n)
        out.append(Example(row[a], None if b is None else row[b], label))
    return out


def load_task(data_dir: str, task: str) -> tuple[list[Example], list[Example]]:
    """``(train, dev)`` examples of ``task``."""
    spec = task_spec(task)
    folder = task_dir(data_dir, task)
    return tuple(_read_file(spec, os.path.join(folder, name)) for name in spec.files)  # type: ignore[return-value]


# --------------------------------------------------------------------------- the Hugging Face hub
# task -> (hub dataset, its config, the text fields); the labels are class indices in TASKS' order.
HUB: dict[str, tuple[str, str, tuple[str, Optional[str]]]] = {
    "cola": ("nyu-mll/glue", "cola", ("sentence", None)),
    "mrpc": ("nyu-mll/glue", "mrpc", ("sentence1", "sentence2")),
    "stsb": ("nyu-mll/glue", "stsb", ("sentence1", "sentence2")),
    "rte": ("nyu-mll/glue", "rte", ("sentence1", "sentence2")),
    "cb": ("aps/super_glue", "cb", ("premise", "hypothesis")),
}


def hub_name(task: str) -> str:
    name, config, _ = HUB[task_key(task)]
    return f"{name} ({config})"


def task_key(task: str) -> str:
    spec = task_spec(task)
    return next(k for k, s in TASKS.items() if s is spec)


def load_hub_task(task: str) -> tuple[list[Example], list[Example]]:
    """``(train, dev)`` examples of ``task`` from the Hugging Face hub (``datasets``, imported here:
    it is optional; the download needs the network once, then comes from its cache)."""
    spec = task_spec(task)
    name, config, (a, b) = HUB[task_key(task)]
    import datasets  # ImportError: not installed

    ds = datasets.load_dataset(name, config)

    def examples(split: str) -> list[Example]:
        rows = ds[split]
        names = getattr(rows.features.get("label"), "names", None)
        out = []
        for n, r in enumerate(rows):
            label = float(r["label"])
            if spec.labels is not None:
                if names and spec.labels[0] in names:  # names as in TASKS (RTE, CB): map by name
                    label = float(spec.labels.index(names[int(r["label"])]))
                if not 0 <= label < spec.num_labels:
                    raise ValueError(f"{name} ({config}) {split}: row {n}: label {r['label']!r}; expected "
                                     f"0..{spec.num_labels - 1}")
            out.append(Example(r[a], None if b is None else r[b], label))
        return out

    return examples("train"), examples("validation")


# --------------------------------------------------------------------------- metrics
def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if len(t) else 0.0


def f1_binary(y_true: Sequence[int], y_pred: Sequence[int], positive: int = 1) -> float:
    t, p = np.asarray(y_true) == positive, np.asarray(y_pred) == positive
    tp = float((t & p).sum())
    denom = float(t.sum() + p.sum())
    return 2.0 * tp / denom if denom else 0.0


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int) -> float:
    return float(np.mean([f1_binary(y_true, y_pred, c) for c in range(num_labels)]))


def matthews(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Matthews correlation (binary); 0 when a prediction or the truth is constant."""
    t, p = np.asarray(y_true) == 1, np.asarray(y_pred) == 1
    tp, tn = float((t & p).sum()), float((~t & ~p).sum())
    fp, fn = float((~t & p).sum()), float((t & ~p).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    # Average ranks of ties, as Spearman's correlation defines them.
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def compute_metrics(task: str, labels: Sequence[float], outputs: np.ndarray) -> dict[str, float]:
    """Metrics of ``task`` from the model outputs: logits ``[n, num_labels]`` (or ``[n]``/``[n, 1]``
    predicted scores for STS-B) and the gold labels."""
    spec = task_spec(task)
    outputs = np.asarray(outputs)
    if spec.is_regression:
        pred = outputs.reshape(-1).astype(np.float64)
        gold = np.asarray(labels, dtype=np.float64)
        return {"pearson": pearson(gold, pred), "spearman": spearman(gold, pred)}
    pred = outputs.argmax(axis=-1)
    gold = np.asarray(labels).astype(np.int64)
    functions: dict[str, Callable[[], float]] = {
        "accuracy": lambda: accuracy(gold, pred),
        "f1": lambda: f1_binary(gold, pred),
        "macro_f1": lambda: macro_f1(gold, pred, spec.num_labels),
        "matthews": lambda: matthews(gold, pred),
    }
    return {m: functions[m]() for m in spec.metrics}
