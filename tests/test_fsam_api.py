"""FSAM's protocol, validation, checkpoints, memory contract and fault handling."""
import copy
import io
import math

import pytest
import torch

from fsam_kernels import FSAM, BackendUnavailable, available_backends
from helpers import clone_model, make_batches


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def fsam_step(model, opt, batch):
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, snap):
    for p, s in zip(model.parameters(), snap):
        assert torch.equal(p, s)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(rho=0.0), ValueError, "rho"),
        (dict(rho=-1.0), ValueError, "rho"),
        (dict(rho=float("inf")), ValueError, "rho"),
        (dict(rho=float("nan")), ValueError, "rho"),
        (dict(sparsity=-0.1), ValueError, "sparsity"),
        (dict(sparsity=1.5), ValueError, "sparsity"),
        (dict(mask_update_interval=0), ValueError, "mask_update_interval"),
        (dict(mask_update_interval=2.5), ValueError, "mask_update_interval"),
        (dict(fisher="hessian"), ValueError, "fisher"),
        (dict(backend="cuda-magic"), ValueError, "backend"),
        (dict(perturb_eps=-1.0), ValueError, "perturb_eps"),
        (dict(perturb_eps=0.0), ValueError, "perturb_eps"),
    ],
)
def test_bad_arguments_are_named(tiny_net, kwargs, exc, words):
    with pytest.raises(exc, match=words):
        FSAM(tiny_net.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize("base", [torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1), "adam", torch.nn.Linear])
def test_base_optimizer_must_be_an_optimizer_class(tiny_net, base):
    with pytest.raises(TypeError, match="base_optimizer"):
        FSAM(tiny_net.parameters(), base, lr=0.1)


def test_bad_group_rho_is_named(tiny_net):
    with pytest.raises(ValueError, match=r"rho in param_groups\[1\]"):
        FSAM([{"params": [tiny_net.fc1.weight]}, {"params": [tiny_net.fc2.weight], "rho": -2}], torch.optim.SGD, lr=0.1)


def test_complex_and_integer_params_rejected():
    with pytest.raises(TypeError, match="complex"):
        FSAM([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], torch.optim.SGD, lr=0.1)


def test_empty_params_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        FSAM([], torch.optim.SGD, lr=0.1)


def test_sparse_gradients_rejected_before_touching_weights():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = FSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    snap = snapshot(emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.first_step()
    assert_unchanged(emb, snap)


def test_gradient_of_another_shape_rejected_before_touching_weights(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, lr=0.1)
    loss_of(tiny_net, batches[0]).backward()
    snap = snapshot(tiny_net)
    weight = next(tiny_net.parameters())
    weight.grad.data = torch.zeros(3)  # .data bypasses the check of the .grad setter
    with pytest.raises(ValueError, match=r"gradient of shape \(3,\)"):
        opt.first_step()
    assert_unchanged(tiny_net, snap)


class CountingSGD(torch.optim.SGD):
    calls = 0

    def zero_grad(self, set_to_none=True):
        type(self).calls += 1
        super().zero_grad(set_to_none)


def test_zero_grad_follows_torch_for_every_group_and_a_custom_base(tiny_net, batches):
    params = list(tiny_net.parameters())
    opt = FSAM([{"params": params[:1]}, {"params": params[1:], "perturb": False}], torch.optim.SGD, lr=0.1)
    loss_of(tiny_net, batches[0]).backward()
    opt.zero_grad(set_to_none=False)  # torch's own: zeroed in place, kept
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()
    assert all(p.grad is None for p in params)  # the groups that are not perturbed too

    custom = FSAM(params, CountingSGD, lr=0.1)
    loss_of(tiny_net, batches[0]).backward()
    custom.zero_grad()
    assert CountingSGD.calls == 1 and all(p.grad is None for p in params)

    patched = []  # a zero_grad replaced on the instance is called too
    opt.base_optimizer.zero_grad = lambda set_to_none=True: patched.append(set_to_none)
    opt.zero_grad()
    assert patched == [True]


def test_no_gradient_at_all_is_a_clear_error(tiny_net):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="backward"):
        opt.first_step()


