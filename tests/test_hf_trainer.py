"""FSAMTrainer: the two-pass FSAM step inside transformers.Trainer, on a tiny BERT built from a config."""
import importlib
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fsam_kernels.integrations.hf import FSAMTrainer, FSAMTrainingArguments, TrainerFSAM  # noqa: E402

VOCAB, SEQ = 64, 12


class _Pairs(torch.utils.data.Dataset):
    """Label = whether token 7 occurs: learnable in a few steps."""

    def __init__(self, n=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.ids[self.labels == 1, 3] = 7

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": self.labels[i]}


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, gradient_accumulation_steps=2,
        learning_rate=3e-3, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        seed=0, dataloader_num_workers=0, disable_tqdm=True, fsam_rho=0.05, fsam_sparsity=0.5,
        fsam_mask_update_interval=2, fsam_backend="torch",
    )
    base.update(kw)
    return FSAMTrainingArguments(**base)


def _eval_loss(model, data):
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask", "labels")}
    model.eval()
    with torch.no_grad():
        loss = float(model(**batch).loss)
    model.train()
    return loss


def _count_forwards(model):
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append(m.training))
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_runs_two_pass_fsam_steps(tmp_path, precision):
    data = _Pairs()
    model = _model()
    w0 = [p.detach().clone() for p in model.parameters()]
    before = _eval_loss(model, data)
    calls = _count_forwards(model)
    trainer = FSAMTrainer(model=model, args=_args(tmp_path, bf16=(precision == "bf16")), train_dataset=data)
    trainer.train()
    opt = trainer.fsam_optimizer
    assert isinstance(opt, TrainerFSAM) and isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.step_count == 6, "one first_step per optimizer step"
    # 6 steps x 2 micro-batches x 2 passes.
    assert sum(calls) == 24, f"expected 24 training forwards, got {sum(calls)}"
    masks = opt.masks()
    assert len(masks) == len(list(model.parameters()))
    n = sum(m.numel() for m in masks)
    assert sum(int(m.sum()) for m in masks) == round(0.5 * n)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(w0, model.parameters()))
    assert _eval_loss(model, data) < before
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and all(torch.isfinite(torch.tensor(logged)))


def test_disabled_is_the_plain_trainer(tmp_path):
    data = _Pairs()
    model = _model()
    calls = _count_forwards(model)
    trainer = FSAMTrainer(model=model, args=_args(tmp_path, fsam_enabled=False, max_steps=2), train_dataset=data)
    trainer.train()
    assert trainer.fsam_optimizer is None
    assert sum(calls) == 4  # one pass per micro-batch


def test_plain_training_arguments_use_fsam_defaults(tmp_path):
    data = _Pairs()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "plain"), max_steps=1, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )
    trainer = FSAMTrainer(model=_model(), args=args, train_dataset=data)
    trainer.train()
    assert trainer.fsam_optimizer.sparsity == 0.9 and trainer.fsam_optimizer.step_count == 1


