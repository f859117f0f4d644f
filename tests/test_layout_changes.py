"""The mask follows the masked set, judged from what the layout recorded (issue 20, item 6): a masked
parameter resized by ``p.data = ...`` or ``fisher_mask`` moved to other parameters of the same sizes
gets a new mask at the next step, and ``masks()`` answers right after such a change."""
from __future__ import annotations

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout

BACKENDS = ["torch", pytest.param("native", marks=pytest.mark.native)]


def top_k_masks(params, grads, sparsity):
    """The reference's batch-Fisher mask of ``grads`` for ``params`` (all masked)."""
    layout = ParamLayout(list(params), [True] * len(params), [0.05] * len(params), [False] * len(params))
    bits = ref.select_mask_reference(layout, list(grads), layout.k_for(sparsity), True)
    return ref.unpack_mask(layout, bits)


def step(opt, grads):
    for p, g in zip([p for group in opt.param_groups for p in group["params"]], grads):
        p.grad = g.clone()
    opt.first_step()
    opt.second_step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resized_parameter_gets_a_new_mask(backend):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(16))
    opt = FSAM([w], torch.optim.SGD, rho=0.1, sparsity=0.25, mask_update_interval=100, lr=0.0, backend=backend)
    step(opt, [torch.randn(16)])
    assert int(opt.masks()[0].sum()) == 12
    w.data = torch.randn(32)  # the old layout holds this same Parameter object
    assert opt.masks() == []  # the 16-element mask no longer applies
    g = torch.randn(32)
    step(opt, [g])
    masks = opt.masks()
    assert masks[0].shape == (32,) and int(masks[0].sum()) == 24
    assert torch.equal(masks[0], top_k_masks([w], [g], 0.25)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fisher_mask_moved_to_parameters_of_the_same_sizes(backend):
    # Both groups hold tensors of 16 and 32 elements: the masked set changes, its element counts do not.
    torch.manual_seed(1)
    a, b, c, d = (torch.nn.Parameter(torch.randn(n)) for n in (16, 32, 16, 32))
    opt = FSAM([{"params": [a, b]}, {"params": [c, d], "fisher_mask": False}], torch.optim.SGD, rho=0.1,
               sparsity=0.5, mask_update_interval=100, lr=0.0, backend=backend)
    grads = [torch.randn(p.numel()) for p in (a, b, c, d)]
    step(opt, grads)
    assert [m.shape for m in opt.masks()] == [(16,), (32,)]
    opt.param_groups[0]["fisher_mask"], opt.param_groups[1]["fisher_mask"] = False, True
    assert opt.masks() == []  # no TypeError: the mask was dropped with the masked set it belonged to
    grads = [torch.randn(p.numel()) for p in (a, b, c, d)]
    step(opt, grads)
    expected = top_k_masks([c, d], grads[2:], 0.5)
    masks = opt.masks()
    assert len(masks) == 2 and all(torch.equal(m, e) for m, e in zip(masks, expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_copy_of_the_same_size_keeps_the_mask(backend):
    # p.data = p.data.clone() (or model.to(dtype)) keeps the masked set: the mask is kept, not rebuilt.
    torch.manual_seed(2)
    w = torch.nn.Parameter(torch.randn(16))
    opt = FSAM([w], torch.optim.SGD, rho=0.1, sparsity=0.25, mask_update_interval=100, lr=0.0, backend=backend)
    step(opt, [torch.randn(16)])
    before = opt.masks()[0].clone()
    w.data = w.data.clone()
    step(opt, [torch.randn(16)])
    assert torch.equal(opt.masks()[0], before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_right_after_the_masked_set_changes(backend):
    torch.manual_seed(3)
    a, b = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(32))
    opt = FSAM([{"params": [a]}, {"params": [b], "fisher_mask": False}], torch.optim.SGD, rho=0.1, sparsity=0.5,
               mask_update_interval=100, lr=0.0, backend=backend)
    step(opt, [torch.randn(16), torch.randn(32)])
    opt.param_groups[0]["fisher_mask"], opt.param_groups[1]["fisher_mask"] = False, True
    assert opt.masks() == []  # was a TypeError: the mask dropped while masks() unpacked it
    step(opt, [torch.randn(16), torch.randn(32)])
    assert [m.shape for m in opt.masks()] == [(32,)]
