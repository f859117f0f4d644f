"""One numeric policy on every backend (see the module doc of fsam_kernels.reference).

* The skip rule: the gradient norm never overflows for finite fp32/bf16/fp16 gradients (squares are
  summed in fp64 where fp32 overflows), so every backend perturbs or skips on the same inputs, tested
  at the boundaries (the cases are in tests/helpers.py; every compiled backend's perturbation against
  the reference on them: tests/test_backend_conformance.py).
* fp64 in fp64: fp64 parameters get davda54/sam's fp64 arithmetic (SAM, ASAM, GSAM's decomposition).
"""
import os

import pytest
import torch

from fsam_kernels import GSAM, SAM
from fsam_kernels import reference as ref
from fsam_kernels.protocol import Phase
from helpers import SKIP_RULE_CASES, first_mismatch, skip_rule_case

FP32_MAX = torch.finfo(torch.float32).max


def backends():
    names = ["torch"]
    if os.environ.get("FSAM_NO_NATIVE") != "1":
        names.append("native")
    return names


def get(name):
    from fsam_kernels.backends import get_backend

    return get_backend(name, "cpu")


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("case", SKIP_RULE_CASES, ids=[c[0] for c in SKIP_RULE_CASES])
def test_skip_rule_is_the_same_on_every_backend(backend, case):
    _, values, dtype, weight, perturbed = case
    be = get(backend)
    layout, params, grads = skip_rule_case(values, dtype, weight)
    norm = be.grad_norm(layout, grads)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert bool(torch.isfinite(norm)) == perturbed, f"norm {norm.item()!r}"
    if perturbed:  # the norm is the exact one, to rounding
        exact = ref.grad_sumsq_reference(layout, grads).sqrt()
        torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)
    originals = [p.clone() for p in params]
    saved = be.perturb(layout, grads, None, None, norm, 1e-12)
    assert (not torch.equal(params[0], originals[0])) == perturbed
    if perturbed:
        be.restore(layout, None, None, saved)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


@pytest.mark.parametrize("backend", backends())
def test_huge_finite_gradients_perturb_by_rho(backend):
    """The issue's case: 4096 fp32 gradients of 1e18 (the fp32 sum of squares overflows): the step is
    taken, and the perturbation has norm rho."""
    w = torch.nn.Parameter(torch.zeros(4096))
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    w.grad = torch.full((4096,), 1e18)
    norm = opt.first_step()
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, torch.tensor(6.4e19), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.linalg.vector_norm(w.detach().double()), torch.tensor(0.05, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    opt.second_step()


@pytest.mark.parametrize("backend", backends())
def test_gradients_beyond_the_fp32_norm_skip_the_step(backend):
    w = torch.nn.Parameter(torch.zeros(4))
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    w.grad = torch.full((4,), 1.8e38)
    opt.first_step()  # a plain step (no mask update) reads the skip decision at its end
    assert torch.equal(w.detach(), torch.zeros(4))
    with pytest.warns(RuntimeWarning, match="non-finite gradient norm"):
        assert opt.phase is Phase.SKIPPED


# --------------------------------------------------------------------------- fp64 in fp64
def mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def batches(n=30, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def davda54_fp64_run(model, data, rho, adaptive):
    """davda54/sam's loop, as published, on fp64 parameters (plain SGD)."""
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.1)
    loss_fn = torch.nn.functional.cross_entropy
    for x, y in data:
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([((torch.abs(p) if adaptive else 1.0) * p.grad).norm(p=2)
                                                for p in params]), p=2)
            scale = rho / (grad_norm + 1e-12)
            old = [p.data.clone() for p in params]
            for p in params:
                p.add_((torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale.to(p))
        base.zero_grad()
        loss_fn(model(x), y).backward()
        with torch.no_grad():
            for p, o in zip(params, old):
                p.data = o
        base.step()
        base.zero_grad()


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_fp64_sam_follows_davda54_in_fp64_for_30_steps(backend, adaptive):
    rho = 0.5 if adaptive else 0.05
    ours, theirs, data = mlp(0), mlp(0), batches()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=rho, adaptive=adaptive, lr=0.1, backend=backend)
    for x, y in data:
        torch.nn.functional.cross_entropy(ours(x), y).backward()
        opt.step(lambda: torch.nn.functional.cross_entropy(ours(x), y).backward())
        opt.zero_grad()
    davda54_fp64_run(theirs, data, rho, adaptive)
    for i, (p, q) in enumerate(zip(ours.parameters(), theirs.parameters())):
        if backend == "torch":  # the reference is davda54/sam's arithmetic
            assert torch.equal(p, q), f"param {i}: {first_mismatch(p, q)}"
        else:  # another summation order of the norm
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("backend", backends())
def test_fp64_perturbation_is_the_exact_formula(backend):
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(1000, generator=g, dtype=torch.float64)
    grad = torch.randn(1000, generator=g, dtype=torch.float64)
    w = torch.nn.Parameter(w0.clone())
    opt = SAM([w], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    w.grad = grad.clone()
    norm = opt.first_step()
    assert norm.dtype == torch.float64
    want = w0 + grad * (0.05 / (grad.norm() + 1e-12))
    torch.testing.assert_close(w.detach(), want, rtol=0, atol=1e-15)  # fp32 arithmetic is ~1e-9 away
    opt.restore()
    assert torch.equal(w.detach(), w0)


def test_gsam_decomposition_of_fp64_gradients_is_fp64():
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(300, generator=g, dtype=torch.float64))
    g1, g2 = (torch.randn(300, generator=g, dtype=torch.float64) for _ in range(2))
    opt = GSAM([w], torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1, backend="torch")
    w.grad = g1.clone()
    opt.first_step()
    w.grad = g2.clone()
    opt._subtract_orthogonal(opt._first_grads)
    eps = opt.perturb_eps
    cosine = g1.dot(g2) / (g2.norm() * g1.norm() + eps)
    vertical = g1 - (cosine * g1.norm() / (g2.norm() + eps)) * g2
    want = g2 - 0.4 * vertical
    assert w.grad.dtype == torch.float64
    torch.testing.assert_close(w.grad, want, rtol=0, atol=1e-15)  # fp32 is ~1e-7 away
    opt.restore()
