"""SAM, ESAM and GSAM (plain and Fisher-masked) against independent plain-loop implementations.

The oracles below are written from the papers and davda54/sam, not from the package: full copies of
the weights, dense bool masks, a sort of all Fisher values, Python-level sample selection.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fsam_kernels import ESAM, FSAM, GSAM, SAM
from helpers import family_step, per_sample
from plain_fsam import plain_topk_masks as plain_topk

EPS = 1e-12

BASES = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.01, amsgrad=True)),
    "adagrad": (torch.optim.Adagrad, dict(lr=0.1)),
}


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model(seed=0):
    torch.manual_seed(seed)
    return MLP()


def make_data(steps=4, batch=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)) for _ in range(steps)]


def assert_params_close(a, b, exact=False):
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        if exact:
            assert torch.equal(p, q), f"param {i}: max diff {(p - q).abs().max().item():.3e}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


# --------------------------------------------------------------------------- plain oracles
def plain_norm(params, adaptive=False):
    return torch.norm(
        torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2) for p in params if p.grad is not None]),
        p=2,
    )


class PlainSAM:
    """davda54/sam, verbatim in spirit: full copies of the weights, p.data swapped back."""

    def __init__(self, params, base_cls, rho, adaptive=False, **kw):
        self.params, self.rho, self.adaptive = list(params), rho, adaptive
        self.base = base_cls(self.params, **kw)

    @torch.no_grad()
    def first_step(self):
        grad_norm = plain_norm(self.params, self.adaptive)
        scale = self.rho / (grad_norm + EPS)
        self.old = {}
        for p in self.params:
            self.old[p] = p.data.clone()
            e_w = (torch.pow(p, 2) if self.adaptive else 1.0) * p.grad * scale.to(p)
            p.add_(e_w)

    @torch.no_grad()
    def second_step(self):
        for p in self.params:
            p.data = self.old[p]
        self.base.step()


class PlainMaskedPerturb:
    """The perturbation shared by the ESAM and GSAM oracles: optional Fisher top-k (every `interval`
    steps, from g*g), optional random keep-bits with probability beta and rho / beta."""

    def __init__(self, params, rho, sparsity, interval=100, beta=1.0, generator=None):
        self.params, self.rho, self.sparsity, self.interval = list(params), rho, sparsity, interval
        self.beta, self.generator = beta, generator
        self.steps, self.fisher_masks = 0, None

    @torch.no_grad()
    def perturb(self, rho):
        if self.fisher_masks is None or self.steps % self.interval == 0:
            n = sum(p.numel() for p in self.params)
            k = int(round((1 - self.sparsity) * n))
            self.fisher_masks = plain_topk([p.grad.float() ** 2 for p in self.params], k)
        masks = list(self.fisher_masks)
        if self.beta < 1.0:
            masks = [
                m & (torch.rand(p.numel(), generator=self.generator) < self.beta).view(p.shape)
                for m, p in zip(masks, self.params)
            ]
            rho = rho / self.beta
        norm = plain_norm(self.params)
        scale = (norm + EPS).reciprocal() * torch.tensor(rho, dtype=torch.float32)
        self.old = [p.detach().clone() for p in self.params]
        for p, m in zip(self.params, masks):
            p[m] += (p.grad * scale)[m]
        self.steps += 1
        return masks

    @torch.no_grad()
    def restore(self):
        for p, o in zip(self.params, self.old):
            p.copy_(o)


# --------------------------------------------------------------------------- SAM / ASAM
@pytest.mark.parametrize("base", list(BASES), ids=list(BASES))
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_is_bit_identical_to_davda54_loop(base, adaptive):
    cls, kw = BASES[base]
    rho = 0.5 if adaptive else 0.05
    ours, theirs = make_model(), make_model()
    opt = SAM(ours.parameters(), cls, rho=rho, adaptive=adaptive, backend="torch", **kw)
    plain = PlainSAM(theirs.parameters(), cls, rho, adaptive, **kw)
    for x, y in make_data():
        F.cross_entropy(ours(x), y).backward()
        opt.step(lambda: F.cross_entropy(ours(x), y).backward())
        opt.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        plain.first_step()
        plain.base.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        plain.second_step()
        plain.base.zero_grad()
    assert_params_close(ours, theirs, exact=True)


def test_asam_with_unscaled_biases_is_the_authors_convention_without_eta():
    """SamsungLabs' ASAM scales weights only (T_w = |w| + eta, biases T = 1); with eta = 0 that is biases
    in a group with adaptive=False: e = rho * T^2 g / ||T g|| over weights and biases together."""
    g = torch.Generator().manual_seed(2)
    w, b = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    gw, gb = torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    pw, pb = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    opt = SAM([{"params": [pw], "adaptive": True}, {"params": [pb], "adaptive": False}], torch.optim.SGD,
              rho=0.5, lr=0.1, backend="torch")
    pw.grad, pb.grad = gw.clone(), gb.clone()
    opt.first_step()
    norm = torch.sqrt(((w.abs() * gw) ** 2).sum() + (gb**2).sum())
    torch.testing.assert_close(pw.detach(), w + 0.5 * w.abs() ** 2 * gw / (norm + EPS), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(pb.detach(), b + 0.5 * gb / (norm + EPS), rtol=1e-6, atol=1e-7)
    opt.restore()


def test_sam_has_no_mask_and_refuses_one():
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    x, y = make_data(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    assert opt.masks() == [] and opt.memory_stats()["mask"] == 0
    with pytest.raises(ValueError, match="SAM has no Fisher mask"):
        SAM([{"params": model.parameters(), "fisher_mask": True}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5)
    with pytest.raises(TypeError, match="SAM has no Fisher mask, so it takes no structure"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, structure="2:4")


# --------------------------------------------------------------------------- ESAM
def plain_esam_run(model, data, cls, kw, rho, beta, gamma, sparsity, seed, interval=100):
    params = list(model.parameters())
    base = cls(params, **kw)
    pert = PlainMaskedPerturb(params, rho, sparsity, interval, beta, torch.Generator().manual_seed(seed))
    for x, y in data:
        before = per_sample(model, x, y)
        before.mean().backward()
        pert.perturb(rho)
        base.zero_grad()
        if gamma < 1.0:
            with torch.no_grad():
                rise = (per_sample(model, x, y) - before.detach()).tolist()
            keep = min(len(rise), max(1, round(gamma * len(rise))))
            idx = sorted(sorted(range(len(rise)), key=lambda i: (-rise[i], i))[:keep])
            x2, y2 = x[idx], y[idx]
        else:
            x2, y2 = x, y
        per_sample(model, x2, y2).mean().backward()
        pert.restore()
        base.step()
        base.zero_grad()


def esam_run(model, data, cls, kw, rho, beta, gamma, sparsity, seed, interval=100):
    opt = ESAM(model.parameters(), cls, rho=rho, beta=beta, gamma=gamma, sparsity=sparsity,
               mask_update_interval=interval, generator=torch.Generator().manual_seed(seed), backend="torch", **kw)
    for x, y in data:
        losses = per_sample(model, x, y)
        losses.mean().backward()

        def closure(idx):
            return per_sample(model, x, y) if idx is None else per_sample(model, x[idx], y[idx])

        opt.step(closure, losses=losses)
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("base", list(BASES), ids=list(BASES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["esam", "f-esam"])
def test_esam_matches_plain_loop(base, sparsity):
    cls, kw = BASES[base]
    ours, theirs = make_model(), make_model()
    data = make_data()
    esam_run(ours, data, cls, kw, 0.05, 0.6, 0.5, sparsity, seed=3, interval=2)
    plain_esam_run(theirs, data, cls, kw, 0.05, 0.6, 0.5, sparsity, seed=3, interval=2)
    assert_params_close(ours, theirs)


def test_esam_with_beta_and_gamma_one_is_sam():
    ours, theirs = make_model(), make_model()
    data = make_data()
    esam_run(ours, data, torch.optim.SGD, dict(lr=0.1), 0.05, 1.0, 1.0, 0.0, seed=0)
    opt = SAM(theirs.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    for x, y in data:
        F.cross_entropy(theirs(x), y).backward()
        opt.step(lambda: F.cross_entropy(theirs(x), y).backward())
        opt.zero_grad()
    assert_params_close(ours, theirs)


def test_esam_swp_perturbs_a_beta_fraction_scaled_by_one_over_beta():
    w = torch.nn.Parameter(torch.zeros(4000))  # from 0, w + e == e exactly
    opt = ESAM([w], torch.optim.SGD, rho=0.1, beta=0.25, gamma=1.0, lr=0.1, backend="torch",
               generator=torch.Generator().manual_seed(0))
    w.grad = torch.ones(4000)
    before = w.detach().clone()
    opt.first_step()
    moved = w.detach() != before
    assert 0.2 < moved.float().mean().item() < 0.3
    # Each perturbed element moved by rho / beta / ||g||: the expected perturbation is SAM's.
    step = (w.detach() - before)[moved]
    torch.testing.assert_close(step, torch.full_like(step, 0.1 / 0.25 / 4000 ** 0.5), rtol=1e-5, atol=0)
    # Same memory contract as FSAM: only the perturbed elements' originals are saved.
    assert opt.memory_stats()["saved"] == int(moved.sum()) * 4
    opt.restore()
    assert torch.equal(w.detach(), before)


def test_esam_random_bits_are_anded_with_the_fisher_mask():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 8))
    opt = ESAM([w], torch.optim.SGD, beta=0.5, sparsity=0.75, lr=0.1, backend="torch")
    w.grad = torch.randn(64, 8)
    before = w.detach().clone()
    opt.first_step()
    moved = w.detach() != before
    fisher = opt.masks()[0]
    assert int(fisher.sum()) == 128
    assert not bool((moved & ~fisher).any())
    assert 0 < int(moved.sum()) < 128
    opt.restore()


def test_esam_select_samples_picks_the_largest_rise_ties_lowest_index():
    opt = ESAM([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, gamma=0.5, lr=0.1)
    before = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    after = torch.tensor([1.5, 2.0, 1.5, 0.0, 3.0, 1.5])
    assert opt.select_samples(before, after).tolist() == [0, 1, 4]
    opt.gamma = 0.01
    assert opt.select_samples(before, after).tolist() == [4]


@pytest.mark.parametrize("gamma, batch, kept", [(0.3, 5, 2), (0.1, 5, 1), (0.42, 5, 2), (0.7, 5, 4)])
def test_esam_keeps_round_gamma_times_batch_samples(gamma, batch, kept):
    """max(1, round(gamma * B)) where gamma * B is not whole: 1.5 -> 2, 0.5 -> 1 (at least one),
    2.1 -> 2, 3.5 -> 4 (not floor, not ceil, not int(gamma * B) - 1 as the released code)."""
    opt = ESAM([torch.nn.Parameter(torch.zeros(2))], torch.optim.SGD, gamma=gamma, lr=0.1)
    before = torch.zeros(batch)
    after = torch.arange(batch, dtype=torch.float32)  # the last samples rose most
    assert opt.select_samples(before, after).tolist() == list(range(batch - kept, batch))


def test_esam_closure_contract_is_checked():
    model = make_model()
    x, y = make_data(1)[0]
    opt = ESAM(model.parameters(), torch.optim.SGD, gamma=0.5, lr=0.1, backend="torch")
    losses = per_sample(model, x, y)
    losses.mean().backward()
    with pytest.raises(ValueError, match="needs losses="):
        opt.step(lambda idx: per_sample(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]

    def calls_backward(idx):
        out = per_sample(model, x, y) if idx is None else per_sample(model, x[idx], y[idx])
        if idx is not None:
            out.mean().backward()
        return out

    with pytest.raises(RuntimeError, match="without calling backward"):
        opt.step(calls_backward, losses=losses)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)  # a failed step leaves the weights as they were
    losses = per_sample(model, x, y)
    losses.mean().backward()
    with pytest.raises(ValueError, match="per-sample losses"):
        opt.step(lambda idx: per_sample(model, x, y).mean(), losses=losses)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_esam_skips_the_step_on_a_non_finite_first_gradient(value):
    # as FSAM.step: no second pass, the base optimizer untouched, None returned
    model = make_model()
    x, y = make_data(1)[0]
    opt = ESAM(model.parameters(), torch.optim.Adam, sparsity=0.5, gamma=0.5, lr=1e-2, backend="torch")
    losses = per_sample(model, x, y)
    losses.mean().backward()
    model.fc1.weight.grad[0, 0] = value
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure(idx):
        calls.append(idx)
        return per_sample(model, x, y) if idx is None else per_sample(model, x[idx], y[idx])

    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert opt.step(closure, losses=losses) is None
    assert calls == [] and opt.step_count == 0 and len(opt.base_optimizer.state) == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "Invalid beta"), (dict(beta=1.5), "Invalid beta"), (dict(gamma=0), "Invalid gamma"),
    (dict(gamma=True), "Invalid gamma"), (dict(sparsity=2.0), "Invalid sparsity"),
])
def test_esam_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ESAM(make_model().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


# --------------------------------------------------------------------------- GSAM
def gsam_rho(lr, lr_max, lr_min, rho_max, rho_min):
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def plain_gsam_run(model, data, cls, kw, rho_max, rho_min, alpha, sparsity, schedule, interval=100):
    """GSAM as its authors' code does it, with rho following the LR."""
    params = list(model.parameters())
    base = cls(params, **kw)
    sched = schedule(base)
    lr_max = kw["lr"]
    pert = PlainMaskedPerturb(params, rho_max, sparsity, interval)
    rhos = []
    for x, y in data:
        F.cross_entropy(model(x), y).backward()
        old_g = [p.grad.clone() for p in params]
        rho = gsam_rho(base.param_groups[0]["lr"], lr_max, 0.0, rho_max, rho_min)
        rhos.append(rho)
        pert.perturb(rho)
        base.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            inner = sum(torch.sum(o * p.grad) for o, p in zip(old_g, params))
            new_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
            old_norm = torch.norm(torch.stack([o.norm(p=2) for o in old_g]), p=2)
            cosine = inner / (new_norm * old_norm + EPS)
            for o, p in zip(old_g, params):
                vertical = o - cosine * old_norm * p.grad / (new_norm + EPS)
                p.grad.add_(vertical, alpha=-alpha)
        pert.restore()
        base.step()
        base.zero_grad()
        sched.step()
    return rhos


