"""FSAM as torch.optim users hold it: param_groups/state/defaults shared with the base optimizer (LR
schedulers, warm starts from a base optimizer's state dict), torch.optim's hooks, GradScaler's
clipping recipe, base optimizers that need a closure, inference_mode and memory accounting.
Cases where the backend matters run on every backend available on this CPU."""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.optim import optimizer as torch_optimizer

from fsam_kernels import FSAM, amp, available_backends
from fsam_kernels import reference as ref

BACKENDS = ["torch", "native", "triton"]


def need(backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run on this CPU (Triton needs TRITON_INTERPRET=1)")
    return backend


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)


def loss_of(model, data=None):
    x, y = batch() if data is None else data
    return F.cross_entropy(model(x), y)


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_equal_weights(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}: parameter {i} differs"


def two_call_step(model, opt):
    loss_of(model).backward()
    opt.first_step(zero_grad=True)
    loss_of(model).backward()
    opt.second_step(zero_grad=True)


# ------------------------------------------------------------------ item 3: param_groups, state, defaults
def test_scheduler_keeps_acting_after_the_base_optimizer_loads_a_state_dict():
    model = net()
    opt = FSAM(model.parameters(), torch.optim.AdamW, lr=0.01, sparsity=0.5, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))
    saved = torch.optim.AdamW(net().parameters(), lr=0.01).state_dict()
    opt.base_optimizer.load_state_dict(saved)  # torch replaces the base optimizer's param_groups list
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.state is opt.base_optimizer.state
    assert opt.defaults is opt.base_optimizer.defaults
    two_call_step(model, opt)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.25)  # what the scheduler set
    # the scheduler's lr 0 must stop the weights
    for group in opt.param_groups:
        group["lr"] = 0.0
    before = weights(model)
    two_call_step(model, opt)
    assert_equal_weights(before, weights(model), "lr 0 set through FSAM's param_groups")


def test_plain_base_optimizer_state_dict_is_a_warm_start():
    model, twin = net(), net()
    plain = torch.optim.AdamW(twin.parameters(), lr=0.03, weight_decay=0.1)
    for _ in range(2):
        plain.zero_grad()
        loss_of(twin).backward()
        plain.step()
    model.load_state_dict(twin.state_dict())
    opt = FSAM([{"params": list(model.parameters()), "rho": 0.2}], torch.optim.AdamW, lr=0.5,
               sparsity=0.5, mask_update_interval=1, backend="torch")
    two_call_step(model, opt)  # a mask and a step count to drop
    model.load_state_dict(twin.state_dict())
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["lr"] == 0.03 and opt.param_groups[0]["weight_decay"] == 0.1
    assert opt.param_groups[0]["rho"] == 0.2  # the group keeps its FSAM options
    assert opt.step_count == 0 and opt.masks() == []  # FSAM's own state afresh, the mask built next step
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], plain.state[q]["exp_avg"])
    two_call_step(model, opt)
    assert opt.step_count == 1 and len(opt.masks()) == 4
    assert int(opt.state[next(model.parameters())]["step"]) == 3


def test_foreign_dict_is_refused_and_changes_nothing():
    model = net()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sparsity=0.5, backend="torch")
    two_call_step(model, opt)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="torch.optim state dict"):
        opt.load_state_dict({"lr": 0.1})
    wrong = torch.optim.SGD(torch.nn.Linear(6, 9).parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError):
        opt.load_state_dict(wrong)
    assert torch.equal(opt.state_dict()["fsam"]["mask"], before["fsam"]["mask"])
    assert opt.step_count == 1


# ------------------------------------------------------------------ item 11: closure-needing base optimizers
class NeedsClosure(torch.optim.SGD):
    def step(self, closure):  # noqa: D102 - a required closure
        return super().step(closure)


@pytest.mark.parametrize("base", [torch.optim.LBFGS, NeedsClosure], ids=["LBFGS", "required-closure"])
def test_base_optimizer_that_needs_a_closure_is_refused_at_construction(base):
    with pytest.raises(TypeError, match=r"Invalid base_optimizer: .*needs a closure"):
        FSAM(net().parameters(), base, lr=0.1, backend="torch")


# ------------------------------------------------------------------ item 12: torch.optim's hooks
def hooked_opt(calls):
    model = net()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt, args[0] is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt, args[0] is opt)))
    return model, opt


