"""FSAM trajectories against independent plain-loop implementations."""
import pytest
import torch

from fsam_kernels import FSAM, available_backends
from plain_fsam import DavdaSAM, PlainFSAM
from helpers import clone_model, first_mismatch

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw_amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1)),
}
CPU_BACKENDS = available_backends("cpu")


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def assert_same_params(m1, m2, exact, rtol=1e-5, atol=1e-6):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        if exact:
            assert torch.equal(a, b), f"{name}: {first_mismatch(a, b)}"
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def run_fsam(model, batches, opt):
    for batch in batches:
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)


def run_plain(model, batches, opt):
    for batch in batches:
        loss_of(model, batch).backward()
        opt.first_step()
        opt.base.zero_grad()
        loss_of(model, batch).backward()
        opt.second_step()
        opt.base.zero_grad()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("sparsity,interval,adaptive", [(0.9, 1, False), (0.5, 3, False), (0.75, 2, True), (0.97, 4, False)])
def test_matches_plain_loop(tiny_net, batches, backend, base, sparsity, interval, adaptive):
    cls, kw = BASES[base]
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    opt = FSAM(m1.parameters(), cls, rho=0.1, sparsity=sparsity, mask_update_interval=interval,
               adaptive=adaptive, backend=backend, **kw)
    plain = PlainFSAM([{"params": list(m2.parameters()), "rho": 0.1, "adaptive": adaptive}], cls, sparsity, interval, **kw)
    run_fsam(m1, batches, opt)
    run_plain(m2, batches, plain)
    assert_same_params(m1, m2, exact=(backend == "torch"))
    assert opt.step_count == len(batches)
    for mask, p in zip(opt.masks(), m2.parameters()):
        assert torch.equal(mask, plain.masks[id(p)])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("base", ["sgd", "adamw_amsgrad"])