def linear_decay(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.2 * t)


@pytest.mark.parametrize("base", list(BASES), ids=list(BASES))
@pytest.mark.parametrize("sparsity", [0.0, 0.5], ids=["gsam", "f-gsam"])
def test_gsam_matches_plain_loop(base, sparsity):
    cls, kw = BASES[base]
    ours, theirs = make_model(), make_model()
    data = make_data()
    opt = GSAM(ours.parameters(), cls, rho=0.1, rho_min=0.02, alpha=0.3, sparsity=sparsity, mask_update_interval=2,
               backend="torch", **kw)
    sched = linear_decay(opt)
    rhos = []
    for x, y in data:
        rhos.append(opt.current_rho()[0])
        F.cross_entropy(ours(x), y).backward()
        opt.step(lambda: F.cross_entropy(ours(x), y).backward())
        opt.zero_grad()
        sched.step()
    want = plain_gsam_run(theirs, data, cls, kw, 0.1, 0.02, 0.3, sparsity, linear_decay, interval=2)
    assert rhos == pytest.approx(want, rel=1e-12)
    assert_params_close(ours, theirs)


def test_gsam_rho_follows_the_learning_rate():
    w = torch.nn.Parameter(torch.zeros(100))
    opt = GSAM([w], torch.optim.SGD, rho=0.2, rho_min=0.05, alpha=0.0, lr=1.0, backend="torch")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    seen = []
    for _ in range(5):
        lr = opt.param_groups[0]["lr"]
        w.grad = torch.ones(100)
        before = w.detach().clone()
        opt.first_step()
        w.grad = torch.zeros(100)  # keeps w at 0 after the SGD step
        # The perturbation's length is rho_t (up to eps): rho is really scheduled, not just reported.
        seen.append(torch.linalg.vector_norm(w.detach() - before).item())
        assert seen[-1] == pytest.approx(0.05 + 0.15 * lr, rel=1e-5)
        opt.second_step()
        sched.step()
    assert seen[0] == pytest.approx(0.2, rel=1e-5) and seen[-1] == pytest.approx(0.05, rel=1e-5)


