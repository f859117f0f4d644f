"""FSAM under torch.autocast and torch.amp.GradScaler (CPU), via fsam_kernels.amp."""
import warnings

import pytest
import torch

from fsam_kernels import FSAM, amp


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def _opt(model, base=torch.optim.Adam, **kw):
    kw.setdefault("sparsity", 0.5)
    kw.setdefault("lr", 1e-2)
    return FSAM(model.parameters(), base, rho=0.1, mask_update_interval=1, backend="torch", **kw)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(before, model, what):
    for i, (a, p) in enumerate(zip(before, model.parameters())):
        if not torch.equal(a, p.detach()):
            idx = (a != p.detach()).nonzero()[0].tolist()
            pytest.fail(f"{what}: parameter {i} differs first at {idx}: {a[tuple(idx)].item()!r} vs {p[tuple(idx)].item()!r}")


def test_scaled_step_equals_unscaled_fsam_bit_for_bit():
    # A power-of-two loss scale is exact in fp32: the amp recipe must reproduce the plain step exactly,
    # which holds only if the perturbation and the base step both see unscaled gradients (SGD, unlike
    # Adam, is not invariant to the gradient's scale).
    x, y = _data()
    plain, scaled = _model(), _model()
    opt_p = _opt(plain, torch.optim.SGD, lr=0.1, momentum=0.9)
    opt_s = _opt(scaled, torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for _ in range(3):
        _loss(plain, x, y).backward()
        opt_p.first_step(zero_grad=True)
        _loss(plain, x, y).backward()
        opt_p.second_step(zero_grad=True)

        scaler.scale(_loss(scaled, x, y)).backward()
        assert amp.first_step(opt_s, scaler)
        scaler.scale(_loss(scaled, x, y)).backward()
        assert amp.second_step(opt_s, scaler, zero_grad=True)
    assert scaler.get_scale() == 2.0**12
    _assert_bitwise(_snapshot(plain), scaled, "scaled vs plain FSAM")
    for mp, ms in zip(opt_p.masks(), opt_s.masks()):
        assert torch.equal(mp, ms)


def test_scaled_gsam_step_equals_the_unscaled_one_bit_for_bit():
    # GSAM's surrogate-gap step works on both gradients unscaled: with a power-of-two scale the scaled
    # step is the plain one exactly.
    from fsam_kernels import GSAM

    x, y = _data()
    plain, scaled = _model(), _model()
    opt_p, opt_s = (GSAM(m.parameters(), torch.optim.SGD, rho=0.1, alpha=0.4, sparsity=0.5, lr=0.1, momentum=0.9,
                         backend="torch") for m in (plain, scaled))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for _ in range(3):
        _loss(plain, x, y).backward()
        opt_p.step(lambda: _loss(plain, x, y).backward())
        opt_p.zero_grad()
        scaler.scale(_loss(scaled, x, y)).backward()
        amp.step(opt_s, scaler, lambda: scaler.scale(_loss(scaled, x, y)).backward())
        opt_s.zero_grad()
    assert scaler.get_scale() == 2.0**12 and opt_s.step_count == 3
    _assert_bitwise(_snapshot(plain), scaled, "scaled vs plain GSAM")


def _one_good_step(model, opt, scaler, x, y):
    scaler.scale(_loss(model, x, y)).backward()
    amp.first_step(opt, scaler)
    scaler.scale(_loss(model, x, y)).backward()
    amp.second_step(opt, scaler, zero_grad=True)


@pytest.mark.parametrize("overflow_pass", ["first", "second"])
def test_overflow_skips_and_leaves_weights_bit_for_bit(overflow_pass):
    x, y = _data()
    model = _model()
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _one_good_step(model, opt, scaler, x, y)  # the base optimizer has state, a mask exists
    before = _snapshot(model)
    adam_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.base_optimizer.state.items()}
    mask_before = [m.clone() for m in opt.masks()]
    steps_before, scale_before = opt.step_count, scaler.get_scale()

    scaler.scale(_loss(model, x, y)).backward()
    if overflow_pass == "first":
        next(model.parameters()).grad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow is routine: no warning may escape
        perturbed = amp.first_step(opt, scaler)
    assert perturbed == (overflow_pass == "second")
    if perturbed:
        scaler.scale(_loss(model, x, y)).backward()
        next(model.parameters()).grad[0, 0] = float("nan")
    assert amp.second_step(opt, scaler, zero_grad=True) is False

    _assert_bitwise(before, model, f"after an overflow in the {overflow_pass} pass")
    assert scaler.get_scale() < scale_before, "the scaler must back off"
    for k, v in opt.base_optimizer.state.items():
        for n, t in v.items():
            assert torch.equal(t, adam_state[k][n]), f"base optimizer state {n} changed on a skipped step"
    if overflow_pass == "first":
        assert opt.step_count == steps_before, "no mask update on an overflowing first pass"
        for a, b in zip(mask_before, opt.masks()):
            assert torch.equal(a, b)
    # Training continues normally afterwards.
    _one_good_step(model, opt, scaler, x, y)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_fp16_autocast_with_grad_scaler_trains():
    x, y = _data()
    model = _model()
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu")

    def loss_fp16():
        with torch.autocast("cpu", dtype=torch.float16):
            return _loss(model, x, y)

    with torch.no_grad():
        first = float(loss_fp16())
    for _ in range(15):
        opt.zero_grad()
        scaler.scale(loss_fp16()).backward()

        def closure():
            loss = loss_fp16()
            scaler.scale(loss).backward()
            return loss

        amp.step(opt, scaler, closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert float(loss_fp16()) < first


def test_bf16_autocast_plain_two_pass_trains():
    x, y = _data()
    model = _model()
    opt = _opt(model)

    def loss_bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss(model, x, y)

    with torch.no_grad():
        first = float(loss_bf16())
    for _ in range(15):
        loss_bf16().backward()
        opt.first_step(zero_grad=True)
        loss_bf16().backward()
        opt.second_step(zero_grad=True)
    with torch.no_grad():
        assert float(loss_bf16()) < first
    assert len(opt.masks()) == 4


def test_closure_error_restores_weights():
    x, y = _data()
    model = _model()
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu")
    before = _snapshot(model)
    scaler.scale(_loss(model, x, y)).backward()

    def bad_closure():
        raise KeyError("boom")

    with pytest.raises(KeyError):
        amp.step(opt, scaler, bad_closure)
    _assert_bitwise(before, model, "after a failing closure")
    # training goes on: the next step neither sees stale gradients nor an "unscale_ already called"
    assert all(p.grad is None for p in model.parameters())
    scaler.scale(_loss(model, x, y)).backward()
    amp.step(opt, scaler, lambda: scaler.scale(_loss(model, x, y)).backward())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("zero_grad_where", ["outside", "inside_closure"])
def test_closure_first_step_equals_the_two_step_recipe(zero_grad_where):
    # With no gradient yet, amp.step calls the closure for the first pass too (the torch.optim
    # convention) and returns that loss; Lightning-style closures zero the gradients themselves, and
    # the leftover gradients of w + e must not be taken for the next first pass.
    x, y = _data()
    plain, closured = _model(), _model()
    opt_p, opt_c = _opt(plain), _opt(closured)
    s_p = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    s_c = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(3):
        _one_good_step(plain, opt_p, s_p, x, y)
        calls = []

        def closure():
            calls.append(1)
            if zero_grad_where == "inside_closure":
                opt_c.zero_grad()
            loss = _loss(closured, x, y)
            s_c.scale(loss).backward()
            return loss

        if zero_grad_where == "outside":
            opt_c.zero_grad()
        with torch.no_grad():
            at_w = _loss(closured, x, y)
        loss = amp.step(opt_c, s_c, closure)
        assert len(calls) == 2 and torch.equal(loss.detach(), at_w)
    _assert_bitwise(_snapshot(plain), closured, "closure-first amp.step vs first_step/second_step")
    assert s_c.get_scale() == s_p.get_scale()


@pytest.mark.parametrize("fails_at", [1, 2])
def test_closure_first_failure_leaves_weights_mask_and_counters(fails_at):
    x, y = _data()
    model = _model()
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu")
    _one_good_step(model, opt, scaler, x, y)
    before, mask, count = _snapshot(model), [m.clone() for m in opt.masks()], opt.step_count
    calls = []

    def closure():
        calls.append(1)
        scaler.scale(_loss(model, x, y)).backward()  # a partial gradient is left behind
        if len(calls) == fails_at:
            raise KeyError("data loader broke")

    opt.zero_grad()
    with pytest.raises(KeyError):
        amp.step(opt, scaler, closure)
    _assert_bitwise(before, model, f"after a failure in closure call {fails_at}")
    assert opt.step_count == count and all(torch.equal(a, b) for a, b in zip(opt.masks(), mask))
    assert all(p.grad is None for p in model.parameters())
    # a first closure that computes no gradient (a skipped batch) skips the step; then training goes on
    assert amp.step(opt, scaler, lambda: None) is None and opt.step_count == count
    amp.step(opt, scaler, lambda: scaler.scale(_loss(model, x, y)).backward())
    assert opt.step_count == count + 1


def test_scheduler_on_fsam_or_base_does_not_warn():
    x, y = _data()
    for attach_to_base in (False, True):
        model = _model()
        opt = _opt(model)
        sched = torch.optim.lr_scheduler.StepLR(opt.base_optimizer if attach_to_base else opt, step_size=1, gamma=0.5)
        scaler = torch.amp.GradScaler("cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _one_good_step(model, opt, scaler, x, y)
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_bad_arguments():
    model = _model()
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(TypeError, match="optimizer"):
        amp.first_step(torch.optim.SGD(model.parameters(), lr=0.1), scaler)
    with pytest.raises(TypeError, match="scaler"):
        amp.first_step(opt, object())
    with pytest.raises(RuntimeError, match="without amp.first_step"):
        amp.second_step(opt, scaler)
    with pytest.raises(TypeError, match="closure"):
        amp.step(opt, scaler, None)


@pytest.mark.gpu
def test_fp16_grad_scaler_overflow_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, y = (t.cuda() for t in _data())
    model = _model().cuda()
    opt = _opt(model, backend="auto")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)

    def scaled_backward():
        with torch.autocast("cuda", dtype=torch.float16):
            loss = _loss(model, x, y)
        scaler.scale(loss).backward()
        return loss

    scaled_backward()
    assert amp.first_step(opt, scaler)
    scaled_backward()
    assert amp.second_step(opt, scaler, zero_grad=True)
    before = _snapshot(model)
    scaled_backward()
    next(model.parameters()).grad[0, 0] = float("inf")
    assert not amp.first_step(opt, scaler)
    assert amp.second_step(opt, scaler, zero_grad=True) is False
    _assert_bitwise(before, model, "after an overflow on CUDA")
    assert scaler.get_scale() == 2.0**9
