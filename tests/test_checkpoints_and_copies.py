"""What an optimizer accepts must keep working: checkpoints, copies, failed steps and late changes.

Each case ends in one of two exact outcomes: the optimizer continues bit for bit like an untouched
one, or it refuses with an error naming the culprit and every weight and optimizer state tensor is
as before. Cases where the backend matters run on every backend available on this CPU.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

from fsam_kernels import ESAM, FSAM, GSAM, SAM, amp, available_backends

from helpers import family_step, per_sample

BACKENDS = ["torch", "native", "triton"]


def need(backend):
    if backend not in available_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not run on this CPU (Triton needs TRITON_INTERPRET=1)")
    return backend


class Net(torch.nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def make(kind, model, backend="torch", **kw):
    params = model.parameters()
    if kind == "fsam":
        return FSAM(params, torch.optim.AdamW, lr=1e-2, sparsity=0.5, mask_update_interval=1, backend=backend, **kw)
    if kind == "sam":
        return SAM(params, torch.optim.AdamW, lr=1e-2, backend=backend, **kw)
    if kind == "esam":
        return ESAM(params, torch.optim.AdamW, lr=1e-2, sparsity=0.5, mask_update_interval=1, beta=0.5, gamma=0.5,
                    generator=torch.Generator().manual_seed(3), backend=backend, **kw)
    return GSAM(params, torch.optim.AdamW, lr=1e-2, sparsity=0.5, mask_update_interval=1, rho_min=0.01,
                backend=backend, **kw)


def train_step(kind, opt, model, batch):
    family_step(kind, opt, model, *batch)


def tensors_of(obj, prefix=""):
    """Every tensor in a nested structure, by a readable path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_of(v, f"{prefix}[{k!r}]"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{prefix}[{i}]"))
    return out


def everything(model, opt):
    """Weights, base optimizer state, mask, Fisher accumulator, step count and group options, copied."""
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "base": copy.deepcopy(opt.base_optimizer.state_dict()),
        "mask": None if opt._mask.bits is None else opt._mask.bits.clone(),
        "fisher": None if opt._mask.fisher is None else [f.clone() for f in opt._mask.fisher],
        "fisher_count": opt._mask.fisher_count,
        "step_count": opt.step_count,
    }


def assert_same(a, b, what):
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys(), f"{what}: different state entries {sorted(ta.keys() ^ tb.keys())}"
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{what}: {k} differs"
    strip = lambda d: {k: v for k, v in d.items() if k not in ("weights", "mask", "fisher")}
    base_a, base_b = strip(a), strip(b)
    base_a["base"] = base_a["base"]["param_groups"]
    base_b["base"] = base_b["base"]["param_groups"]
    assert base_a == base_b, f"{what}: {base_a} != {base_b}"


def assert_same_weights(m1, m2, what):
    for i, (p, q) in enumerate(zip(m1.parameters(), m2.parameters())):
        assert torch.equal(p, q), f"{what}: parameter {i} differs by up to {(p - q).abs().max().item():.3e}"


# ============================================================================ failed steps
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fails_in", ["selection", "second_pass", "backward_in_closure"])
def test_esam_step_that_fails_rewinds_like_fsam(backend, fails_in):
    model = Net()
    opt = make("esam", model, need(backend))
    data = batches(2)
    train_step("esam", opt, model, data[0])
    before = everything(model, opt)
    x, y = data[1]
    losses = per_sample(model, x, y)
    losses.mean().backward()

    def closure(idx):
        if fails_in == "selection" and idx is None:
            raise KeyError("data loader broke")
        if fails_in == "second_pass" and idx is not None:
            raise KeyError("data loader broke")
        out = per_sample(model, x, y) if idx is None else per_sample(model, x[idx], y[idx])
        if fails_in == "backward_in_closure" and idx is not None:
            out.mean().backward()  # against the contract: ESAM refuses
        return out

    with pytest.raises((KeyError, RuntimeError)):
        opt.step(closure, losses=losses)
    assert_same(everything(model, opt), before, f"ESAM after a failure in the {fails_in}")
    assert all(p.grad is None for p in model.parameters())
    train_step("esam", opt, model, data[1])  # training goes on
    assert opt.step_count == before["step_count"] + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fsam", "sam", "gsam"])
def test_closure_without_backward_is_refused_and_rewound(kind, backend):
    model = Net()
    opt = make(kind, model, need(backend))
    data = batches(2)
    train_step(kind, opt, model, data[0])
    before = everything(model, opt)
    x, y = data[1]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"FSAM.step: the closure computed no gradient .*backward\(\)"):
        opt.step(lambda: F.cross_entropy(model(x), y))  # forgets backward()
    assert_same(everything(model, opt), before, f"{kind} after a closure without backward()")
    assert all(p.grad is None for p in model.parameters())