@pytest.mark.parametrize("lr, lr_min, rho_t", [
    (0.4, 0.0, 0.2),  # lr above lr_max (a warm-up overshoot, a scheduler's restart): rho, not beyond
    (0.01, 0.05, 0.05),  # lr below lr_min: rho_min, not below
])
def test_gsam_rho_schedule_is_clipped_to_rho_min_and_rho(lr, lr_min, rho_t):
    w = torch.nn.Parameter(torch.zeros(100))
    opt = GSAM([w], torch.optim.SGD, rho=0.2, rho_min=0.05, alpha=0.0, lr=0.1, lr_max=0.1, lr_min=lr_min,
               backend="torch")
    opt.param_groups[0]["lr"] = lr
    assert opt.current_rho() == [pytest.approx(rho_t)]
    w.grad = torch.ones(100)
    opt.first_step()
    assert torch.linalg.vector_norm(w.detach()).item() == pytest.approx(rho_t, rel=1e-6)
    opt.restore()


@pytest.mark.parametrize("lr_max, lr_min, lr, rho_t", [
    (1.0, 0.25, 0.25, 0.05),  # lr == lr_min: exactly rho_min
    (0.5, 0.5, 0.5, 0.2),  # lr_max == lr_min (a constant learning rate): rho, without dividing by zero
])
def test_gsam_rho_at_the_ends_of_a_degenerate_schedule(lr_max, lr_min, lr, rho_t):
    w = torch.nn.Parameter(torch.zeros(100))
    opt = GSAM([w], torch.optim.SGD, rho=0.2, rho_min=0.05, alpha=0.0, lr=lr, lr_max=lr_max, lr_min=lr_min,
               backend="torch")
    assert opt.current_rho() == [rho_t]
    w.grad = torch.ones(100)
    opt.first_step()
    assert torch.linalg.vector_norm(w.detach()).item() == pytest.approx(rho_t, rel=1e-6)
    opt.restore()