def test_checkpoint_save_and_resume(tmp_path):
    data = _Pairs()
    full = FSAMTrainer(model=_model(), args=_args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=data)
    full.train()
    ckpt = os.path.join(str(tmp_path / "out"), "checkpoint-2")
    assert os.path.isdir(ckpt)
    saved = torch.load(os.path.join(ckpt, "optimizer.pt"), weights_only=True)
    assert saved["fsam"]["step_count"] == 2 and saved["fsam"]["mask"] is not None

    resumed = FSAMTrainer(model=_model(), args=_args(tmp_path, output_dir=str(tmp_path / "resumed")), train_dataset=data)
    resumed.train(resume_from_checkpoint=ckpt)
    assert resumed.fsam_optimizer.step_count == 6
    for i, (a, b) in enumerate(zip(full.model.parameters(), resumed.model.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (
            f"parameter {i}: resumed run differs from the uninterrupted one by {(a - b).abs().max().item():.3e}"
        )


def test_command_line_arguments(tmp_path):
    parser = transformers.HfArgumentParser(FSAMTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--fsam_rho", "0.1", "--fsam_sparsity", "0.8", "--fsam_fisher", "empirical",
        "--fsam_mask_update_interval", "7", "--fsam_adaptive", "true", "--fsam_enabled", "false", "--use_cpu", "true",
    ])
    assert (args.fsam_rho, args.fsam_sparsity, args.fsam_fisher) == (0.1, 0.8, "empirical")
    assert args.fsam_mask_update_interval == 7 and args.fsam_adaptive is True and args.fsam_enabled is False


@pytest.mark.parametrize("field,value,match", [
    ("fsam_rho", 0.0, "fsam_rho"),
    ("fsam_sparsity", 1.5, "fsam_sparsity"),
    ("fsam_mask_update_interval", 0, "fsam_mask_update_interval"),
    ("fsam_fisher", "exact", "fsam_fisher"),
])
def test_bad_fsam_arguments(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **{field: value})


def test_empirical_fisher_mode(tmp_path):
    trainer = FSAMTrainer(model=_model(), args=_args(tmp_path, fsam_fisher="empirical", max_steps=3), train_dataset=_Pairs())
    trainer.train()
    assert trainer.fsam_optimizer.fisher == "empirical" and trainer.fsam_optimizer.step_count == 3
    assert trainer.fsam_optimizer.masks()


def test_missing_transformers_gives_an_install_hint(monkeypatch):
    monkeypatch.delitem(sys.modules, "fsam_kernels.integrations.hf")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install fsam_kernels\[hf\]"):
        importlib.import_module("fsam_kernels.integrations.hf")


def _run_with_scaler(tmp_path, name, max_steps, inf_at_backward=None):
    # On the CPU the Trainer builds no loss scaler; give its accelerator one to exercise the fp16 path
    # (fp32 compute, so a power-of-two scale must not change a single bit). No clipping: accelerate
    # unscales for clipping only in its own fp16 mode.
    model = _model()
    weight = model.classifier.weight
    count = [0]

    def poison(grad):
        count[0] += 1
        return grad * float("inf") if count[0] - 1 == inf_at_backward else grad

    if inf_at_backward is not None:
        weight.register_hook(poison)
    args = _args(tmp_path, output_dir=str(tmp_path / name), max_steps=max_steps, max_grad_norm=0.0,
                 lr_scheduler_type="constant")
    trainer = FSAMTrainer(model=model, args=args, train_dataset=_Pairs())
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    trainer.train()
    return trainer


def test_loss_scaler_path_matches_unscaled_run_bit_for_bit(tmp_path):
    plain = FSAMTrainer(
        model=_model(),
        args=_args(tmp_path, output_dir=str(tmp_path / "plain"), max_steps=3, max_grad_norm=0.0, lr_scheduler_type="constant"),
        train_dataset=_Pairs(),
    )
    plain.train()
    scaled = _run_with_scaler(tmp_path, "scaled", 3)
    assert scaled.accelerator.scaler.get_scale() == 2.0**8
    for i, (a, b) in enumerate(zip(plain.model.parameters(), scaled.model.parameters())):
        assert torch.equal(a, b), f"parameter {i}: the loss-scaled FSAM step differs, max {(a - b).abs().max().item():.3e}"


@pytest.mark.parametrize("overflow_pass,backward_index", [("first", 8), ("second", 10)])
def test_loss_scaler_overflow_skips_the_step(tmp_path, overflow_pass, backward_index):
    # 4 backward passes per step (2 micro-batches x 2 passes): index 8 is step 3's first pass, 10 its second.
    two_steps = _run_with_scaler(tmp_path, "two", 2)
    overflow = _run_with_scaler(tmp_path, "overflow", 3, inf_at_backward=backward_index)
    assert overflow.accelerator.scaler.get_scale() == 2.0**7, "the scaler must back off"
    for i, (a, b) in enumerate(zip(two_steps.model.parameters(), overflow.model.parameters())):
        assert torch.equal(a, b), f"parameter {i} changed on a skipped step ({overflow_pass} pass overflowed)"
    assert overflow.fsam_optimizer.step_count == (2 if overflow_pass == "first" else 3)


def _train_failing_in_second_pass(trainer, model, step, snapshot):
    """Train until the second pass of optimizer step ``step`` (1-based) raises KeyError; ``snapshot()``
    runs as that step starts. 4 forwards per step: 2 micro-batches x 2 passes."""
    seen = {}

    def hook(module, args):
        seen["n"] = seen.get("n", -1) + 1
        if seen["n"] == 4 * (step - 1):
            seen.update(snapshot())
        if seen["n"] == 4 * (step - 1) + 2:
            raise KeyError("data loader broke")

    model.register_forward_pre_hook(hook)
    with pytest.raises(KeyError):
        trainer.train()
    return seen


def test_failing_second_pass_rewinds_the_step(tmp_path):
    model = _model()
    trainer = FSAMTrainer(model=model, args=_args(tmp_path, max_steps=2, lr_scheduler_type="constant"),
                          train_dataset=_Pairs())
    seen = _train_failing_in_second_pass(trainer, model, 2, lambda: {
        "weights": [p.detach().clone() for p in model.parameters()],
        "step_count": trainer.fsam_optimizer.step_count, "mask": trainer.fsam_optimizer.masks()})
    opt = trainer.fsam_optimizer
    assert opt.step_count == seen["step_count"] == 1
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), seen["mask"]))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), seen["weights"]))
    assert all(p.grad is None for p in model.parameters())


def test_failing_second_pass_takes_its_batch_out_of_the_empirical_fisher(tmp_path):
    # interval 3: step 1 builds the mask, step 2 starts an accumulator, step 3 adds to it in place and fails
    # in its second pass: the accumulator must be step 2's again.
    model = _model()
    args = _args(tmp_path, max_steps=3, lr_scheduler_type="constant", fsam_fisher="empirical",
                 fsam_mask_update_interval=3)
    trainer = FSAMTrainer(model=model, args=args, train_dataset=_Pairs())
    seen = _train_failing_in_second_pass(trainer, model, 3, lambda: {
        "count": trainer.fsam_optimizer._mask.fisher_count,
        "fisher": [f.clone() for f in trainer.fsam_optimizer._mask.fisher]})
    opt = trainer.fsam_optimizer
    assert opt.step_count == 2 and opt._mask.fisher_count == seen["count"] == 1
    assert all(torch.equal(a, b) for a, b in zip(opt._mask.fisher, seen["fisher"]))
