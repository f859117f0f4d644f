"""What a plain step skips when its parameters and gradients have the last step's signature (issue 22,
item 2: the layout key, the gradient checks, the Triton groups, the norm dtype, the native plans) is
taken again whenever they change: ``p.data = ...``, ``model.to(...)``, gradients of another dtype or
size, a parameter made non-contiguous in place, options changed between steps."""
from __future__ import annotations

import copy

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels.backends import available_backends

BACKENDS = [pytest.param("native", marks=pytest.mark.native), pytest.param("triton", marks=pytest.mark.triton)]


def make(backend, seed=0):
    if backend not in available_backends("cpu"):
        pytest.skip(f"the {backend} backend does not run on the CPU here")
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model


def opt_for(model, backend):
    return FSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, mask_update_interval=100, lr=0.1,
                backend=backend)


def set_grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def perturbed_pair(models, opts, seed):
    """first_step on both; the perturbed weights of each."""
    out = []
    for m, o in zip(models, opts):
        set_grads(m, seed)
        o.first_step()
        out.append([p.detach().clone() for p in m.parameters()])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_changes_between_cached_steps_match_the_reference(backend):
    model = make(backend)
    models = [model, copy.deepcopy(model)]
    opts = [opt_for(models[0], backend), opt_for(models[1], "torch")]

    def step(seed, change=None):
        a, b = perturbed_pair(models, opts, seed)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        for o in opts:
            o.second_step()
        if change is not None:
            for m, o in zip(models, opts):
                change(m, o)

    step(0)
    step(1)  # cached
    step(2, lambda m, o: [setattr(p, "data", p.data.clone()) for p in m.parameters()])
    step(3, lambda m, o: o.param_groups[0].update(rho=0.2))
    step(4, lambda m, o: m.to(torch.bfloat16))
    step(5, lambda m, o: m.to(torch.float32))
    step(6)
    for m, o in zip(models, opts):  # gradients of another dtype than the last step's
        for p in m.parameters():
            p.grad = None
    step(7)


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_checks_run_again_after_a_change(backend):
    model = make("torch" if backend == "torch" else backend)
    opt = opt_for(model, backend)
    for seed in (0, 1):  # a mask update, then a cached plain step
        set_grads(model, seed)
        opt.first_step()
        opt.second_step()
    w = model[0].weight
    set_grads(model, 2)
    w.data = torch.randn(8, 12)  # another size under the old gradient
    with pytest.raises(ValueError, match="does not match"):
        opt.first_step()
    w.data = torch.randn(16, 6)
    set_grads(model, 3)
    opt.first_step()
    opt.second_step()
    w.data = w.data.t()  # the same memory, no longer contiguous
    set_grads(model, 4)
    with pytest.raises(ValueError, match="contiguous"):
        opt.first_step()