def test_gsam_subtracts_the_orthogonal_component_of_the_first_gradient():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = GSAM([w], torch.optim.SGD, rho=0.05, alpha=0.5, lr=1.0, backend="torch")
    w.grad = torch.tensor([1.0, 1.0])  # g at w
    opt.first_step(zero_grad=True)
    assert opt.memory_stats()["first_grad"] == 8
    w.grad = torch.tensor([2.0, 0.0])  # g_p at w + e; g's component orthogonal to it is (0, 1)
    opt.second_step()
    # SGD with lr 1 from w = 0: w = -(g_p - alpha * (0, 1)).
    torch.testing.assert_close(w.detach(), torch.tensor([-2.0, 0.5]))
    assert opt.memory_stats()["first_grad"] == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha=-0.1), "Invalid alpha"), (dict(rho_min=0.5), "Invalid rho_min"), (dict(rho_min=-1.0), "Invalid rho_min"),
    (dict(lr_max=0.01, lr_min=0.1), "Invalid lr_max"),
])
def test_gsam_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GSAM(make_model().parameters(), torch.optim.SGD, rho=0.1, lr=0.1, **kwargs)


def test_gsam_lr_max_defaults_to_the_base_optimizers_lr():
    opt = GSAM(make_model().parameters(), torch.optim.Adam, rho=0.1, rho_min=0.0)  # Adam's default lr
    assert opt.param_groups[0]["lr_max"] == 1e-3 and opt.current_rho() == [pytest.approx(0.1)]