def test_step_hooks_fire_once_per_two_call_step():
    calls = []
    model, opt = hooked_opt(calls)
    loss_of(model).backward()
    opt.first_step(zero_grad=True)
    assert calls == [("pre", True, True)]  # a step begins: before anything moves
    loss_of(model).backward()
    opt.second_step()
    assert calls == [("pre", True, True), ("post", True, True)]


def test_step_hooks_fire_once_per_closure_step():
    calls = []
    model, opt = hooked_opt(calls)

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    opt.step(closure)
    opt.step(closure)
    assert calls == [("pre", True, True), ("post", True, True)] * 2


def test_step_pre_hook_may_replace_the_arguments():
    model, opt = hooked_opt([])
    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {**kwargs, "zero_grad": True}))
    loss_of(model).backward()
    opt.first_step()
    assert all(p.grad is None for p in model.parameters())


def test_global_step_hooks_fire_for_the_two_call_form():
    calls = []
    pre = torch_optimizer.register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o))))
    post = torch_optimizer.register_optimizer_step_post_hook(lambda o, a, k: calls.append(("post", type(o))))
    try:
        model = net()
        opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
        two_call_step(model, opt)
    finally:
        pre.remove()
        post.remove()
    # the base optimizer's own step fires them too, inside FSAM's step
    assert calls == [("pre", FSAM), ("pre", torch.optim.SGD), ("post", torch.optim.SGD), ("post", FSAM)]


def test_state_dict_hooks_fire():
    calls = []
    model = net()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
    two_call_step(model, opt)
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))

    def post(o, sd):
        calls.append("post")
        return {**sd, "note": "added by a hook"}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["note"] == "added by a hook" and "fsam" in sd


def test_load_state_dict_hooks_fire():
    calls = []
    model = net()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
    two_call_step(model, opt)
    sd = opt.state_dict()

    def pre(o, state_dict):
        calls.append("pre")
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [dict(g, lr=0.25) for g in state_dict["param_groups"]]
        return state_dict

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("post", o.param_groups[0]["lr"])))
    opt.load_state_dict(sd)
    assert calls == ["pre", ("post", 0.25)]


# ------------------------------------------------------------------ item 10: GradScaler's clipping recipe
@pytest.mark.parametrize("unscaled", ["fsam", "base"])
def test_clipping_recipe_with_a_grad_scaler_matches_the_unscaled_step(unscaled):
    x, y = batch()
    plain, scaled = net(), net()
    opt_p = FSAM(plain.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sparsity=0.5, backend="torch")
    opt_s = FSAM(scaled.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sparsity=0.5, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    for _ in range(3):
        F.cross_entropy(plain(x), y).backward()
        opt_p.first_step(zero_grad=True)
        F.cross_entropy(plain(x), y).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.05)
        opt_p.second_step(zero_grad=True)

        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        assert amp.first_step(opt_s, scaler)
        scaler.scale(F.cross_entropy(scaled(x), y)).backward()
        scaler.unscale_(opt_s if unscaled == "fsam" else opt_s.base_optimizer)  # torch's recipe: unscale, clip, step
        torch.nn.utils.clip_grad_norm_(scaled.parameters(), 0.05)
        assert amp.second_step(opt_s, scaler, zero_grad=True)
    assert_equal_weights(weights(plain), weights(scaled), "scaled step with clipping")
    # and a skipped first pass (an overflow) after the caller's unscale_ of the second one backs off
    scaler.scale(F.cross_entropy(scaled(x), y) * float("inf")).backward()
    assert not amp.first_step(opt_s, scaler)
    scaler.scale(F.cross_entropy(scaled(x), y)).backward()
    scaler.unscale_(opt_s if unscaled == "fsam" else opt_s.base_optimizer)
    assert not amp.second_step(opt_s, scaler, zero_grad=True)
    assert scaler.get_scale() < 2.0**10 and opt_s.phase.name == "IDLE"


