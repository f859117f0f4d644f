"""FSAM under FSDP2 (``fully_shard``) on the CPU with gloo, 2 and 4 processes.

One set of 4 processes runs every scenario on all 4 ranks, then on a 2-rank subgroup (global ranks 2
and 3, so group ranks differ from global ranks); starting processes is the expensive part:

* masks: the sharded mask, gathered, equals the unsharded reference's mask for the same gradients bit
  for bit: batch Fisher, accumulated Fisher, given Fisher with deliberate ties at the threshold, and
  zero-gradient ties straddling shard boundaries; uneven and empty shards throughout;
* trajectory: weights after N steps equal a single-process FSAM run within fp32 tolerance;
* checkpoint: torch.distributed.checkpoint save -> load -> continue equals an uninterrupted run, and a
  4-rank checkpoint loads into 2 ranks with the same full masks and weights;
* plain per-rank ``state_dict`` / ``load_state_dict`` round trip;
* the global gradient norm and the global k of the mask;
* a non-finite gradient on one rank makes every rank skip the step;
* N:M structure and preserve_zeros: the gathered mask equals the unsharded one (the fallback's top-k over
  the ranks, counting the non-zero weights of every rank); keep_pruned keeps a pruned model's zeros +0.0
  through AdamW and equals a single-process run with SGD; its support and the mask options go through
  torch.distributed.checkpoint, and a mismatch is refused;
* a check that refuses on one rank (a checkpoint's support, a given Fisher's shard) refuses on every rank;
* bad input: a mix of sharded and ordinary parameters, HSDP's 2-D mesh, and prune_nm on a sharded model
  (or its DTensors) are refused.
"""
import copy
import math
import multiprocessing
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F

from fsam_kernels import FSAM, GSAM, available_backends
from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="needs torch.distributed with gloo",
    ),
    pytest.mark.skipif(
        tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 9),
        reason="FSAM under FSDP2 is supported from torch 2.9 (docs/install.md)",
    ),
]

JOIN_TIMEOUT_S = 150
VOCAB, USED_TOKENS, DIM, HIDDEN, SEQ, CLASSES = 11, 5, 10, 18, 5, 3


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(DIM)
        self.qkv = torch.nn.Linear(DIM, 3 * DIM)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.norm2 = torch.nn.LayerNorm(DIM)
        self.fc1 = torch.nn.Linear(DIM, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM), dim=-1)
        x = x + self.proj(att @ v)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyTransformer(torch.nn.Module):
    """Row counts chosen so 4 ranks get uneven shards and the head (3 rows) an empty one."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.pos = torch.nn.Parameter(torch.randn(SEQ, DIM) * 0.1)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.norm = torch.nn.LayerNorm(DIM)
        self.head = torch.nn.Linear(DIM, CLASSES)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x).mean(dim=1))


def make_model():
    torch.manual_seed(0)
    return TinyTransformer()


def shard(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for b in model.blocks:  # inner modules first, then the root: the FSDP2 wrapping order
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def param_groups(model):
    # Matrices and embeddings take part in the Fisher mask; biases and norms are perturbed densely.
    masked = [p for n, p in model.named_parameters() if p.ndim >= 2]
    dense = [p for n, p in model.named_parameters() if p.ndim < 2]
    return [{"params": masked}, {"params": dense, "fisher_mask": False, "weight_decay": 0.0}]


def make_fsam(model, base=torch.optim.AdamW, cls=FSAM, **kw):
    opts = dict(rho=0.05, sparsity=0.8, mask_update_interval=2, lr=1e-2, weight_decay=0.01)
    opts.update(kw)
    return cls(param_groups(model), base, **opts)


def batch(step, rank=None, world=None, size=8):
    """Step ``step``'s batch; with ``rank`` that rank's equal slice of it (tokens < USED_TOKENS, so the
    other embedding rows get zero gradients)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, USED_TOKENS, (size, SEQ), generator=g)
    y = torch.randint(0, CLASSES, (size,), generator=g)
    if rank is None:
        return x, y
    per = size // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def fsam_step(model, opt, x, y, before_first_step=None):
    F.cross_entropy(model(x), y).backward()
    if before_first_step is not None:
        before_first_step()
    opt.first_step(zero_grad=True)
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