# --------------------------------------------------------------------------- shared behaviour
def _make(kind, model):
    if kind == "sam":
        return SAM(model.parameters(), torch.optim.Adam, lr=1e-2, backend="torch")
    if kind == "esam":
        return ESAM(model.parameters(), torch.optim.Adam, lr=1e-2, sparsity=0.5, gamma=1.0, backend="torch",
                    generator=torch.Generator().manual_seed(0))
    return GSAM(model.parameters(), torch.optim.Adam, lr=1e-2, sparsity=0.5, rho_min=0.01, backend="torch")


def _step(kind, opt, model, x, y):
    if kind == "esam":
        losses = per_sample(model, x, y)
        losses.mean().backward()
        opt.step(lambda idx: per_sample(model, x, y))
    else:
        F.cross_entropy(model(x), y).backward()
        opt.step(lambda: F.cross_entropy(model(x), y).backward())
    opt.zero_grad()


@pytest.mark.parametrize("kind", ["sam", "esam", "gsam"])
def test_state_dict_round_trip_resumes_identically(kind):
    data = make_data(4)
    model = make_model()
    opt = _make(kind, model)
    for x, y in data[:2]:
        _step(kind, opt, model, x, y)
    twin = copy.deepcopy(model)
    twin_opt = _make(kind, twin)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares state tensors otherwise
    if kind == "esam":  # the SWP generator is the caller's: give both the same state
        twin_opt.generator.set_state(opt.generator.get_state())
    for x, y in data[2:]:
        _step(kind, opt, model, x, y)
        _step(kind, twin_opt, twin, x, y)
    assert_params_close(model, twin, exact=True)