def test_unknown_backend_missing_raises_with_reason(tiny_net):
    if "triton" in available_backends("cpu"):
        pytest.skip("triton runs on this CPU (interpreter mode)")
    with pytest.raises(BackendUnavailable, match="triton"):
        FSAM(tiny_net.parameters(), torch.optim.SGD, lr=0.1, backend="triton")


# ----------------------------------------------------------------------------- protocol
def test_protocol_errors(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without a first_step"):
        opt.second_step()
    loss_of(tiny_net, batches[0]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    opt.second_step()


def test_restore_is_exact_and_idempotent(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.5, sparsity=0.5, lr=0.1)
    snap = snapshot(tiny_net)
    loss_of(tiny_net, batches[0]).backward()
    opt.first_step()
    assert any(not torch.equal(p, s) for p, s in zip(tiny_net.parameters(), snap))
    opt.restore()
    assert_unchanged(tiny_net, snap)
    opt.restore()
    assert_unchanged(tiny_net, snap)
    with pytest.raises(RuntimeError, match="without a first_step"):
        opt.second_step()


def test_closure_form_skips_a_nonfinite_step(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    fsam_step(tiny_net, opt, batches[0])
    snap = snapshot(tiny_net)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in tiny_net.parameters()]
    loss_of(tiny_net, batches[1]).backward()
    tiny_net.fc2.bias.grad[0] = float("inf")
    calls = []
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.step(lambda: calls.append(1)) is None
    assert calls == []  # no second pass
    assert_unchanged(tiny_net, snap)
    for p, m in zip(tiny_net.parameters(), momentum):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert all(p.grad is None for p in tiny_net.parameters())
    fsam_step(tiny_net, opt, batches[1])  # the protocol is back to idle


def test_closure_error_restores_weights(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    snap = snapshot(tiny_net)
    loss_of(tiny_net, batches[0]).backward()

    def closure():
        raise KeyError("data loader broke")

    with pytest.raises(KeyError):
        opt.step(closure)
    assert_unchanged(tiny_net, snap)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_norm(tiny_net, batches, bad):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.5, sparsity=0.5, mask_update_interval=1, lr=0.1)
    fsam_step(tiny_net, opt, batches[0])
    masks_before = opt.masks()
    snap = snapshot(tiny_net)
    loss_of(tiny_net, batches[1]).backward()
    tiny_net.fc1.weight.grad[0, 0] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        norm = opt.first_step()
    assert not math.isfinite(float(norm))
    assert_unchanged(tiny_net, snap)
    for a, b in zip(opt.masks(), masks_before):
        assert torch.equal(a, b)  # no mask update
    assert opt.step_count == 1
    opt.restore()  # the caller skips this step
    assert_unchanged(tiny_net, snap)
    opt.zero_grad()
    fsam_step(tiny_net, opt, batches[1])  # and training goes on
    assert opt.step_count == 2


# ----------------------------------------------------------------------------- masks
def test_mask_update_interval_and_exact_k(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.9, mask_update_interval=3, lr=0.1)
    n = sum(p.numel() for p in tiny_net.parameters())
    history = []
    for batch in batches:
        fsam_step(tiny_net, opt, batch)
        masks = opt.masks()
        assert [m.shape for m in masks] == [p.shape for p in tiny_net.parameters()]
        assert all(m.dtype == torch.bool for m in masks)
        assert sum(int(m.sum()) for m in masks) == round(0.1 * n)
        history.append(torch.cat([m.reshape(-1) for m in masks]))
    # updated on steps 0 and 3 only
    assert torch.equal(history[0], history[1]) and torch.equal(history[1], history[2])
    assert not torch.equal(history[2], history[3])
    assert torch.equal(history[3], history[4]) and torch.equal(history[4], history[5])


def test_mask_is_used_in_the_same_step(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.5, sparsity=0.9, lr=0.1)
    snap = snapshot(tiny_net)
    loss_of(tiny_net, batches[0]).backward()
    opt.first_step()
    for p, s, m in zip(tiny_net.parameters(), snap, opt.masks()):
        assert torch.equal(p[~m], s[~m])
        changed = p != s
        assert not (changed & ~m).any()
    assert sum(int((p != s).sum()) for p, s in zip(tiny_net.parameters(), snap)) > 0
    opt.restore()


# ----------------------------------------------------------------------------- memory
def test_memory_contract(tiny_net, batches):
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64))
    n = sum(p.numel() for p in model.parameters())
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.9, lr=0.1)
    x = torch.randn(8, 64)
    model(x).square().mean().backward()
    opt.first_step(zero_grad=True)
    during = opt.memory_stats()
    assert during["saved"] <= 0.45 * n  # 10 % of fp32 values, compact
    assert during["mask"] + during["mask_aux"] + during["saved"] <= 0.6 * n
    model(x).square().mean().backward()
    opt.second_step(zero_grad=True)
    after = opt.memory_stats()
    assert after["saved"] == 0
    assert after["persistent"] <= 0.15 * n
    # dense SAM keeps 4 B/param: FSAM's whole state stays far below
    assert after["mask"] * 8 >= n  # one bit per element, no less


