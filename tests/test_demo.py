"""The demo (the README's main job) runs end to end in a tiny setting."""
import importlib.util
import pathlib

import pytest

DEMO = pathlib.Path(__file__).resolve().parents[1] / "examples" / "demo.py"


def test_demo_tiny(capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("fsam_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    summary = demo.main(["--epochs", "2", "--seeds", "2", "--hidden", "64", "--lr", "1e-2"])
    out = capsys.readouterr().out
    assert set(summary) == {"adam", "sam", "fsam"}
    for name, row in summary.items():
        assert 0.3 < row["acc_mean"] <= 1.0, (name, row)  # 10 classes: chance is 0.1
        assert row["ms_per_step"] > 0
    # FSAM keeps a packed bit mask between steps and saves ~10 % of the weights during a step;
    # SAM (sparsity 0) saves all of them
    assert 0 < summary["fsam"]["extra_persistent"] < summary["fsam"]["base_state"] / 8
    assert summary["fsam"]["extra_peak"] < summary["sam"]["extra_peak"] / 3
    assert "FSAM 0.9" in out and "AdamW" in out


def _demo():
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    spec = importlib.util.spec_from_file_location("fsam_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


TINY = ["--epochs", "3", "--seeds", "1", "--hidden", "16", "--lr", "1e-2"]


def test_demo_interleaves_the_methods_epoch_by_epoch(monkeypatch, capsys):
    """ms/step compares like with like: one epoch of each method in turn, the order rotating, never all
    of one method and then the next; the caption says so."""
    demo = _demo()
    trained, epoch = [], demo.Run.epoch

    def recording(run):
        trained.append(run.name)
        epoch(run)

    monkeypatch.setattr(demo.Run, "epoch", recording)
    demo.main(TINY)
    assert trained == ["adam", "sam", "fsam", "sam", "fsam", "adam", "fsam", "adam", "sam"]
    assert "interleaved one epoch each in turn" in capsys.readouterr().out


def test_interleaving_changes_no_result(capsys):
    """Each run keeps its own random stream (dropout): alongside the others it gives what it gives alone."""
    demo = _demo()
    together = demo.main(TINY)
    for name in ("adam", "fsam"):
        alone = demo.main(TINY + ["--optimizers", name])[name]
        assert alone["acc_mean"] == together[name]["acc_mean"], name
        assert alone["extra_peak"] == together[name]["extra_peak"], name