@pytest.mark.parametrize("with_scaler", [False, True], ids=["plain", "scaler"])
def test_failure_inside_second_step_leaves_the_weights_restored(with_scaler):
    model = net()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sparsity=0.5, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4) if with_scaler else None
    before = weights(model)
    scale = (lambda loss: scaler.scale(loss)) if with_scaler else (lambda loss: loss)
    scale(loss_of(model)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    scale(loss_of(model)).backward()

    def fail():
        raise RuntimeError("injected failure before the base step")

    opt._before_base_step = fail
    with pytest.raises(RuntimeError, match="injected failure"):
        opt.second_step(scaler=scaler)
    assert_equal_weights(before, weights(model), "after a failed second_step")
    assert opt.phase.name == "IDLE"
    assert all(not s for s in opt.base_optimizer.state.values()), "the base optimizer stepped"
    del opt._before_base_step  # the next step works, scaler included
    opt.zero_grad()
    scale(loss_of(model)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    scale(loss_of(model)).backward()
    assert opt.second_step(scaler=scaler)


# ------------------------------------------------------------------ item 7: structure in checkpoints
def pruned_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    with torch.no_grad():
        layer.weight.view(-1, 4)[:, :2] = 0  # 2:4 pruned: the first two of every four are zero
    return layer


def checkpoint_of(layer, **kw):
    opt = FSAM(layer.parameters(), torch.optim.SGD, lr=0.0, sparsity=0.5, mask_update_interval=1,
               backend="torch", **kw)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    layer(x).square().sum().backward()
    opt.first_step(zero_grad=True)
    layer(x).square().sum().backward()
    opt.second_step(zero_grad=True)
    return opt.state_dict()


def test_checkpoint_records_structure_and_refuses_a_mismatch_naming_both():
    sd = checkpoint_of(pruned_linear())
    assert sd["fsam"]["structure"] is None and sd["fsam"]["preserve_zeros"] is False
    layer = pruned_linear()
    opt = FSAM(layer.parameters(), torch.optim.SGD, lr=0.0, structure="2:4", backend="torch")
    with pytest.raises(ValueError, match=r"written with structure=None, preserve_zeros=False; this optimizer has "
                                         r"structure='2:4', preserve_zeros=True"):
        opt.load_state_dict(sd)
    assert opt.masks() == [] and opt.step_count == 0
    structured = checkpoint_of(pruned_linear(), structure="2:4")
    assert structured["fsam"]["structure"] == "2:4" and structured["fsam"]["preserve_zeros"] is True
    opt.load_state_dict(structured)  # the same options load
    assert torch.equal(opt._mask.bits, structured["fsam"]["mask"])


def older_checkpoint(sd):
    """What a checkpoint written before structure and preserve_zeros were recorded holds."""
    sd = dict(sd, fsam=dict(sd["fsam"]))
    for key in ("structure", "preserve_zeros"):
        sd["fsam"].pop(key, None)
    return sd


def test_older_checkpoint_with_an_unstructured_mask_is_refused_by_a_structured_optimizer():
    sd = older_checkpoint(checkpoint_of(pruned_linear()))
    where = r"param_groups\[0\]\['params'\]\[0\]"
    for preserve_zeros, message in (
            (False, rf"mask of {where} is not 2:4: \d+ groups of 4 have other than 2 elements set"),
            (True, rf"mask perturbs weights of {where} that are zero")):
        layer = pruned_linear()
        opt = FSAM(layer.parameters(), torch.optim.SGD, lr=0.0, structure="2:4", preserve_zeros=preserve_zeros,
                   backend="torch")
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(sd)
    # an older checkpoint of the same options still loads
    structured = older_checkpoint(checkpoint_of(pruned_linear(), structure="2:4"))
    opt = FSAM(pruned_linear().parameters(), torch.optim.SGD, lr=0.0, structure="2:4", backend="torch")
    opt.load_state_dict(structured)
    assert torch.equal(opt._mask.bits, structured["fsam"]["mask"])


def test_older_checkpoint_whose_mask_perturbs_zeros_is_refused_with_preserve_zeros():
    sd = older_checkpoint(checkpoint_of(pruned_linear()))
    layer = pruned_linear()
    opt = FSAM(layer.parameters(), torch.optim.SGD, lr=0.0, preserve_zeros=True, backend="torch")
    kept = ref.unpack_mask(opt._current_layout(), sd["fsam"]["mask"])
    assert bool((kept[0] & (layer.weight == 0)).any())  # the unstructured mask picked pruned weights
    with pytest.raises(ValueError, match=r"perturbs weights of param_groups\[0\]\['params'\]\[0\] that are zero"):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------ items 13, 14: inference_mode, memory
def held_tensors(obj, found=None):
    """Every tensor in ``obj``: nested dicts, lists, tuples and dataclasses (a backend's aux and saved
    originals), by identity."""
    found = {} if found is None else found
    if isinstance(obj, torch.Tensor):
        found[id(obj)] = obj
    elif isinstance(obj, dict):
        for v in obj.values():
            held_tensors(v, found)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            held_tensors(v, found)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            held_tensors(getattr(obj, f.name), found)
    return list(found.values())


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def fsam_state(opt):
    return [opt._mask.bits, opt._mask.aux, opt._mask.fisher, opt._pending]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call", ["first_step", "accumulate_fisher"])
def test_inference_mode_changes_nothing_on_every_backend(backend, call):
    need(backend)
    runs = []
    for inside in (False, True):
        model = net()
        opt = FSAM(model.parameters(), torch.optim.Adam, lr=0.01, sparsity=0.5, mask_update_interval=1,
                   fisher="empirical" if call == "accumulate_fisher" else "batch", backend=backend)
        mode = torch.inference_mode() if inside else contextlib.nullcontext()
        loss_of(model).backward()
        if call == "first_step":
            with mode:
                opt.first_step(zero_grad=True)
            held = held_tensors(fsam_state(opt))
            loss_of(model).backward()
            opt.second_step(zero_grad=True)
        else:
            with mode:
                opt.accumulate_fisher()
            held = held_tensors(fsam_state(opt))
            opt.zero_grad()
            loss_of(model, batch(seed=2)).backward()
            opt.accumulate_fisher()  # outside: adds to what was accumulated inside
            opt.zero_grad()
        two_call_step(model, opt)
        assert held and not any(t.is_inference() for t in held), "FSAM holds an inference tensor"
        runs.append((weights(model), opt.masks()))
    assert_equal_weights(runs[0][0], runs[1][0], "weights after a call inside inference_mode")
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_stats_count_every_tensor_held(backend):
    need(backend)
    model = net()
    opt = FSAM(model.parameters(), torch.optim.Adam, lr=0.01, sparsity=0.5, backend=backend)
    two_call_step(model, opt)
    loss_of(model).backward()
    opt.accumulate_fisher()
    opt.first_step(zero_grad=True)  # a pending step: its saved originals
    stats = opt.memory_stats()
    layout = opt._current_layout()
    assert stats["mask"] == nbytes(held_tensors(opt._mask.bits)) == layout.mask_bytes
    assert stats["mask_aux"] == nbytes(held_tensors(opt._mask.aux))
    if backend != "torch":  # native: per-512-bit-block prefix counts; Triton: per-chunk prefix counts
        assert stats["mask_aux"] > 0
    assert stats["fisher"] == nbytes(held_tensors(opt._mask.fisher)) == 4 * sum(p.numel() for p in model.parameters())
    # the compact originals: the masked elements of every perturbed tensor, in its dtype
    assert stats["saved"] == sum(int(m.sum()) * 4 for m in opt.masks())
    assert stats["persistent"] == stats["mask"] + stats["mask_aux"] + stats["fisher"]
    opt.restore()


def test_each_masked_tensor_pays_64_bytes_of_mask_at_least():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(30)]
    opt = FSAM(params, torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
    sum(p.square().sum() for p in params).backward()
    opt.update_mask()
    mask = opt.memory_stats()["mask"]
    assert mask == 30 * 64  # one 512-bit aligned run per tensor
    assert mask / 90 == pytest.approx(21.33, abs=0.01)  # bytes per parameter, as documented


def test_recorded_checkpoint_loads_after_more_weights_were_pruned():
    sd = checkpoint_of(pruned_linear(), structure="2:4")
    layer = pruned_linear()
    with torch.no_grad():
        layer.weight[0] = 0  # pruned further after the mask was built
    opt = FSAM(layer.parameters(), torch.optim.SGD, lr=0.0, structure="2:4", backend="torch")
    opt.load_state_dict(sd)
    assert torch.equal(opt._mask.bits, sd["fsam"]["mask"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_stats_count_esams_per_step_mask(backend):
    from fsam_kernels import ESAM

    need(backend)
    model = net()
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, beta=0.5, gamma=1.0, backend=backend,
               generator=torch.Generator().manual_seed(0))
    loss_of(model).backward()
    opt.first_step()
    pending = opt._pending
    assert pending.bits is not opt._mask.bits  # the Fisher mask and'ed with a random subset
    originals = sum(int(m.sum()) for m in ref.unpack_mask(pending.layout, pending.bits)) * 4
    stats = opt.memory_stats()
    assert stats["saved"] == originals
    assert stats["step_mask"] == nbytes(held_tensors([pending.bits, pending.aux])) > 0
    opt.restore()
    assert opt.memory_stats()["saved"] == opt.memory_stats()["step_mask"] == 0