# ----------------------------------------------------------------------------- checkpoints
def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("base", [torch.optim.AdamW, torch.optim.SGD])
def test_save_load_continue_is_bit_identical(tiny_net, dtype, base):
    kw = dict(lr=1e-2) if base is torch.optim.AdamW else dict(lr=0.1, momentum=0.9)
    batches = make_batches(n_batches=8)
    m1 = clone_model(tiny_net, dtype)
    o1 = FSAM(m1.parameters(), base, rho=0.1, sparsity=0.8, mask_update_interval=3, **kw)
    for b in batches[:4]:
        fsam_step(m1, o1, b)
    sd = roundtrip(o1.state_dict())
    assert sd["fsam"]["mask"].dtype == torch.uint8
    weights = roundtrip(m1.state_dict())
    for b in batches[4:]:
        fsam_step(m1, o1, b)

    m2 = clone_model(tiny_net, dtype)
    m2.load_state_dict(weights)
    o2 = FSAM(m2.parameters(), base, rho=0.1, sparsity=0.8, mask_update_interval=3, **kw)
    o2.load_state_dict(sd)
    assert o2.step_count == 4
    assert o2.masks() and all(m.dtype == torch.bool for m in o2.masks())
    for b in batches[4:]:
        fsam_step(m2, o2, b)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    # the base optimizer's state came back too (davda54/sam loses it)
    assert len(o2.base_optimizer.state) == len(o1.base_optimizer.state) > 0


def test_empirical_accumulator_survives_checkpoint(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, fisher="empirical", lr=0.1)
    loss_of(tiny_net, batches[0]).backward()
    opt.accumulate_fisher()
    sd = roundtrip(opt.state_dict())
    assert all(f.dtype == torch.float32 for f in sd["fsam"]["fisher_accum"])
    m2 = clone_model(tiny_net, torch.bfloat16)
    o2 = FSAM(m2.parameters(), torch.optim.SGD, fisher="empirical", lr=0.1)
    o2.load_state_dict(sd)
    assert all(f.dtype == torch.float32 for f in o2._mask.fisher)  # not cast to the params' bf16
    assert o2.memory_stats()["fisher"] == 4 * sum(p.numel() for p in m2.parameters())


