"""FSAM in ordinary training loops: gradient accumulation, clipping, LR schedulers, BatchNorm."""
import warnings

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels.utils import disable_running_stats, enable_running_stats, frozen_running_stats


def _model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).to(dtype)


def _data(n=24, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _first_mismatch(a, b, rtol=1e-10, atol=1e-12):
    for i, (s, t) in enumerate(zip(a, b)):
        if not torch.allclose(s, t, rtol=rtol, atol=atol):
            idx = (~torch.isclose(s, t, rtol=rtol, atol=atol)).nonzero()[0].tolist()
            return f"tensor {i} at {idx}: {s[tuple(idx)].item()!r} vs {t[tuple(idx)].item()!r}"
    return None


def test_gradient_accumulation_in_both_passes_matches_full_batch():
    x, y = _data()
    full, accum = _model(), _model()
    kw = dict(rho=0.1, sparsity=0.6, mask_update_interval=1, lr=0.05, momentum=0.9, backend="torch")
    opt_f, opt_a = FSAM(full.parameters(), torch.optim.SGD, **kw), FSAM(accum.parameters(), torch.optim.SGD, **kw)
    micro = list(zip(x.chunk(3), y.chunk(3)))
    for _ in range(3):
        _loss(full, x, y).backward()
        opt_f.first_step(zero_grad=True)
        _loss(full, x, y).backward()
        opt_f.second_step(zero_grad=True)

        for xb, yb in micro:  # first pass: accumulate g over the micro-batches
            (_loss(accum, xb, yb) / len(micro)).backward()
        opt_a.first_step(zero_grad=True)  # mask and e from the accumulated gradient
        for xb, yb in micro:  # second pass: accumulate g_SAM at the same w + e
            (_loss(accum, xb, yb) / len(micro)).backward()
        opt_a.second_step(zero_grad=True)
        for mf, ma in zip(opt_f.masks(), opt_a.masks()):
            assert torch.equal(mf, ma), "masks differ between accumulated and full-batch gradients"
    msg = _first_mismatch(list(full.parameters()), list(accum.parameters()))
    assert msg is None, f"accumulated vs full batch: {msg}"


def test_clipping_applies_to_the_sam_gradient():
    x, y = _data()
    model = _model()
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.2, sparsity=0.5, lr=1.0, backend="torch")
    w0 = [p.detach().clone() for p in model.parameters()]
    _loss(model, x, y).backward()
    opt.first_step(zero_grad=True)
    _loss(model, x, y).backward()
    g_sam = [p.grad.clone() for p in model.parameters()]
    max_norm = 0.25 * float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_sam])))
    total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)  # between backward and second_step
    assert float(total) > max_norm
    opt.second_step(zero_grad=True)
    coef = max_norm / (float(total) + 1e-6)
    expected = [w - coef * g for w, g in zip(w0, g_sam)]  # SGD, lr=1: w - clip(g_SAM)
    msg = _first_mismatch(expected, [p.detach() for p in model.parameters()])
    assert msg is None, f"clipped SAM step: {msg}"


def test_clipping_the_first_gradient_does_not_change_the_perturbation():
    # e = rho * g / ||g|| and the mask's ranking of g*g are invariant to a global rescale of g.
    x, y = _data()
    perturbed = []
    for clip in (False, True):
        model = _model()
        opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.2, sparsity=0.5, lr=1.0, backend="torch")
        _loss(model, x, y).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        opt.first_step(zero_grad=True)
        perturbed.append(([p.detach().clone() for p in model.parameters()], opt.masks()))
        opt.restore()
    # e is computed in fp32 (the reference's definition): equal up to fp32 rounding.
    msg = _first_mismatch(perturbed[0][0], perturbed[1][0], rtol=1e-6, atol=1e-8)
    assert msg is None, f"perturbed weights with/without first-pass clipping: {msg}"
    for a, b in zip(perturbed[0][1], perturbed[1][1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("attach", ["fsam", "base"])
@pytest.mark.parametrize("style", ["two_calls", "closure"])
def test_lr_scheduler_attached_to_fsam_or_base(attach, style):
    x, y = _data()
    model = _model()
    opt = FSAM(model.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.5, lr=0.1, backend="torch")
    target = opt if attach == "fsam" else opt.base_optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(target, lambda s: 1.0 / (1 + s))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(3):
            if style == "two_calls":
                _loss(model, x, y).backward()
                opt.first_step(zero_grad=True)
                _loss(model, x, y).backward()
                opt.second_step(zero_grad=True)
            else:
                opt.zero_grad()
                _loss(model, x, y).backward()
                opt.step(lambda: _loss(model, x, y).backward())
            sched.step()
            assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / (step + 2))
            assert opt.base_optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _bn_state(model):
    bn = model[1]
    return bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()


def test_frozen_running_stats_in_the_second_pass():
    x, y = _data(dtype=torch.float32)
    model = _bn_model()
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.5, sparsity=0.5, lr=0.1, backend="torch")
    _loss(model, x, y).backward()  # first pass updates the running statistics
    after_first = _bn_state(model)
    assert int(after_first[2]) == 1
    opt.first_step(zero_grad=True)
    with torch.no_grad():
        reference_out = _bn_model_output_without_update(model, x)
    with frozen_running_stats(model):
        out = model(x)
        torch.nn.functional.cross_entropy(out, y).backward()
    for a, b in zip(after_first, _bn_state(model)):
        assert torch.equal(a, b), "the second pass changed BatchNorm's running statistics"
    assert torch.equal(out.detach(), reference_out), "the second pass must normalize with batch statistics"
    opt.second_step(zero_grad=True)
    assert model[1].track_running_stats is True
    model(x)  # outside the context they update again
    assert int(model[1].num_batches_tracked) == 2


def _bn_model_output_without_update(model, x):
    saved = _bn_state(model)
    out = model(x)  # training mode: batch statistics (and an update we undo)
    bn = model[1]
    bn.running_mean.copy_(saved[0])
    bn.running_var.copy_(saved[1])
    bn.num_batches_tracked.copy_(saved[2])
    return out


def test_disable_enable_running_stats_and_restore_on_error():
    x, _ = _data(dtype=torch.float32)
    model = _bn_model()
    model[1].track_running_stats = True
    before = _bn_state(model)
    disable_running_stats(model)
    disable_running_stats(model)  # twice is harmless
    model(x)
    for a, b in zip(before, _bn_state(model)):
        assert torch.equal(a, b)
    enable_running_stats(model)
    assert model[1].track_running_stats is True
    model(x)
    assert int(model[1].num_batches_tracked) == 1

    with pytest.raises(ZeroDivisionError):
        with frozen_running_stats(model):
            1 / 0
    assert model[1].track_running_stats is True
    with pytest.raises(TypeError, match="model"):
        disable_running_stats("not a module")