@pytest.mark.parametrize("kind", ["sam", "esam", "gsam"])
def test_failing_closure_leaves_weights_unchanged(kind):
    model = make_model()
    opt = _make(kind, model)
    x, y = make_data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    per_sample(model, x, y).mean().backward()

    def boom(*_):
        raise KeyError("data loader failed")

    with pytest.raises(KeyError):
        opt.step(boom)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    with pytest.raises(RuntimeError, match="second_step called without a first_step"):
        opt.second_step()


def test_family_is_fsam():
    assert issubclass(SAM, FSAM) and issubclass(ESAM, FSAM) and issubclass(GSAM, FSAM)


@pytest.mark.parametrize("cls", [ESAM, GSAM])
def test_structured_masks_work_for_esam_and_gsam(cls):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16, 8))
    extra = dict(beta=0.5, gamma=1.0) if cls is ESAM else dict(rho_min=0.01)
    opt = cls([w], torch.optim.SGD, structure="2:4", lr=0.1, backend="torch", **extra)
    w.grad = torch.randn(16, 8)
    before = w.detach().clone()
    opt.first_step()
    mask = opt.masks()[0]
    assert torch.equal(mask.view(-1, 4).sum(1), torch.full((32,), 2))
    moved = w.detach() != before
    assert not bool((moved & ~mask).any())
    opt.restore()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("kind", ["esam", "gsam"])
def test_kernel_backends_match_the_torch_backend(kind, backend):
    from fsam_kernels import available_backends

    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run on this machine's CPU (Triton needs TRITON_INTERPRET=1)")
    data = make_data(2)
    models, opts = [], []
    for be in ("torch", backend):
        model = make_model()
        if kind == "esam":
            opt = ESAM(model.parameters(), torch.optim.Adam, lr=1e-2, sparsity=0.5, beta=0.5, gamma=0.5, backend=be,
                       generator=torch.Generator().manual_seed(0))
        else:
            opt = GSAM(model.parameters(), torch.optim.Adam, lr=1e-2, sparsity=0.5, rho_min=0.01, backend=be)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.3 * t)
        for x, y in data:
            family_step(kind, opt, model, x, y)
            sched.step()
        models.append(model)
        opts.append(opt)
    for a, b in zip(*(o.masks() for o in opts)):
        assert torch.equal(a, b)
    assert_params_close(*models)


def test_gsam_add_param_group_validates_before_adding():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    opt = GSAM(a.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho_min"):
        opt.add_param_group({"params": list(b.parameters()), "rho_min": 5.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": list(b.parameters()), "rho_min": 0.05})
    assert opt.param_groups[1]["lr_max"] == 0.1 and opt.param_groups[1]["rho_min"] == 0.05


def test_sam_rejects_a_sparsity():
    with pytest.raises(TypeError, match="sparsity"):
        SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1)