def test_load_rejects_foreign_state_and_changes_nothing(batches):
    def two_layers(a, b):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(a, b, bias=False), torch.nn.Linear(b, a, bias=False))

    model = two_layers(4, 6)
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sparsity=0.5)
    x = torch.randn(3, 4)
    model(x).square().sum().backward()
    opt.step(lambda: model(x).square().sum().backward())
    before = copy.deepcopy(opt.state_dict())

    # neither FSAM's nor a torch.optim state dict (a plain one is a warm start: test_state_and_hooks.py)
    with pytest.raises(ValueError, match="FSAM state dict, or a torch.optim state dict"):
        opt.load_state_dict({"state": {}, "lr": 0.1})
    # same number of tensors, different shapes (masked sizes differ) and another learning rate
    other_model = two_layers(3, 5)
    other = FSAM(other_model.parameters(), torch.optim.SGD, lr=0.7, momentum=0.9, sparsity=0.5)
    other_model(torch.randn(2, 3)).sum().backward()
    other.step(lambda: other_model(torch.randn(2, 3)).sum().backward())
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] has shape \(6, 4\), the checkpoint's \(5, 3\)"):
        opt.load_state_dict(other.state_dict())
    after = opt.state_dict()
    assert after["param_groups"][0]["lr"] == 0.1
    assert torch.equal(after["fsam"]["mask"], before["fsam"]["mask"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_model_moved_to_another_dtype_after_construction(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.8, mask_update_interval=10, lr=0.1)
    fsam_step(tiny_net, opt, batches[0])
    masks = opt.masks()
    tiny_net.to(torch.bfloat16)
    snap = snapshot(tiny_net)
    loss_of(tiny_net, batches[1]).backward()
    opt.first_step(zero_grad=True)
    assert any(not torch.equal(p, q) for p, q in zip(tiny_net.parameters(), snap))
    opt.restore()
    assert_unchanged(tiny_net, snap)
    for a, b in zip(opt.masks(), masks):  # the mask is kept (no update due)
        assert torch.equal(a, b)


def test_non_contiguous_params_are_rejected_before_anything_moves():
    conv = torch.nn.Conv2d(3, 4, 3)
    opt = FSAM(conv.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.0)
    conv.to(memory_format=torch.channels_last)
    snap = snapshot(conv)
    conv(torch.randn(1, 3, 5, 5)).sum().backward()
    with pytest.raises(ValueError, match="contiguous"):
        opt.first_step()
    assert_unchanged(conv, snap)


def test_add_param_group_is_validated(tiny_net):
    opt = FSAM([tiny_net.fc1.weight], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="complex"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]})
    with pytest.raises(TypeError, match="adaptive"):
        opt.add_param_group({"params": [tiny_net.fc2.weight], "adaptive": "no"})
    with pytest.raises(ValueError, match=r"rho in param_groups\[1\]"):
        opt.add_param_group({"params": [tiny_net.fc2.weight], "rho": 0})
    assert len(opt.param_groups) == 1


def test_negative_zero_fisher_follows_the_tie_rule():
    w = torch.nn.Parameter(torch.zeros(3))
    opt = FSAM([w], torch.optim.SGD, fisher="empirical", sparsity=2 / 3, lr=0.1)
    opt.update_mask(fisher=[torch.tensor([-0.0, 0.0, 0.0])])
    assert opt.masks()[0].tolist() == [True, False, False]


# ----------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_train_and_restore_exactly(tiny_net, batches, dtype):
    model = clone_model(tiny_net, dtype)
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.7, lr=0.05)
    for b in batches[:3]:
        snap = snapshot(model)
        loss_of(model, b).backward()
        opt.first_step(zero_grad=True)
        opt.restore()
        assert_unchanged(model, snap)
        loss_of(model, b).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, b).backward()
        opt.second_step(zero_grad=True)
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- empirical Fisher mode
def test_empirical_mode_needs_fisher_before_first_step(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, fisher="empirical", lr=0.1)
    snap = snapshot(tiny_net)
    loss_of(tiny_net, batches[0]).backward()
    with pytest.raises(RuntimeError, match="accumulate_fisher"):
        opt.first_step()
    assert_unchanged(tiny_net, snap)
    with pytest.raises(RuntimeError, match="Fisher"):
        opt.update_mask()


