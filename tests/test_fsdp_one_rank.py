"""FSAM under FSDP2 with one rank, on every backend target: the sharded route (DTensor shards, the
radix-histogram top-k with its collectives, N:M masks and keep_pruned on shards) run by each backend's
kernels in this process, so a GPU run covers them with NCCL on CUDA tensors (tests/test_fsdp.py runs 2
and 4 gloo processes on the CPU).

With one rank the shards are the whole tensors, so the sharded optimizer must give the unsharded
optimizer's masks bit for bit for the same scores, and the same trajectory within fp32 rounding.
"""
import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from backend_targets import TARGETS
from fsam_kernels import FSAM
from fsam_kernels.sparsity import prune_nm

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed"),
    pytest.mark.skipif(
        tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9),
        reason="FSAM under FSDP2 is supported from torch 2.9 (docs/install.md)",
    ),
]

VOCAB, DIM, HIDDEN, ODD, CLASSES, SEQ = 37, 32, 64, 30, 5, 6


class Net(torch.nn.Module):
    """2:4-eligible matrices (emb, fc1, fc2, head) and a fallback one (fc3: 30 columns)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.fc1 = torch.nn.Linear(DIM, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, ODD)
        self.fc3 = torch.nn.Linear(ODD, DIM)
        self.head = torch.nn.Linear(DIM, CLASSES)

    def forward(self, tokens):
        x = self.emb(tokens).mean(dim=1)
        x = F.gelu(self.fc2(F.gelu(self.fc1(x))))
        return self.head(F.gelu(self.fc3(x)))


def make_pruned_model(device):
    torch.manual_seed(0)
    model = Net()
    prune_nm(model, "2:4")  # fc1, fc2, head (fc3 has 30 columns: left dense)
    with torch.no_grad():
        model.fc3.weight[:4] = 0  # zeros in the fallback tensor too
    return model.to(device)


def param_groups(model):
    masked = [p for p in model.parameters() if p.ndim >= 2]
    dense = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": masked}, {"params": dense, "fisher_mask": False, "weight_decay": 0.0}]


def batch(step, device):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    y = torch.randint(0, CLASSES, (8,), generator=g)
    return x.to(device), y.to(device)


def fsam_step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_mesh(device_type, monkeypatch):
    """A one-rank process group (NCCL on CUDA, gloo on the CPU) and its 1-D device mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    if device_type == "cuda":
        if not dist.is_nccl_available():
            pytest.fail("CUDA is available but torch.distributed has no NCCL")
        # one rank on one machine: NCCL's bootstrap on the loopback interface (an offline GPU machine
        # may have no other; NCCL skips lo unless named)
        monkeypatch.setenv("NCCL_SOCKET_IFNAME", os.environ.get("NCCL_SOCKET_IFNAME", "lo"))
        torch.cuda.set_device(0)
    elif not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh(device_type, (1,))
    finally:
        dist.destroy_process_group()


OPTIONS = [
    pytest.param({}, id="plain"),
    pytest.param({"preserve_zeros": True}, id="preserve_zeros"),
    pytest.param({"structure": "2:4", "keep_pruned": True}, id="2_4-keep_pruned"),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("target", TARGETS)
def test_one_rank_fsdp2_matches_the_unsharded_optimizer(target, options, monkeypatch):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    target.backend()  # skips where the target cannot run (fails on a GPU machine)
    device = target.device
    with one_rank_mesh(device.type, monkeypatch) as mesh:
        single = make_pruned_model(device)
        sharded = copy.deepcopy(single)
        fully_shard(sharded, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        kw = dict(rho=0.05, sparsity=0.7, mask_update_interval=2, lr=0.05, momentum=0.9, weight_decay=0.01,
                  backend=target.backend_name, **options)
        opt_single = FSAM(param_groups(single), torch.optim.SGD, **kw)
        opt_sharded = FSAM(param_groups(sharded), torch.optim.SGD, **kw)
        assert opt_sharded._shards is not None and opt_sharded.backend == target.backend_name

        # the same scores give the same mask, bit for bit (ties at 3 levels everywhere)
        g = torch.Generator().manual_seed(5)
        scores = [torch.randint(0, 3, p.shape, generator=g).float().to(device) for p in param_groups(single)[0]["params"]]
        opt_single.update_mask(fisher=scores)
        opt_sharded.update_mask(fisher=scores)
        for j, (a, b) in enumerate(zip(opt_sharded.masks(), opt_single.masks())):
            assert torch.equal(a, b), f"masked tensor {j}: the sharded mask differs from the unsharded one"

        support = [p.detach() != 0 for p in param_groups(single)[0]["params"]]
        for step in range(4):
            fsam_step(single, opt_single, *batch(step, device))
            fsam_step(sharded, opt_sharded, *batch(step, device))
        assert opt_sharded.step_count == 4
        for (name, a), b in zip(sharded.named_parameters(), single.parameters()):
            a = a.detach().to_local()
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        if options.get("keep_pruned"):
            for j, (p, alive) in enumerate(zip(param_groups(sharded)[0]["params"], support)):
                w = p.detach().to_local()
                assert torch.equal(w != 0, alive), f"masked tensor {j}: the support changed"
                assert not bool(torch.signbit(w[~alive]).any()), f"masked tensor {j}: a pruned weight is -0.0"