def test_sparsity_zero_is_dense_sam(tiny_net, batches, backend, adaptive, base):
    cls, kw = BASES[base]
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    opt = FSAM(m1.parameters(), cls, rho=0.05, sparsity=0.0, adaptive=adaptive, backend=backend, **kw)
    sam = DavdaSAM(m2.parameters(), cls, rho=0.05, adaptive=adaptive, **kw)
    run_fsam(m1, batches, opt)
    run_plain(m2, batches, sam)
    assert_same_params(m1, m2, exact=(backend == "torch"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("base", list(BASES))
def test_sparsity_one_is_base_optimizer(tiny_net, batches, backend, base):
    cls, kw = BASES[base]
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    opt = FSAM(m1.parameters(), cls, rho=0.5, sparsity=1.0, backend=backend, **kw)
    ref = cls(m2.parameters(), **kw)
    run_fsam(m1, batches, opt)
    for batch in batches:
        # FSAM's second gradient is taken at w + 0 = w: the same gradient, twice.
        loss_of(m2, batch).backward()
        ref.step()
        ref.zero_grad()
    assert_same_params(m1, m2, exact=True)
    assert all(int(m.sum()) == 0 for m in opt.masks())


def test_param_group_options(tiny_net, batches):
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)

    def groups(m, fsam):
        return [
            {"params": [m.fc1.weight, m.fc2.weight], "rho": 0.2},
            {"params": [m.emb.weight], "fisher_mask": False, "rho": 0.05},  # dense
            {"params": [m.norm.weight, m.norm.bias], "perturb": False},  # stepped, never perturbed
            {"params": [m.fc1.bias, m.fc2.bias], "adaptive": True, "rho": 0.3},
        ]

    opt = FSAM(groups(m1, True), torch.optim.SGD, rho=0.1, sparsity=0.8, mask_update_interval=2, lr=0.1, backend="torch")
    plain_groups = [dict(g) for g in groups(m2, False)]
    for g in plain_groups:
        g.setdefault("rho", 0.1)
    plain = PlainFSAM(plain_groups, torch.optim.SGD, 0.8, 2, lr=0.1)
    run_fsam(m1, batches, opt)
    run_plain(m2, batches, plain)
    assert_same_params(m1, m2, exact=True)
    # the masked set is the groups with perturb=True and fisher_mask=True, in param_group order
    assert [tuple(m.shape) for m in opt.masks()] == [(16, 8), (3, 16), (16,), (3,)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rho_changed_between_steps(tiny_net, batches, backend):
    # A rho schedule (GSAM's, or a user's) changes only rho: every step uses its own rho, while the
    # mask, its backend data and the layout's tensors (tensors_key) stay as they are between updates.
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    opt = FSAM([{"params": list(m1.parameters())[:2], "rho": 0.05}, {"params": list(m1.parameters())[2:]}],
               torch.optim.SGD, rho=0.1, sparsity=0.7, mask_update_interval=3, lr=0.1, backend=backend)
    plain_groups = [{"params": list(m2.parameters())[:2], "rho": 0.05}, {"params": list(m2.parameters())[2:], "rho": 0.1}]
    plain = PlainFSAM(plain_groups, torch.optim.SGD, 0.7, 3, lr=0.1)
    keys, auxes = set(), []
    for t, batch in enumerate(batches):
        for group, plain_group in zip(opt.param_groups, plain_groups):
            group["rho"] = plain_group["rho"] = 0.02 * (t + 1) + (0.1 if group is opt.param_groups[1] else 0.0)
        run_fsam(m1, [batch], opt)
        run_plain(m2, [batch], plain)
        keys.add(id(opt._layout.tensors_key))
        auxes.append(opt._mask.aux)
        assert opt._layout.rho[0] == plain_groups[0]["rho"] and opt._layout.rho[-1] == plain_groups[1]["rho"]
    assert_same_params(m1, m2, exact=backend == "torch")
    assert len(keys) == 1
    # the mask data is rebuilt at mask updates (steps 0 and 3) only, not when rho changes
    assert auxes[1] is auxes[0] and auxes[2] is auxes[0] and auxes[4] is auxes[3]


def test_perturb_false_params_never_move_during_first_step(tiny_net, batches):
    opt = FSAM([{"params": [tiny_net.fc1.weight], "perturb": False},
                {"params": [p for n, p in tiny_net.named_parameters() if n != "fc1.weight"]}],
               torch.optim.SGD, rho=0.5, sparsity=0.0, lr=0.1)
    before = tiny_net.fc1.weight.detach().clone()
    loss_of(tiny_net, batches[0]).backward()
    opt.first_step()
    assert torch.equal(tiny_net.fc1.weight, before)
    opt.restore()


def test_params_without_grad_are_skipped(tiny_net, batches):
    extra = torch.nn.Parameter(torch.randn(5))  # never used in the loss: no .grad
    opt = FSAM([*tiny_net.parameters(), extra], torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1)
    before = extra.detach().clone()
    loss_of(tiny_net, batches[0]).backward()
    opt.first_step(zero_grad=True)
    assert torch.equal(extra, before)
    loss_of(tiny_net, batches[0]).backward()
    opt.second_step()
    assert torch.equal(extra, before)
    # its Fisher is zero, so it is only picked to fill k after every non-zero score (lowest index first)
    assert opt.masks()[-1].sum() == 0


def test_closure_form_matches_two_steps(tiny_net, batches):
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    o1 = FSAM(m1.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=2, lr=1e-2)
    o2 = FSAM(m2.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=2, lr=1e-2)
    losses = []
    for batch in batches:
        loss_of(m1, batch).backward()
        losses.append(o1.step(lambda: (loss := loss_of(m1, batch)).backward() or loss))
        o1.zero_grad()
    run_fsam(m2, batches, o2)
    assert_same_params(m1, m2, exact=True)
    assert all(isinstance(l, torch.Tensor) and l.ndim == 0 for l in losses)


def test_closure_form_runs_the_first_pass_when_no_gradient_exists(tiny_net, batches):
    # The torch.optim convention (PyTorch Lightning's automatic optimization): step(closure) with no
    # backward before it calls the closure for the gradient at w too, and returns that first loss.
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    o1 = FSAM(m1.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=2, lr=1e-2)
    o2 = FSAM(m2.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=2, lr=1e-2)
    for batch in batches:
        calls = []

        def closure():
            calls.append(1)
            o1.zero_grad()
            loss = loss_of(m1, batch)
            loss.backward()
            return loss

        with torch.no_grad():
            at_w = loss_of(m1, batch)
        o1.zero_grad()
        loss = o1.step(closure)
        assert len(calls) == 2 and torch.equal(loss.detach(), at_w)
    run_fsam(m2, batches, o2)
    assert_same_params(m1, m2, exact=True)


def test_closure_form_lightning_style_zero_grad_inside_the_closure(tiny_net, batches):
    # Lightning zeroes the gradients inside the closure and never outside: after the first step the
    # gradients of w + e are still there, and must not be taken for a first pass.
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    o1 = FSAM(m1.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, mask_update_interval=2, lr=0.1, momentum=0.9)
    o2 = FSAM(m2.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, mask_update_interval=2, lr=0.1, momentum=0.9)
    calls = []
    for batch in batches:
        def closure():
            calls.append(1)
            o1.zero_grad()
            loss = loss_of(m1, batch)
            loss.backward()
            return loss

        o1.step(closure)
    assert len(calls) == 2 * len(batches)
    run_fsam(m2, batches, o2)
    assert_same_params(m1, m2, exact=True)


def test_closure_failures_leave_weights_mask_and_counters_as_they_were(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, mask_update_interval=1, lr=0.1)
    run_fsam(tiny_net, batches[:1], opt)
    snap = [p.detach().clone() for p in tiny_net.parameters()]
    mask, count = [m.clone() for m in opt.masks()], opt.step_count

    def failing(at):
        calls = []

        def closure():
            calls.append(1)
            loss = loss_of(tiny_net, batches[2])
            loss.backward()  # a partial gradient is left behind when it fails afterwards
            if len(calls) == at:
                raise KeyError("data loader broke")
            return loss
        return closure

    for at in (1, 2):  # the first closure (gradient at w) or the second (at w + e)
        opt.zero_grad()
        with pytest.raises(KeyError):
            opt.step(failing(at))
        assert all(torch.equal(p, s) for p, s in zip(tiny_net.parameters(), snap))
        assert opt.step_count == count and all(torch.equal(a, b) for a, b in zip(opt.masks(), mask))
        assert all(p.grad is None for p in tiny_net.parameters())
    # a first closure that computes no gradient (a skipped batch) skips the step
    assert opt.step(lambda: None) is None and opt.step_count == count


def test_lr_scheduler_on_fsam_or_base(tiny_net, batches):
    import warnings

    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    o1 = FSAM(m1.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    o2 = FSAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2.base_optimizer, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for batch in batches:
            run_fsam(m1, [batch], o1)
            s1.step()
            run_fsam(m2, [batch], o2)
            s2.step()
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"] == 0.1 * 0.5 ** 3
    assert_same_params(m1, m2, exact=True)