def test_amp_closure_without_backward_is_refused_and_rewound():
    model = Net()
    opt = make("fsam", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = batches(1)[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    amp.step(opt, scaler, lambda: scaler.scale(F.cross_entropy(model(x), y)).backward())
    before = everything(model, opt)
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="amp.step: the closure computed no gradient"):
        amp.step(opt, scaler, lambda: F.cross_entropy(model(x), y))
    assert_same(everything(model, opt), before, "amp.step after a closure without backward()")
    scaler.scale(F.cross_entropy(model(x), y)).backward()  # the scaler is ready for the next step
    amp.step(opt, scaler, lambda: scaler.scale(F.cross_entropy(model(x), y)).backward())
    assert opt.step_count == before["step_count"] + 1


# ============================================================================ copies
def deep_copy(obj):
    return copy.deepcopy(obj)


def pickled(obj):
    return pickle.loads(pickle.dumps(obj))


def torch_saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


COPIES = {"deepcopy": deep_copy, "pickle": pickled, "torch.save": torch_saved}


def closure_first_step(opt, model, batch):
    # the torch.optim convention: gradients cleared, the closure does both passes
    x, y = batch

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.zero_grad()
    opt.step(closure)


def empirical_step(opt, model, batch):
    x, y = batch
    F.cross_entropy(model(x), y).backward()
    opt.accumulate_fisher()
    opt.step(lambda: F.cross_entropy(model(x), y).backward())
    opt.zero_grad()


FLAVOURS = {  # name -> (optimizer factory, one training step)
    "fsam": (lambda m, be: make("fsam", m, be), lambda o, m, b: train_step("fsam", o, m, b)),
    "fsam-closure-first": (lambda m, be: make("fsam", m, be), closure_first_step),
    # interval 2: the accumulator holds one step's Fisher when the copy is made
    "fsam-empirical": (lambda m, be: FSAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, sparsity=0.5,
                                          fisher="empirical", mask_update_interval=2, backend=be), empirical_step),
    "sam": (lambda m, be: make("sam", m, be), lambda o, m, b: train_step("sam", o, m, b)),
    "esam": (lambda m, be: make("esam", m, be), lambda o, m, b: train_step("esam", o, m, b)),
    "gsam": (lambda m, be: make("gsam", m, be), lambda o, m, b: train_step("gsam", o, m, b)),
}


# pickle and torch.save take the state deepcopy takes: under the slow Triton interpreter, deepcopy only
COPY_CASES = [(how, be) for how in COPIES for be in BACKENDS if be != "triton" or how == "deepcopy"]


@pytest.mark.parametrize("how,backend", COPY_CASES, ids=[f"{h}-{b}" for h, b in COPY_CASES])
@pytest.mark.parametrize("flavour", list(FLAVOURS))
def test_copy_continues_bit_for_bit_and_shares_nothing(flavour, how, backend):
    build, step = FLAVOURS[flavour]
    model = Net()
    opt = build(model, need(backend))
    data = batches(5)
    for b in data[:3]:
        step(opt, model, b)
    twin, twin_opt = COPIES[how]((model, opt))
    assert type(twin_opt) is type(opt) and twin_opt.base_optimizer.param_groups is twin_opt.param_groups
    assert [id(p) for g in twin_opt.param_groups for p in g["params"]] == [id(p) for p in twin.parameters()]
    assert_same(everything(twin, twin_opt), everything(model, opt), f"{how} copy")
    original = everything(model, opt)
    for b in data[3:]:  # the copy first: the original must not move
        step(twin_opt, twin, b)
    assert_same(everything(model, opt), original, f"the original, after its {how} copy stepped")
    for b in data[3:]:
        step(opt, model, b)
    assert_same(everything(twin, twin_opt), everything(model, opt), f"{how} copy after 2 more steps")
    assert opt.step_count == 5


@pytest.mark.parametrize("how", list(COPIES))
def test_copy_while_perturbed_is_refused(how):
    model = Net()
    opt = make("fsam", model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match=r"FSAM: cannot copy or pickle .* perturbed; call second_step\(\)"):
        COPIES[how]((model, opt))
    F.cross_entropy(model(x), y).backward()
    opt.second_step()  # the original goes on
    assert opt.step_count == 1


def test_copy_with_its_lr_scheduler_follows_the_schedule():
    # GSAM's rho follows the learning rate: the scheduler copied with the optimizer must drive the copy's.
    model = Net()
    opt = make("gsam", model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - 0.2 * t)
    data = batches(4)
    for b in data[:2]:
        train_step("gsam", opt, model, b)
        sched.step()
    twin, twin_opt, twin_sched = copy.deepcopy((model, opt, sched))
    for b in data[2:]:
        train_step("gsam", twin_opt, twin, b)
        twin_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.6)  # the original's schedule did not move
    for b in data[2:]:
        train_step("gsam", opt, model, b)
        sched.step()
    assert twin_opt.current_rho() == opt.current_rho()
    assert_same(everything(twin, twin_opt), everything(model, opt), "deepcopy with its scheduler")