def test_empirical_mode_accumulates_and_updates(tiny_net, batches):
    from plain_fsam import plain_topk_masks

    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, fisher="empirical", sparsity=0.75, mask_update_interval=2, lr=0.1)
    params = list(tiny_net.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for b in batches[:3]:
        opt.zero_grad()
        loss_of(tiny_net, b).backward()
        opt.accumulate_fisher()
        for e, p in zip(expected, params):
            e.add_(p.grad * p.grad)
    torch.testing.assert_close(opt._mask.fisher, expected)
    k = round(0.25 * sum(p.numel() for p in params))
    want = plain_topk_masks(expected, k)
    opt.zero_grad()
    fsam_step(tiny_net, opt, batches[3])  # mask-update step: built from the accumulator, which is freed
    assert opt._mask.fisher is None and opt.memory_stats()["fisher"] == 0
    for a, b in zip(opt.masks(), want):
        assert torch.equal(a, b)
    fsam_step(tiny_net, opt, batches[4])  # due again, but nothing accumulated: the mask is kept
    for a, b in zip(opt.masks(), want):
        assert torch.equal(a, b)


def _poison_grad(model, value=float("nan")):
    model.fc1.weight.grad[0, 0] = value


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_accumulated_fisher_is_discarded_never_used(tiny_net, batches, value):
    # e.g. an fp16 step whose gradients overflowed was accumulated: the mask must not be built from it
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, fisher="empirical", sparsity=0.75, mask_update_interval=1,
               lr=0.1)
    loss_of(tiny_net, batches[0]).backward()
    _poison_grad(tiny_net, value)
    opt.accumulate_fisher()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="not finite.*discarded"):
        opt.update_mask()
    assert opt._mask.fisher is None and opt._mask.bits is None
    # the same at a mask-update step with no mask yet: an error, weights untouched
    loss_of(tiny_net, batches[0]).backward()
    _poison_grad(tiny_net, value)
    opt.accumulate_fisher()
    opt.zero_grad()
    loss_of(tiny_net, batches[1]).backward()
    snap = snapshot(tiny_net)
    with pytest.raises(RuntimeError, match="no mask to perturb with"):
        opt.first_step()
    assert_unchanged(tiny_net, snap)
    # with a mask: warn, keep it, and perturb as usual
    opt.zero_grad()
    loss_of(tiny_net, batches[2]).backward()
    opt.accumulate_fisher()
    opt.update_mask()
    kept = [m.clone() for m in opt.masks()]
    loss_of(tiny_net, batches[3]).backward()
    _poison_grad(tiny_net, value)
    opt.accumulate_fisher()
    opt.zero_grad()
    loss_of(tiny_net, batches[4]).backward()
    with pytest.warns(RuntimeWarning, match="accumulated Fisher is not finite"):
        opt.first_step()
    assert opt.phase.value == "perturbed" and opt._mask.fisher is None
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), kept))
    opt.restore()


def test_update_mask_refuses_non_finite_gradients_in_batch_mode(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1)
    loss_of(tiny_net, batches[0]).backward()
    opt.update_mask()
    kept = [m.clone() for m in opt.masks()]
    opt.zero_grad()
    loss_of(tiny_net, batches[1]).backward()
    _poison_grad(tiny_net)
    with pytest.raises(ValueError, match="NaN or inf"):
        opt.update_mask()
    assert all(torch.equal(a, b) for a, b in zip(opt.masks(), kept))


def test_update_mask_with_given_fisher(tiny_net, batches):
    from fsam_kernels import empirical_fisher

    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, fisher="empirical", sparsity=0.5, lr=0.1)
    fisher = empirical_fisher(tiny_net, torch.nn.functional.cross_entropy, batches[:2])
    opt.update_mask(fisher=fisher)
    masks = opt.masks()
    assert sum(int(m.sum()) for m in masks) == round(0.5 * sum(p.numel() for p in tiny_net.parameters()))
    fsam_step(tiny_net, opt, batches[2])
    with pytest.raises(ValueError, match="fisher"):
        opt.update_mask(fisher=[torch.zeros(1)])
    with pytest.raises(ValueError, match="non-negative"):
        opt.update_mask(fisher={p: -torch.ones_like(p) for p in tiny_net.parameters()})


def test_add_param_group_resets_mask(tiny_net, batches):
    opt = FSAM([tiny_net.fc1.weight], torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1)
    fsam_step(tiny_net, opt, batches[0])
    assert len(opt.masks()) == 1
    opt.add_param_group({"params": [tiny_net.fc2.weight], "rho": 0.2})
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["lr"] == 0.1
    fsam_step(tiny_net, opt, batches[1])
    assert len(opt.masks()) == 2


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_masked_parameter_without_a_gradient_scores_zero_in_batch_mode(backend):
    # fisher="batch": a masked parameter that got no gradient this step has Fisher 0, below every
    # other masked element with a gradient, however small that gradient is.
    from fsam_kernels import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run on this CPU")
    used = torch.nn.Parameter(torch.randn(8))
    unused = torch.nn.Parameter(torch.randn(8))
    opt = FSAM([used, unused], torch.optim.SGD, lr=0.1, sparsity=0.5, fisher="batch", backend=backend)
    used.grad = torch.full((8,), 1e-3) * torch.arange(1, 9)  # squares far below 1
    opt.first_step()
    assert opt.masks()[0].all() and not opt.masks()[1].any()
    opt.restore()