# --------------------------------------------------------------------------- helpers on DTensors
def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_masks(opt, sharded_params):
    """The optimizer's local masks, gathered to full tensors (every rank gets them)."""
    from torch.distributed.tensor import DTensor

    out = []
    for m, p in zip(opt.masks(), sharded_params):
        d = DTensor.from_local(m.to(torch.uint8), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        out.append(d.full_tensor().bool())
    return out


def reference_masks(params, scores, sparsity, square):
    lay = ParamLayout([torch.empty(p.shape) for p in params], [True] * len(params), [0.1] * len(params), [False] * len(params))
    bits = ref.select_mask_reference(lay, scores, lay.k_for(sparsity), square)
    return ref.unpack_mask(lay, bits)


def assert_masks_equal(got, want, what):
    for j, (a, b) in enumerate(zip(got, want)):
        if not torch.equal(a, b):
            diff = (a != b).reshape(-1).nonzero()
            raise AssertionError(
                f"{what}: masked tensor {j} differs from the unsharded reference at flat index "
                f"{int(diff[0])} ({diff.numel()} elements differ)"
            )


# --------------------------------------------------------------------------- scenarios (run on every rank)
def scenario_masks(rank, world, mesh, backend):
    model = shard(make_model(), mesh)
    opt = make_fsam(model, sparsity=0.7, backend=backend)
    assert opt.backend == backend
    masked = param_groups(model)[0]["params"]
    x, y = batch(0, rank, world)

    # batch Fisher, chosen inside first_step
    def check_first_step_mask():
        grads = [full(p.grad) for p in masked]
        check_first_step_mask.want = reference_masks(masked, grads, 0.7, square=True)

    fsam_step(model, opt, x, y, before_first_step=check_first_step_mask)
    assert_masks_equal(gathered_masks(opt, masked), check_first_step_mask.want, f"{backend}: batch Fisher in first_step")

    if world == 4:  # the shapes do give uneven and empty shards
        assert model.head.weight.to_local().shape[0] == (1 if rank < 3 else 0)
        assert model.emb.weight.to_local().shape[0] == (3 if rank < 3 else 2)

    # per-rank memory: mask bits of the local shard only
    local_numel = [p.to_local().numel() for p in masked]
    assert opt.memory_stats()["mask"] == opt._current_layout().mask_bytes
    assert opt._current_layout().n_masked == sum(local_numel)

    # zero-gradient ties at the threshold: unused embedding rows, split across ranks
    F.cross_entropy(model(x), y).backward()
    grads = [full(p.grad) for p in masked]
    n_zero = sum(int((g == 0).sum()) for g in grads)
    n = sum(g.numel() for g in grads)
    assert n_zero > 0
    opt.sparsity = (n_zero // 2) / n  # the threshold falls inside the zero keys
    opt.update_mask()
    assert_masks_equal(gathered_masks(opt, masked), reference_masks(masked, grads, opt.sparsity, True), f"{backend}: zero-gradient ties")

    # accumulated (empirical) Fisher
    opt.zero_grad()
    accum = [torch.zeros(p.shape) for p in masked]
    for step in (1, 2):
        xs, ys = batch(step, rank, world)
        F.cross_entropy(model(xs), ys).backward()
        ref.fisher_accumulate_reference(accum, [full(p.grad) for p in masked])
        opt.accumulate_fisher()
        opt.zero_grad()
    opt.sparsity = 0.75
    opt.update_mask()
    assert_masks_equal(gathered_masks(opt, masked), reference_masks(masked, accum, 0.75, False), f"{backend}: accumulated Fisher")

    # given Fisher with 3 levels: ties everywhere, straddling params and shard boundaries
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(7)
    fisher_full = [torch.randint(0, 3, p.shape, generator=g).float() for p in masked]
    fisher = {p: distribute_tensor(f, mesh, [Shard(0)]) for p, f in zip(masked, fisher_full)}
    for sparsity in (0.5, 0.9):
        opt.sparsity = sparsity
        opt.update_mask(fisher=fisher)
        want = reference_masks(masked, fisher_full, sparsity, False)
        assert_masks_equal(gathered_masks(opt, masked), want, f"{backend}: given Fisher with ties, sparsity={sparsity}")


def scenario_trajectory(rank, world, mesh, steps=4, cls=FSAM, model_fn=make_model, **extra):
    """The sharded run equals a single-process run within fp32 rounding; returns the sharded model."""
    single = model_fn()
    sharded = shard(copy.deepcopy(single), mesh)
    # SGD, not Adam: Adam turns rounding noise in (theoretically) zero gradients, like the key bias of
    # attention, into full-size steps, which says nothing about FSAM.
    sgd = dict(base=torch.optim.SGD, lr=0.05, momentum=0.9, cls=cls, **extra)
    opt_single, opt_sharded = make_fsam(single, **sgd), make_fsam(sharded, **sgd)
    for step in range(steps):
        fsam_step(single, opt_single, *batch(step))
        fsam_step(sharded, opt_sharded, *batch(step, rank, world))
    assert opt_sharded.step_count == steps
    for (name, a), b in zip(sharded.named_parameters(), single.parameters()):
        a = full(a.detach())
        if not torch.allclose(a, b.detach(), rtol=1e-5, atol=1e-6):
            err = (a - b.detach()).abs().max().item()
            raise AssertionError(f"after {steps} steps {name} differs from the single-process run by {err:.3g}")
    return sharded


def scenario_checkpoint(rank, world, mesh, ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from fsam_kernels.fsdp import fsam_state_dict, load_fsam_state_dict

    def checkpointable(model, opt):
        # get_state_dict handles the model and the *base* optimizer; FSAM's own state goes next to it.
        model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)
        return {"model": model_sd, "optim": optim_sd, "fsam": fsam_state_dict(opt)}

    # mask_update_interval=3: the resumed run's first step reuses the mask it loaded
    model = shard(make_model(), mesh)
    opt = make_fsam(model, mask_update_interval=3)
    for step in range(2):
        fsam_step(model, opt, *batch(step, rank, world))
    dcp.save(checkpointable(model, opt), checkpoint_id=ckpt_dir, process_group=mesh.get_group())
    saved_masks = [m.clone() for m in opt.masks()]
    full_masks = gathered_masks(opt, param_groups(model)[0]["params"])  # for scenario_reshard
    full_params = [full(p.detach()) for p in model.parameters()]
    if rank == 0:
        torch.save({"masks": full_masks, "params": full_params, "step_count": opt.step_count}, ckpt_dir + ".full.pt")
    for step in range(2, 5):
        fsam_step(model, opt, *batch(step, rank, world))

    torch.manual_seed(1)  # different initial weights: everything must come from the checkpoint
    resumed = shard(TinyTransformer(), mesh)
    opt2 = make_fsam(resumed, mask_update_interval=3)
    state = checkpointable(resumed, opt2)
    dcp.load(state, checkpoint_id=ckpt_dir, process_group=mesh.get_group())
    set_state_dict(resumed, opt2.base_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    load_fsam_state_dict(opt2, state["fsam"])
    assert opt2.step_count == 2
    for a, b in zip(opt2.masks(), saved_masks):
        assert torch.equal(a, b), "the loaded mask differs from the saved one"
    for step in range(2, 5):
        fsam_step(resumed, opt2, *batch(step, rank, world))
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a.to_local(), b.to_local()), f"{name}: resumed run differs from the uninterrupted one"

    # the plain state dict holds this rank's shard of the mask; it round-trips per rank
    opt3 = make_fsam(model, mask_update_interval=3)
    opt3.load_state_dict(opt.state_dict())
    assert opt3.step_count == opt.step_count
    for a, b in zip(opt3.masks(), opt.masks()):
        assert torch.equal(a, b), "per-rank state_dict round trip changed the mask"


def scenario_reshard(rank, world, mesh, ckpt_dir):
    """A checkpoint written by another number of ranks loads into this one: same full masks and weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from fsam_kernels.fsdp import fsam_state_dict, load_fsam_state_dict

    expected = torch.load(ckpt_dir + ".full.pt")
    model = shard(make_model(), mesh)
    opt = make_fsam(model, mask_update_interval=3)
    model_sd, optim_sd = get_state_dict(model, opt.base_optimizer)
    state = {"model": model_sd, "optim": optim_sd, "fsam": fsam_state_dict(opt)}
    dcp.load(state, checkpoint_id=ckpt_dir, process_group=mesh.get_group())
    set_state_dict(model, opt.base_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    load_fsam_state_dict(opt, state["fsam"])
    assert opt.step_count == expected["step_count"]
    assert_masks_equal(gathered_masks(opt, param_groups(model)[0]["params"]), expected["masks"], f"mask resharded to {world} ranks")
    for (name, p), want in zip(model.named_parameters(), expected["params"]):
        assert torch.equal(full(p.detach()), want), f"{name}: weights resharded to {world} ranks differ"
    fsam_step(model, opt, *batch(2, rank, world))  # and training goes on


def scenario_global_norm_and_k(rank, world, mesh):
    """first_step's norm is the norm of the full gradient (every rank's shard), and the mask keeps
    k = round((1 - sparsity) * N) elements of the full masked parameters, however they are sharded."""
    model = shard(make_model(), mesh)
    opt = make_fsam(model, sparsity=0.8, backend="torch")
    x, y = batch(0, rank, world)
    F.cross_entropy(model(x), y).backward()
    full_grads = [full(p.grad) for p in model.parameters()]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full_grads]))
    norm = opt.first_step()
    torch.testing.assert_close(norm, want, rtol=1e-6, atol=0)
    kept = torch.tensor([sum(int(m.sum()) for m in opt.masks())])
    torch.distributed.all_reduce(kept, group=mesh.get_group())
    n_masked = sum(p.numel() for p in param_groups(model)[0]["params"])  # DTensor: the full size
    assert kept.item() == round(0.2 * n_masked), (kept.item(), n_masked)
    opt.restore()


def scenario_nonfinite_on_one_rank(rank, world, mesh):
    """An inf in one rank's gradient shard makes every rank skip the perturbation, so they stay in step."""
    model = shard(make_model(), mesh)
    opt = make_fsam(model)
    F.cross_entropy(model(batch(0, rank, world)[0]), batch(0, rank, world)[1]).backward()
    if rank == 0:
        with torch.no_grad():
            model.emb.weight.grad.to_local()[0, 0] = float("inf")
    before = [p.detach().to_local().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        norm = opt.first_step()
    assert not torch.isfinite(norm) and opt.step_count == 0
    assert all(torch.equal(a, p.detach().to_local()) for a, p in zip(before, model.parameters()))
    opt.restore()


def scenario_bad_input(rank, world, mesh):
    from fsam_kernels.sparsity import prune_nm

    model = shard(make_model(), mesh)
    with pytest.raises(ValueError, match="the model is sharded by FSDP2.*before sharding"):
        prune_nm(model, "2:5")
    x, y = batch(0, rank, world)
    model(x)  # after a forward the root's parameters are unsharded plain tensors until resharded
    with pytest.raises(ValueError, match="sharded by FSDP2"):
        prune_nm(model, "2:5")
    model.reshard()
    with pytest.raises(ValueError, match="blocks.0.norm1.weight is a DTensor.*before sharding"):
        prune_nm(dict(model.blocks[0].named_parameters(prefix="blocks.0")), "2:5")
    with pytest.raises(ValueError, match="ordinary tensor"):
        FSAM(list(model.parameters()) + [torch.nn.Parameter(torch.zeros(3))], torch.optim.SGD, lr=0.1)
    if world == 4:  # HSDP: replicate over one mesh dim, shard over the other
        from torch.distributed.device_mesh import DeviceMesh

        hsdp = shard(make_model(), DeviceMesh("cpu", torch.arange(4).view(2, 2), mesh_dim_names=("replicate", "shard")))
        with pytest.raises(ValueError, match="1-D mesh"):
            FSAM(hsdp.parameters(), torch.optim.SGD, lr=0.1)


# --------------------------------------------------------------------------- N:M, preserve_zeros, keep_pruned
# "2:5": DIM = 10 makes the matrices reading DIM (emb, pos, qkv, proj, fc1, head) N:M-eligible and fc2
# (HIDDEN = 18 columns) a fallback tensor, so both parts of the mask are sharded. 2:4 is the same code.
NM = "2:5"


def make_pruned_model():
    """``make_model`` with its Linear weights 2:5-pruned (fc2 is not eligible), and rows 3-5 of
    blocks[0].fc2.weight zeroed: on 4 ranks rank 1 holds no non-zero weight of that tensor."""
    from fsam_kernels.sparsity import prune_nm

    model = make_model()
    result = prune_nm(model, NM)
    assert set(result.skipped) == {"blocks.0.fc2.weight", "blocks.1.fc2.weight"}, result.skipped
    with torch.no_grad():
        model.blocks[0].fc2.weight[3:6] = 0
    return model


def reference_structured_masks(masked, scores, sparsity, square, structure, preserve_zeros):
    """The unsharded mask: ``build_mask`` of the torch backend on the full weights and scores."""
    from fsam_kernels import structured
    from fsam_kernels.backends import get_backend

    weights = [full(p.detach()) for p in masked]
    lay = ParamLayout(weights, [True] * len(weights), [0.1] * len(weights), [False] * len(weights))
    nm = structured.parse_structure(structure)
    bits = structured.build_mask(get_backend("torch", "cpu"), lay, scores, square, sparsity, nm, preserve_zeros)
    return ref.unpack_mask(lay, bits)


def scenario_structured_masks(rank, world, mesh, backend):
    """structure / preserve_zeros on shards: the gathered mask equals the unsharded one bit for bit (the
    N:M part per row, the fallback's top-k over the ranks, among the non-zero weights only)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = shard(make_pruned_model(), mesh)
    masked = param_groups(model)[0]["params"]
    g = torch.Generator().manual_seed(11)
    fisher_full = [torch.randint(0, 3, p.shape, generator=g).float() for p in masked]  # ties everywhere
    fisher = {p: distribute_tensor(f, mesh, [Shard(0)]) for p, f in zip(masked, fisher_full)}
    for structure, preserve_zeros in ((NM, True), (NM, False), (None, True)):
        opt = make_fsam(model, structure=structure, preserve_zeros=preserve_zeros, backend=backend)
        what = f"{backend}: structure={structure}, preserve_zeros={preserve_zeros}"
        for sparsity in (0.0, 0.3, 0.75, 1.0):
            opt.sparsity = sparsity
            opt.update_mask(fisher=fisher)
            want = reference_structured_masks(masked, fisher_full, sparsity, False, structure, preserve_zeros)
            got = gathered_masks(opt, masked)
            assert_masks_equal(got, want, f"{what}, given Fisher with ties, sparsity={sparsity}")
            if structure is None:  # k counts the non-zero weights of every rank, and only them
                nonzero = sum(int((full(p.detach()) != 0).sum()) for p in masked)
                assert sum(int(m.sum()) for m in got) == round((1 - sparsity) * nonzero), what
                assert not any(bool((m & (full(p.detach()) == 0)).any()) for m, p in zip(got, masked)), what

    # the batch Fisher chosen inside first_step, on the sharded gradients
    opt = make_fsam(model, structure=NM, sparsity=0.5, backend=backend)
    x, y = batch(0, rank, world)

    def check_first_step_mask():
        grads = [full(p.grad) for p in masked]
        check_first_step_mask.want = reference_structured_masks(masked, grads, 0.5, True, NM, True)

    fsam_step(model, opt, x, y, before_first_step=check_first_step_mask)
    assert_masks_equal(gathered_masks(opt, masked), check_first_step_mask.want, f"{backend}: {NM} batch Fisher")


def pruned_support(model):
    """Per masked parameter, where its full weight is non-zero."""
    return [full(p.detach()) != 0 for p in param_groups(model)[0]["params"]]


def assert_still_pruned(model, support, what):
    """The weights pruned at the start are +0.0 bit for bit (and the survivors are still non-zero)."""
    for j, (p, alive) in enumerate(zip(param_groups(model)[0]["params"], support)):
        w = full(p.detach())
        if not torch.equal((w != 0), alive):
            raise AssertionError(f"{what}: masked parameter {j}: the support changed")
        if bool(torch.signbit(w[~alive]).any()):
            raise AssertionError(f"{what}: masked parameter {j}: a pruned weight is -0.0")


def scenario_keep_pruned(rank, world, mesh):
    """keep_pruned on shards: AdamW with weight decay keeps a pruned model's zeros +0.0 and its support;
    with SGD the sharded run equals the single-process one."""
    model = shard(make_pruned_model(), mesh)
    support = pruned_support(model)
    opt = make_fsam(model, structure=NM, keep_pruned=True, weight_decay=0.1, mask_update_interval=2)
    for step in range(4):
        fsam_step(model, opt, *batch(step, rank, world))
    assert opt.step_count == 4
    assert_still_pruned(model, support, "AdamW, 4 steps")

    sharded = scenario_trajectory(rank, world, mesh, steps=3, model_fn=make_pruned_model, structure=NM, keep_pruned=True)
    assert_still_pruned(sharded, support, "SGD, 3 steps")


def scenario_keep_pruned_checkpoint(rank, world, mesh, ckpt_dir):
    """The support and the mask options go through torch.distributed.checkpoint; a state written with
    other options, or a support the loaded weights contradict, is refused and changes nothing."""
    import torch.distributed.checkpoint as dcp

    from fsam_kernels.fsdp import fsam_state_dict, load_fsam_state_dict

    model = shard(make_pruned_model(), mesh)
    support = pruned_support(model)
    opt = make_fsam(model, structure=NM, keep_pruned=True, mask_update_interval=3)
    fsam_step(model, opt, *batch(0, rank, world))
    dcp.save({"fsam": fsam_state_dict(opt)}, checkpoint_id=ckpt_dir, process_group=mesh.get_group())

    opt2 = make_fsam(model, structure=NM, keep_pruned=True, mask_update_interval=3)
    with torch.no_grad():  # opt2's support (read at construction) is lost: the checkpoint's must come back
        opt2._mask.support.fill_(0)
    state = {"fsam": fsam_state_dict(opt2)}
    dcp.load(state, checkpoint_id=ckpt_dir, process_group=mesh.get_group())
    load_fsam_state_dict(opt2, state["fsam"])
    assert torch.equal(opt2._mask.support, opt._mask.support), "the loaded support differs from the saved one"
    assert all(torch.equal(a, b) for a, b in zip(opt2.masks(), opt.masks())), "the loaded mask differs"
    fsam_step(model, opt2, *batch(1, rank, world))
    assert_still_pruned(model, support, "after resuming")

    # the per-rank state dict holds this rank's support
    opt3 = make_fsam(model, structure=NM, keep_pruned=True, mask_update_interval=3)
    with torch.no_grad():
        opt3._mask.support.fill_(0)
    opt3.load_state_dict(opt.state_dict())
    assert torch.equal(opt3._mask.support, opt._mask.support), "per-rank state_dict round trip changed the support"

    saved = fsam_state_dict(opt)
    for options, needle in ((dict(structure=NM), "keep_pruned"), (dict(keep_pruned=True), "structure='2:5'")):
        other = make_fsam(model, **options)
        before = [m.clone() for m in other.masks()]
        with pytest.raises(ValueError, match=needle):
            load_fsam_state_dict(other, saved)
        assert all(torch.equal(a, b) for a, b in zip(other.masks(), before)) and other.step_count == 0

    # a pruned weight made non-zero on rank 0 only: every rank refuses, and none loads
    target = make_fsam(model, structure=NM, keep_pruned=True)
    target_masks = [m.clone() for m in target.masks()]
    if rank == 0:
        with torch.no_grad():
            w = model.blocks[0].fc1.weight.to_local()
            w[tuple((w == 0).nonzero()[0])] = 1.0
    with pytest.raises(ValueError, match="non-zero here" if rank == 0 else "refused on 1 other rank"):
        load_fsam_state_dict(target, saved)
    assert target.step_count == 0 and all(torch.equal(a, b) for a, b in zip(target.masks(), target_masks))

    # an optimizer without options writes no option entries, as before they were recorded: dcp.load
    # reads those older checkpoints with its template; one with options refuses them
    plain_model = shard(make_model(), mesh)
    old = fsam_state_dict(make_fsam(plain_model))
    assert not {"structure", "preserve_zeros", "keep_pruned"} & set(old)
    load_fsam_state_dict(make_fsam(plain_model), old)
    with pytest.raises(ValueError, match="structure=None"):
        load_fsam_state_dict(make_fsam(plain_model, structure=NM), old)


def scenario_bad_given_fisher_on_one_rank(rank, world, mesh):
    """A NaN in one rank's shard of the given Fisher: every rank raises (none waits in the selection's
    collectives) and every mask stays as it was."""
    from torch.distributed.tensor import Shard, distribute_tensor

    model = shard(make_pruned_model(), mesh)
    masked = param_groups(model)[0]["params"]
    for options in ({}, dict(structure=NM)):
        opt = make_fsam(model, **options)
        fisher = {p: distribute_tensor(torch.ones(p.shape), mesh, [Shard(0)]) for p in masked}
        opt.update_mask(fisher=fisher)
        before = [m.clone() for m in opt.masks()]
        if rank == world - 1:  # in its first non-empty shard
            next(f for f in fisher.values() if f.to_local().numel()).to_local().view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match="finite" if rank == world - 1 else "refused on 1 other rank"):
            opt.update_mask(fisher=fisher)
        assert all(torch.equal(a, b) for a, b in zip(opt.masks(), before))


# --------------------------------------------------------------------------- process management
WORLD = 4
PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict",
           "torch.distributed.tensor", "fsam_kernels", __name__]
SUB_WORLD_RANKS = [2, 3]  # the 2-rank runs use global ranks 2 and 3: group rank != global rank


def run_scenarios(rank, world, mesh, tmp_dir):
    for backend in available_backends("cpu"):  # the histogram ops of every backend, with all-reduces between
        scenario_masks(rank, world, mesh, backend)
    scenario_trajectory(rank, world, mesh)
    for backend in available_backends("cpu"):
        scenario_structured_masks(rank, world, mesh, backend)
    scenario_keep_pruned(rank, world, mesh)
    scenario_keep_pruned_checkpoint(rank, world, mesh, os.path.join(tmp_dir, f"ckpt_pruned{world}"))
    scenario_bad_given_fisher_on_one_rank(rank, world, mesh)
    scenario_trajectory(rank, world, mesh, steps=3, cls=GSAM, alpha=0.3)  # all-reduced surrogate-gap step
    scenario_checkpoint(rank, world, mesh, os.path.join(tmp_dir, f"ckpt{world}"))
    if world != WORLD:
        scenario_reshard(rank, world, mesh, os.path.join(tmp_dir, f"ckpt{WORLD}"))
    scenario_global_norm_and_k(rank, world, mesh)
    scenario_nonfinite_on_one_rank(rank, world, mesh)
    scenario_bad_input(rank, world, mesh)


def _worker(global_rank, port, tmp_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=global_rank, world_size=WORLD, timeout=timedelta(seconds=60))
    stage = "setup"
    try:
        # One set of processes for both world sizes: starting them costs more than the tests.
        for ranks in (list(range(WORLD)), SUB_WORLD_RANKS):
            stage = f"{len(ranks)} ranks"
            group = dist.new_group(ranks)  # collective over every process
            if global_rank in ranks:
                mesh = DeviceMesh.from_group(group, "cpu")
                run_scenarios(dist.get_rank(group), len(ranks), mesh, tmp_dir)
        stage = "final barrier"
        dist.barrier()
    except BaseException:
        with open(os.path.join(tmp_dir, "errors", f"rank{global_rank}.txt"), "w") as f:
            f.write(f"global rank {global_rank}, {stage}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(JOIN_TIMEOUT_S + 30)
def test_fsam_under_fsdp2_with_4_and_2_ranks(tmp_path):
    import torch.multiprocessing as mp

    errors = tmp_path / "errors"
    errors.mkdir()
    # forkserver: the heavy imports happen once, in the server, instead of in every rank on 2 cores.
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    ctx = mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=False, start_method="forkserver")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the FSDP processes did not finish in {JOIN_TIMEOUT_S} s")
    except Exception as exc:
        reports = "\n".join(p.read_text() for p in sorted(errors.iterdir()))
        raise AssertionError(f"{exc}\n{reports}") from None
    finally:
        for p in ctx.processes:  # never leave a rank behind, whatever happened
            if p.is_alive():
                p.kill()
                p.join()