# ============================================================================ checkpoints
class Pair(torch.nn.Module):
    """One weight whose shape a test chooses, in a group of its own, and a bias that is always masked."""

    def __init__(self, shape, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(*shape))
        self.b = torch.nn.Parameter(torch.randn(3))

    def loss(self):
        return (self.w.sum() * self.b.sum()).square() + self.w.square().sum()


GROUP_KINDS = {"masked": {}, "dense": {"fisher_mask": False}, "unperturbed": {"perturb": False}}


def pair_opt(model, kind, backend="torch", lr=1e-2, version=2, steps=1):
    groups = [{"params": [model.w], **GROUP_KINDS[kind]}, {"params": [model.b]}]
    opt = FSAM(groups, torch.optim.AdamW, lr=lr, sparsity=0.5, mask_update_interval=1, backend=backend)
    for _ in range(steps):
        model.loss().backward()
        opt.step(lambda: model.loss().backward())
        opt.zero_grad()
    sd = copy.deepcopy(opt.state_dict())
    if version == 1:  # what version 1 wrote: no shapes
        sd["fsam"].pop("param_shapes", None)
        sd["fsam"]["version"] = 1
    return opt, sd


def assert_refused_unchanged(model, opt, sd, match):
    before = everything(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same(everything(model, opt), before, "after a refused load_state_dict")
    model.loss().backward()  # and it still works
    opt.step(lambda: model.loss().backward())
    assert opt.step_count == before["step_count"] + 1


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("kind", list(GROUP_KINDS))
def test_checkpoint_of_other_shapes_is_refused(kind, backend):
    _, sd = pair_opt(Pair((8, 2)), kind, need(backend), lr=0.5)
    model = Pair((2, 8), seed=1)
    opt, _ = pair_opt(model, kind, backend)
    assert_refused_unchanged(model, opt, sd, r"param_groups\[0\]\['params'\]\[0\] has shape \(2, 8\), the checkpoint's \(8, 2\)")


@pytest.mark.parametrize("kind", list(GROUP_KINDS))
def test_version_1_checkpoints_load_when_they_fit_and_are_refused_when_not(kind):
    model = Pair((8, 2))
    opt, sd = pair_opt(model, kind, version=1)
    twin = copy.deepcopy(model)
    twin_opt, _ = pair_opt(twin, kind, steps=0)
    twin_opt.load_state_dict(copy.deepcopy(sd))  # an old checkpoint of the same shapes resumes exactly
    for m, o in ((model, opt), (twin, twin_opt)):
        m.loss().backward()
        o.step(lambda: m.loss().backward())
    assert_same(everything(twin, twin_opt), everything(model, opt), "after resuming from a version 1 checkpoint")
    # Version 1 carries no shapes: Adam's exp_avg, shaped like the (8, 2) weight, tells.
    other = Pair((2, 8), seed=1)
    other_opt, _ = pair_opt(other, kind)
    assert_refused_unchanged(other, other_opt, sd,
                             r"state 'exp_avg' of param_groups\[0\]\['params'\]\[0\] has shape \(8, 2\), the parameter \(2, 8\)")


def set_padding_bit_in_partial_byte(fsam):
    fsam["mask"][64] |= 1 << 5  # masked tensor 1 (the bias, 3 elements) starts at byte 512 / 8


def set_padding_byte(fsam):
    fsam["mask"][3] = 1  # masked tensor 0 has 2 elements: byte 3 is padding


CORRUPT = {
    "padding-bit": (set_padding_bit_in_partial_byte, r"padding bits past the 3 elements of masked tensor 1 \(param_groups\[1\]\['params'\]\[0\]\)"),
    "padding-byte": (set_padding_byte, r"padding bits past the 2 elements of masked tensor 0 \(param_groups\[0\]\['params'\]\[0\]\)"),
    "mask-dtype": (lambda f: f.update(mask=f["mask"].long()), r"mask is torch.int64 .*expected the packed uint8 mask"),
    "step-count": (lambda f: f.update(step_count=-1), r"step_count is -1"),
    "shapes-list": (lambda f: f.update(param_shapes=[[[2]]]), r"'param_shapes' do not follow its param groups"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_fsam_entry_is_refused(case):
    _, sd = pair_opt(Pair((2,)), "masked")
    corrupt, match = CORRUPT[case]
    corrupt(sd["fsam"])
    model = Pair((2,), seed=1)
    opt, _ = pair_opt(model, "masked")
    assert_refused_unchanged(model, opt, sd, match)


def test_a_failure_while_loading_changes_nothing(monkeypatch):
    _, sd = pair_opt(Pair((4, 2)), "masked", lr=0.5)
    model = Pair((4, 2), seed=1)
    opt, _ = pair_opt(model, "masked")
    real = opt._current_layout

    def fails_once_loaded():
        if opt.param_groups[0]["lr"] == 0.5:  # the base optimizer has loaded the checkpoint
            raise ValueError("load_state_dict: injected failure")
        return real()

    monkeypatch.setattr(opt, "_current_layout", fails_once_loaded)
    assert_refused_unchanged(model, opt, sd, "injected failure")
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.state is opt.base_optimizer.state


# ============================================================================ late changes and odd inputs
@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("kind", ["fsam", "sam", "gsam"])
def test_group_added_to_the_base_optimizer_gets_fsam_defaults(kind, backend):
    models, opts = [], []
    for through_base in (False, True):
        model = Net()
        head = torch.nn.Linear(3, 3)
        torch.nn.init.constant_(head.weight, 0.1)
        opt = make(kind, model, need(backend))
        group = {"params": list(head.parameters()), "lr": 0.05}
        (opt.base_optimizer if through_base else opt).add_param_group(group)
        for b in batches(3):
            x, y = b
            loss = lambda: F.cross_entropy(head(model(x)), y)
            loss().backward()
            opt.step(lambda: loss().backward())
            opt.zero_grad()
        assert opt.param_groups[1] is group and opt.param_groups is opt.base_optimizer.param_groups
        models.append(torch.nn.ModuleList([model, head]))
        opts.append(opt)
    assert_same(everything(models[1], opts[1]), everything(models[0], opts[0]),
                "a group added through the base optimizer vs through FSAM")


def test_invalid_group_added_to_the_base_optimizer_is_refused_at_the_next_step():
    model = Net()
    head = torch.nn.Linear(3, 3)
    opt = make("fsam", model)
    x, y = batches(1)[0]
    loss = lambda: F.cross_entropy(head(model(x)), y)
    loss().backward()
    opt.step(lambda: loss().backward())
    opt.zero_grad()
    opt.base_optimizer.add_param_group({"params": list(head.parameters()), "rho": -1.0})
    before = everything(model, opt)
    head_before = [p.detach().clone() for p in head.parameters()]
    loss().backward()
    with pytest.raises(ValueError, match=r"Invalid rho in param_groups\[1\]: -1.0"):
        opt.step(lambda: loss().backward())
    assert_same(everything(model, opt), before, "after refusing a group added through the base optimizer")
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), head_before))
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["rho"] == -1.0  # left as the caller made it


