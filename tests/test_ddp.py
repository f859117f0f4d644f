"""FSAM under DistributedDataParallel: 2 processes, gloo backend, CPU."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fsam_kernels import FSAM
from helpers import leave_spawned_rank

WORLD = 2
STEPS = 4
GLOBAL_BATCH = 16
OPT_KW = dict(rho=0.1, sparsity=0.7, mask_update_interval=2, lr=0.05, momentum=0.9, backend="torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=g).double(), torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


# Per-replica first passes with a poisoned gradient on one replica: (step, rank, values written into
# the first weight's gradient). Every replica must skip that step with it.
POISONED = {
    "no_sync": (STEPS - 1, 1, [float("inf")]),
    "no_sync_inf_at_step_0": (0, 0, [float("nan")]),
    # finite, but the squares overflow fp64 (the model is fp64): the norm is inf, not the elements
    "no_sync_squares_overflow": (1, 1, [1e200, 1e200]),
}


def _worker(rank, port, mode, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fsam_kernels import distributed as fsam_dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = DDP(_model())
        opt = FSAM(model.parameters(), torch.optim.SGD, **OPT_KW)
        masks_per_step, consistent = [], []
        for step in range(STEPS):
            x, y = _batch(step)
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            if mode == "sync":
                _loss(model, x, y).backward()
                opt.first_step(zero_grad=True)
            else:
                with model.no_sync():  # per-replica perturbation
                    _loss(model, x, y).backward()
                bad_step, bad_rank, values = POISONED[mode]
                if step == bad_step and rank == bad_rank:  # one replica overflows
                    model.module[0].weight.grad[0, : len(values)] = torch.tensor(values, dtype=torch.float64)
                with pytest.warns(RuntimeWarning) if step == bad_step else _nullcontext():
                    fsam_dist.first_step(opt, zero_grad=True)
            _loss(model, x, y).backward()  # synchronized second pass
            opt.second_step(zero_grad=True)
            masks_per_step.append([m.clone() for m in opt.masks()])
            consistent.append(fsam_dist.check_masks_consistent(opt))
        torch.save(
            {"params": [p.detach().clone() for p in model.parameters()], "masks": masks_per_step,
             "consistent": consistent, "step_count": opt.step_count},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        dist.barrier()  # no rank tears gloo down while the other still talks (an abort at exit otherwise)
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _run(mode, tmp_path):
    mp.spawn(_worker, args=(_free_port(), mode, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


def _single_process(steps=STEPS):
    model = _model()
    opt = FSAM(model.parameters(), torch.optim.SGD, **OPT_KW)
    masks_per_step = []
    for step in range(steps):
        x, y = _batch(step)
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
        masks_per_step.append([m.clone() for m in opt.masks()])
    return [p.detach() for p in model.parameters()], masks_per_step


def _assert_ranks_identical(results):
    r0, r1 = results
    for i, (a, b) in enumerate(zip(r0["params"], r1["params"])):
        if not torch.equal(a, b):
            idx = (a != b).nonzero()[0].tolist()
            pytest.fail(f"rank 0 and rank 1 differ: parameter {i} at {idx}: {a[tuple(idx)].item()!r} vs {b[tuple(idx)].item()!r}")
    for step, (ma, mb) in enumerate(zip(r0["masks"], r1["masks"])):
        for a, b in zip(ma, mb):
            assert torch.equal(a, b), f"masks differ between ranks after step {step}"
    assert all(r0["consistent"]) and all(r1["consistent"])
    assert r0["step_count"] == r1["step_count"]


@pytest.mark.timeout(180)
def test_synchronized_first_pass_equals_single_process(tmp_path):
    results = _run("sync", tmp_path)
    _assert_ranks_identical(results)
    params, masks = _single_process()
    for step, (ms, md) in enumerate(zip(masks, results[0]["masks"])):
        for a, b in zip(ms, md):
            assert torch.equal(a, b), f"DDP mask differs from the single-process mask after step {step}"
    for i, (a, b) in enumerate(zip(params, results[0]["params"])):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (
            f"parameter {i}: DDP differs from the single-process run on the combined batch, "
            f"max abs diff {(a - b).abs().max().item():.3e}"
        )


@pytest.mark.timeout(180)
def test_per_replica_first_pass_keeps_ranks_identical(tmp_path):
    results = _run("no_sync", tmp_path)
    _assert_ranks_identical(results)
    # The mask is built from the averaged gradient: the one a single process would build.
    _, masks = _single_process()
    for a, b in zip(masks[0], results[0]["masks"][0]):
        assert torch.equal(a, b), "per-replica mode: first mask differs from the combined-batch mask"
    # The last step overflowed on rank 1 only: both ranks skipped the perturbation in lock step.
    assert results[0]["step_count"] == STEPS - 1
    # Per-replica perturbations make the run differ from the synchronized one.
    single_params, _ = _single_process()
    assert any(not torch.allclose(a, b) for a, b in zip(single_params, results[0]["params"]))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["no_sync_inf_at_step_0", "no_sync_squares_overflow"])
def test_a_replica_that_must_skip_takes_every_replica_along(tmp_path, mode):
    """Before the first mask (step 0, on rank 0), and with finite gradients whose norm overflows:
    both replicas skip the same step, and keep the same weights, masks and step count."""
    results = _run(mode, tmp_path)
    _assert_ranks_identical(results)
    assert results[0]["step_count"] == STEPS - 1


def test_requires_initialized_process_group():
    from fsam_kernels import distributed as fsam_dist

    model = _model()
    opt = FSAM(model.parameters(), torch.optim.SGD, **OPT_KW)
    _loss(model, *_batch(0)).backward()
    with pytest.raises(RuntimeError, match="not initialized"):
        fsam_dist.first_step(opt)
    with pytest.raises(TypeError, match="optimizer"):
        fsam_dist.first_step(torch.optim.SGD(model.parameters(), lr=0.1))


FAMILY = ("fsam", "sam", "esam", "gsam")


def _family_member(kind, params):
    from fsam_kernels import ESAM, GSAM, SAM

    kw = dict(rho=0.1, lr=0.05, momentum=0.9, backend="torch")
    if kind == "sam":
        return SAM(params, torch.optim.SGD, **kw)
    masked = dict(kw, sparsity=0.7, mask_update_interval=1)  # Fisher-masked: mask_scores at every step
    if kind == "esam":
        return ESAM(params, torch.optim.SGD, generator=torch.Generator().manual_seed(0), **masked)
    if kind == "gsam":
        return GSAM(params, torch.optim.SGD, rho_min=0.01, **masked)
    return FSAM(params, torch.optim.SGD, **masked)


def _family_worker(rank, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fsam_kernels import distributed as fsam_dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for kind in FAMILY:
            model = DDP(_model())
            opt = _family_member(kind, model.parameters())
            for step in range(2):
                x, y = _batch(step)
                x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
                with model.no_sync():  # per-replica first pass
                    _loss(model, x, y).backward()
                fsam_dist.first_step(opt, zero_grad=True)
                _loss(model, x, y).backward()
                opt.second_step(zero_grad=True)
            out[kind] = {"params": [p.detach().clone() for p in model.parameters()], "masks": [opt.masks()],
                         "consistent": [fsam_dist.check_masks_consistent(opt)], "step_count": opt.step_count}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()


@pytest.mark.timeout(180)
def test_per_replica_first_step_with_every_family_member(tmp_path):
    """distributed.first_step passes mask_scores on mask-update steps: every member of the family takes
    them (GSAM used to raise TypeError); the replicas keep identical masks, and but for GSAM identical weights."""
    mp.spawn(_family_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in FAMILY:
        r0, r1 = (r[kind] for r in results)
        if kind != "gsam":
            _assert_ranks_identical([r0, r1])
        # GSAM's surrogate gap uses each replica's own first gradient, so only its masks agree.
        assert all(torch.equal(a, b) for a, b in zip(r0["masks"][0], r1["masks"][0])), kind
        assert r0["consistent"] == r1["consistent"] == [True], kind
        assert r0["step_count"] == r1["step_count"] == 2, kind


# ---------------------------------------------------------------------------------------------- 2:4
def _pruned_model():
    from fsam_kernels.sparsity import prune_nm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
    prune_nm(model, "2:4", backend="torch")
    return model


def _keep_pruned_opt(params):
    return FSAM(params, torch.optim.AdamW, rho=0.1, sparsity=0.5, structure="2:4", keep_pruned=True,
                mask_update_interval=2, lr=0.05, weight_decay=0.1, backend="torch")


def _keep_pruned_batch(step, rank=None):
    g = torch.Generator().manual_seed(200 + step)
    x, y = torch.randn(GLOBAL_BATCH, 8, generator=g).double(), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    return (x, y) if rank is None else (x.chunk(WORLD)[rank], y.chunk(WORLD)[rank])


def _keep_pruned_worker(rank, port, out_dir):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = DDP(_pruned_model())
        opt = _keep_pruned_opt(model.parameters())
        for step in range(STEPS):
            x, y = _keep_pruned_batch(step, rank)
            _loss(model, x, y).backward()
            opt.first_step(zero_grad=True)
            _loss(model, x, y).backward()
            opt.second_step(zero_grad=True)
        torch.save({"params": [p.detach().clone() for p in model.parameters()]}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    leave_spawned_rank()


@pytest.mark.timeout(180)
def test_keep_pruned_under_ddp_stays_2_4_and_equals_single_process(tmp_path):
    """A 2:4-pruned model trained with keep_pruned under DDP: both replicas hold the same weights, those
    of one process on the whole batch, and every pruned weight is still exactly +0.0."""
    mp.spawn(_keep_pruned_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt")["params"] for r in range(WORLD)]
    model = _pruned_model()
    pruned = [p.detach() == 0 for p in model.parameters()]
    opt = _keep_pruned_opt(model.parameters())
    for step in range(STEPS):
        x, y = _keep_pruned_batch(step)
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
    for i, (a, b, single, zero) in enumerate(zip(*ranks, model.parameters(), pruned)):
        assert torch.equal(a, b), f"parameter {i} differs between ranks"
        torch.testing.assert_close(a, single.detach(), rtol=1e-12, atol=1e-12, msg=f"parameter {i}")
        if a.dim() == 2:
            assert zero.sum() == a.numel() // 2, f"parameter {i} was not pruned 2:4"
            assert torch.equal(a[zero], torch.zeros_like(a[zero])), f"parameter {i}: a pruned weight moved"
            assert (a.reshape(-1, 4) != 0).sum(1).max() <= 2, f"parameter {i} is no longer 2:4"
