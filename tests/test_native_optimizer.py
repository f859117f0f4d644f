"""The whole FSAM optimizer with backend="native" against backend="torch" on the CPU."""
import io
import os

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels.backends import get_backend
from helpers import clone_model, first_mismatch

pytestmark = pytest.mark.skipif(os.environ.get("FSAM_NO_NATIVE") == "1", reason="native extension not built")


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).float(), y)


def train(model, opt, batches, masks_seen=None):
    for batch in batches:
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        if masks_seen is not None:
            masks_seen.append([m.clone() for m in opt.masks()])
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)


def assert_close_models(m1, m2, rtol, atol):
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def groups_of(m):
    return [
        {"params": [m.fc1.weight, m.fc2.weight], "rho": 0.2},
        {"params": [m.emb.weight], "fisher_mask": False, "rho": 0.05},  # dense
        {"params": [m.norm.weight, m.norm.bias], "perturb": False},
        {"params": [m.fc1.bias, m.fc2.bias], "adaptive": True, "rho": 0.3},
    ]


def test_auto_prefers_native_on_cpu():
    assert get_backend("auto", "cpu").name == "native"


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.AdamW, dict(lr=1e-2))],
                         ids=["sgd", "adamw"])
@pytest.mark.parametrize("sparsity,interval,adaptive", [(0.9, 1, False), (0.5, 2, True), (0.0, 3, False)])
def test_native_matches_torch_backend(tiny_net, batches, base, kw, sparsity, interval, adaptive):
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    o1 = FSAM(m1.parameters(), base, rho=0.1, sparsity=sparsity, mask_update_interval=interval, adaptive=adaptive,
              backend="native", **kw)
    o2 = FSAM(m2.parameters(), base, rho=0.1, sparsity=sparsity, mask_update_interval=interval, adaptive=adaptive,
              backend="torch", **kw)
    masks1, masks2 = [], []
    train(m1, o1, batches[:1], masks1)
    train(m2, o2, batches[:1], masks2)
    # Same weights and gradients at the first mask: bit-identical masks.
    for a, b in zip(masks1[0], masks2[0]):
        assert torch.equal(a, b), first_mismatch(a.to(torch.uint8), b.to(torch.uint8))
    train(m1, o1, batches[1:])
    train(m2, o2, batches[1:])
    assert o1.backend == "native" and o2.backend == "torch"
    # The norms are summed in another order: trajectories agree to fp32 rounding.
    assert_close_models(m1, m2, rtol=1e-5, atol=1e-6)


def test_param_groups_dense_adaptive_and_unperturbed(tiny_net, batches):
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    o1 = FSAM(groups_of(m1), torch.optim.SGD, rho=0.1, sparsity=0.8, mask_update_interval=2, lr=0.1, backend="native")
    o2 = FSAM(groups_of(m2), torch.optim.SGD, rho=0.1, sparsity=0.8, mask_update_interval=2, lr=0.1, backend="torch")
    train(m1, o1, batches)
    train(m2, o2, batches)
    assert_close_models(m1, m2, rtol=1e-5, atol=1e-6)
    assert [tuple(m.shape) for m in o1.masks()] == [(16, 8), (3, 16), (16,), (3,)]


def test_save_load_continue_matches(tiny_net, batches):
    def roundtrip(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    m1 = clone_model(tiny_net)
    o1 = FSAM(m1.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=4, lr=1e-2,
              backend="native")
    train(m1, o1, batches[:3])
    sd, weights = roundtrip(o1.state_dict()), roundtrip(m1.state_dict())
    # resume with the native backend and, from the same checkpoint, with the reference
    m2, m3 = clone_model(tiny_net), clone_model(tiny_net)
    m2.load_state_dict(weights)
    m3.load_state_dict(weights)
    o2 = FSAM(m2.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=4, lr=1e-2,
              backend="native")
    o3 = FSAM(m3.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, mask_update_interval=4, lr=1e-2,
              backend="torch")
    o2.load_state_dict(sd)
    o3.load_state_dict(roundtrip(sd))  # its own copy: torch shares loaded state tensors with the dict
    for a, b in zip(o2.masks(), o1.masks()):
        assert torch.equal(a, b)
    train(m1, o1, batches[3:])
    train(m2, o2, batches[3:])
    train(m3, o3, batches[3:])
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b), first_mismatch(a, b)  # same backend, same state: bit-identical
    assert_close_models(m2, m3, rtol=1e-5, atol=1e-6)


def test_empirical_fisher_accumulator(tiny_net, batches):
    m1, m2 = clone_model(tiny_net), clone_model(tiny_net)
    opts = [FSAM(m.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.7, fisher="empirical", lr=0.1, backend=b)
            for m, b in ((m1, "native"), (m2, "torch"))]
    for m, o in zip((m1, m2), opts):
        for batch in batches[:3]:
            loss_of(m, batch).backward()
            o.accumulate_fisher()
            o.zero_grad()
    for a, b in zip(opts[0]._mask.fisher, opts[1]._mask.fisher):
        assert torch.equal(a, b), first_mismatch(a, b)
    for o in opts:
        o.update_mask()
    for a, b in zip(opts[0].masks(), opts[1].masks()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_restore_exactly(tiny_net, batches, dtype):
    m = clone_model(tiny_net, dtype)
    opt = FSAM(m.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1, backend="native")
    before = [p.detach().clone() for p in m.parameters()]
    loss_of(m, batches[0]).backward()
    opt.first_step()
    assert any(not torch.equal(p, b) for p, b in zip(m.parameters(), before))
    opt.restore()
    for p, b in zip(m.parameters(), before):
        assert torch.equal(p, b), first_mismatch(p, b)


def test_memory_is_compact(tiny_net, batches):
    opt = FSAM(tiny_net.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.9, lr=0.1, backend="native")
    loss_of(tiny_net, batches[0]).backward()
    opt.first_step()
    stats = opt.memory_stats()
    n = sum(p.numel() for p in tiny_net.parameters())
    assert stats["saved"] == 4 * round(0.1 * n)  # only the masked fp32 originals
    opt.restore()