@pytest.mark.parametrize("value", ["trtion", "Torch"])
def test_misspelt_fsam_backend_variable_is_refused_at_construction(monkeypatch, value):
    monkeypatch.setenv("FSAM_BACKEND", value)
    with pytest.raises(ValueError, match=rf"Invalid FSAM_BACKEND environment variable: '{value}'; expected 'auto' or one of"):
        FSAM(Net().parameters(), torch.optim.SGD, lr=0.1)
    opt = FSAM(Net().parameters(), torch.optim.SGD, lr=0.1, backend="torch")  # an explicit backend= wins
    assert opt.backend == "torch"


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        meta = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] is on the meta device"):
        FSAM(meta.parameters(), torch.optim.SGD, lr=0.1)
    opt = FSAM(Net().parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[1\] is on the meta device"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2)), meta.bias]})
    assert len(opt.param_groups) == 1


def test_version_1_checkpoint_of_another_size_is_refused():
    # 4 and 6 elements: both 1-D, one aligned run of mask bits each, and SGD keeps no state to compare:
    # only the masked sizes tell the checkpoint was made for another parameter.
    def trained(n):
        w = torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n)))
        opt = FSAM([w], torch.optim.SGD, lr=0.1, sparsity=0.5, backend="torch")
        w.grad = torch.linspace(1.0, 2.0, n)
        opt.first_step()
        opt.second_step()
        return w, opt

    _, old = trained(4)
    sd = copy.deepcopy(old.state_dict())
    sd["fsam"].pop("param_shapes")
    sd["fsam"]["version"] = 1
    assert not any(sd["state"].values())  # nothing in the base optimizer's state to catch it
    w, opt = trained(6)
    before = (w.detach().clone(), opt._mask.bits.clone())
    with pytest.raises(ValueError, match=r"masked parameters' sizes differ from the checkpoint's \(\[6\] here, \[4\] there\)"):
        opt.load_state_dict(sd)
    assert torch.equal(w.detach(), before[0]) and torch.equal(opt._mask.bits, before[1])
