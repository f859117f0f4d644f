"""The cases of test_robustness.py: each a function of a backend name that raises on failure.

They run in the test process (torch and native backends) or, as a script, in a child process:
``python tests/robustness_cases.py BACKEND [CASE...]`` prints one JSON line per case, so a crash
(a write through a stale pointer) fails those cases instead of the test run. The Triton backend runs
there under TRITON_INTERPRET=1, set before anything imports its kernels.
"""
from __future__ import annotations

import json
import sys
import traceback
from typing import Callable

import numpy as np
import pytest
import torch

from fsam_kernels import ESAM, FSAM, GSAM

CASES: dict[str, Callable[[str], None]] = {}
STORAGE_SWAP: list[str] = []  # the cases run in a child process on every backend


def case(fn=None, *, swap=False):
    def register(f):
        CASES[f.__name__] = f
        if swap:
            STORAGE_SWAP.append(f.__name__)
        return f
    return register(fn) if fn is not None else register


# ----------------------------------------------------------------------------- a tiny model
def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)


def groups_of(model):
    """A masked group and a dense one with its own rho."""
    return [{"params": [model[0].weight, model[0].bias]},
            {"params": [model[2].weight, model[2].bias], "fisher_mask": False, "rho": 0.1}]


def make_fsam(model, backend, cls=FSAM, base=torch.optim.Adam, **kwargs):
    kwargs = {"lr": 0.01, "sparsity": 0.5, **kwargs}
    return cls(groups_of(model), base, backend=backend, **kwargs)


def inputs(dtype=torch.float32):
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).to(dtype)


def loss_of(model):
    return model(inputs(next(model.parameters()).dtype)).square().mean()


def per_sample(model, idx=None):
    x = inputs(next(model.parameters()).dtype)
    return model(x if idx is None else x[idx]).square().mean(dim=1)


def full_step(model, opt):
    loss_of(model).backward()
    opt.first_step(zero_grad=True)
    loss_of(model).backward()
    opt.second_step(zero_grad=True)


def snapshot(model, opt):
    """Every weight, gradient and optimizer state tensor, and FSAM's own counters."""
    base = opt.base_optimizer.state
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "state": [{k: v.clone() if torch.is_tensor(v) else v for k, v in base[p].items()} for p in model.parameters()],
        "mask": None if opt._mask.bits is None else opt._mask.bits.clone(),
        "fisher": None if opt._mask.fisher is None else [f.clone() for f in opt._mask.fisher],
        "counts": (opt.step_count, opt._mask.fisher_count, opt.phase),
    }


def assert_same(a, b, where="snapshot"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where} changed"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_bits_equal(got, want, where):
    assert got.dtype == want.dtype, f"{where}: dtype {got.dtype}, expected {want.dtype}"
    assert torch.equal(got, want), f"{where}: not restored bit for bit"


# ----------------------------------------------------------------------------- 1. shared memory
SHARE = r"share memory"


def _label(g, i, shape):
    return rf"param_groups\[{g}\]\['params'\]\[{i}\] \(shape \({shape}\)\)"


@case
def same_tensor_listed_twice(backend):
    w = torch.nn.Parameter(torch.randn(4, 3))
    before = w.detach().clone()
    with pytest.raises(ValueError, match=_label(0, 0, "4, 3") + " and " + _label(0, 2, "4, 3") + " " + SHARE):
        FSAM([w, torch.nn.Parameter(torch.randn(2)), w], torch.optim.SGD, lr=0.1, backend=backend)
    assert torch.equal(w, before)


@case
def tied_weights_listed_twice_refused_deduplicated_accepted(backend):
    emb, head = torch.nn.Embedding(6, 4), torch.nn.Linear(4, 6, bias=False)
    head.weight = emb.weight
    with pytest.raises(ValueError, match=_label(0, 0, "6, 4") + " and " + _label(1, 0, "6, 4") + " " + SHARE):
        FSAM([{"params": [emb.weight]}, {"params": [head.weight]}], torch.optim.SGD, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=_label(0, 0, "6, 4") + " and " + _label(0, 1, "6, 4") + " " + SHARE):
        FSAM([emb.weight, head.weight], torch.optim.SGD, lr=0.1, backend=backend)
    # model.parameters() lists a tied weight once: accepted, perturbed once, restored exactly
    model = torch.nn.Sequential(emb, head)
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend=backend)
    model(torch.tensor([[0, 1, 5]])).square().mean().backward()
    before = emb.weight.detach().clone()
    opt.first_step()
    assert not torch.equal(emb.weight, before)
    opt.restore()
    assert_bits_equal(emb.weight.detach(), before, "tied weight")


@case
def overlapping_views_refused_disjoint_views_accepted(backend):
    buf = torch.randn(24)
    a = torch.nn.Parameter(buf[:12].view(3, 4))
    b = torch.nn.Parameter(buf[8:20].view(4, 3))  # elements 8..11 are a's too
    with pytest.raises(ValueError, match=_label(0, 0, "3, 4") + " and " + _label(1, 0, "4, 3") + " " + SHARE):
        FSAM([{"params": [a]}, {"params": [b], "fisher_mask": False}], torch.optim.SGD, lr=0.1, backend=backend)
    opt = FSAM([a], torch.optim.SGD, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=_label(0, 0, "3, 4") + " and " + _label(1, 0, "4, 3") + " " + SHARE):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1 and len(opt.base_optimizer.param_groups) == 1
    # views that do not overlap (e.g. a flat parameter buffer) are fine
    c = torch.nn.Parameter(buf[12:24].view(4, 3))
    opt = FSAM([{"params": [a]}, {"params": [c], "fisher_mask": False}], torch.optim.SGD, lr=0.1, sparsity=0.5,
               backend=backend)
    a.grad, c.grad = torch.randn(3, 4), torch.randn(4, 3)
    before = buf.clone()
    opt.first_step()
    assert not torch.equal(buf, before)
    opt.restore()
    assert_bits_equal(buf, before, "shared buffer")


@case
def sharing_made_later_refused_before_anything_changes(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = FSAM(model.parameters(), torch.optim.Adam, lr=0.01, sparsity=0.5, backend=backend)
    x = torch.randn(3, 4)
    for _ in range(2):
        model(x).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step(zero_grad=True)
    model[1].weight.data = model[0].weight.data  # now they share memory
    model(x).square().mean().backward()
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=_label(0, 0, "4, 4") + " and " + _label(0, 2, "4, 4") + " " + SHARE):
        opt.first_step()
    assert_same(snap, snapshot(model, opt))


# ----------------------------------------------------------------------------- 2. storage replaced between passes
def _perturbed(backend, base=torch.optim.Adam):
    model = make_model()
    opt = make_fsam(model, backend, base=base)
    full_step(model, opt)  # a mask and Adam state exist
    loss_of(model).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.first_step()
    assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before)), "nothing was perturbed"
    return model, opt, before


@case(swap=True)
def storage_cloned_between_passes_then_step_continues(backend):
    model, opt, before = _perturbed(backend)
    twin, twin_opt, _ = _perturbed(backend)
    for p in model.parameters():
        p.data = p.data.clone()
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        loss_of(m).backward()
        o.second_step(zero_grad=True)
        full_step(m, o)
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        assert_bits_equal(p.detach(), q.detach(), f"parameter {i} after two more steps")


@case(swap=True)
def model_cast_to_float64_between_passes(backend):
    model, opt, before = _perturbed(backend, base=torch.optim.SGD)
    model.to(torch.float64)
    opt.restore()
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        assert_bits_equal(p.detach(), b.double(), f"parameter {i}")
    opt.zero_grad()
    full_step(model, opt)  # the next step runs on the float64 storage
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


@case(swap=True)
def model_cast_to_bfloat16_between_passes(backend):
    model, opt, before = _perturbed(backend, base=torch.optim.SGD)
    model.to(torch.bfloat16)
    opt.zero_grad()
    loss_of(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.second_step()  # restores, then SGD steps the bf16 weights
    for i, (p, b, g) in enumerate(zip(model.parameters(), before, grads)):
        assert_bits_equal(p.detach(), b.to(torch.bfloat16).add_(g, alpha=-0.01), f"parameter {i}")


@case(swap=True)
def mixed_dtypes_and_partial_swaps_between_passes(backend):
    # Originals of three dtypes (float64: the kernels' reference fallback), a tensor of several 4096-element
    # chunks, a parameter without gradient; then one cloned, one made non-contiguous, some cast, one left alone.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s).to(d)) for s, d in
              [((3, 4), torch.float32), ((2, 4200), torch.float32), ((7,), torch.bfloat16),
               ((5,), torch.float64), ((4, 2), torch.float16), ((3,), torch.float32)]]
    opt = FSAM([{"params": params[:4]}, {"params": params[4:], "fisher_mask": False}], torch.optim.SGD, lr=0.1,
               sparsity=0.5, backend=backend)
    for p in params[:5]:
        p.grad = torch.randn(p.shape).to(p.dtype)
    before = [p.detach().clone() for p in params]
    opt.first_step()
    assert all(not torch.equal(p, b) for p, b in zip(params[:5], before))
    params[0].data = params[0].data.t().contiguous().t()  # same values, column-major
    params[1].data = params[1].data.to(torch.float16)
    params[2].data = params[2].data.to(torch.float64)
    params[4].data = params[4].data.to(torch.float32)
    params[5].data = params[5].data.clone()
    opt.restore()
    for i, (p, b) in enumerate(zip(params, before)):
        assert_bits_equal(p.detach(), b.to(p.dtype), f"parameter {i}")


@case(swap=True)
def shape_changed_between_passes(backend):
    model, opt, before = _perturbed(backend)
    w = model[2].weight
    perturbed = w.detach().clone()
    w.data = w.data.t().contiguous()  # (3, 4) -> (4, 3): no defined place for the originals
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\] from \(3, 4\) to \(4, 3\)"):
        opt.restore()
    for i, (p, b) in enumerate(zip(model.parameters(), before)):
        if p is not w:
            assert_bits_equal(p.detach(), b, f"parameter {i}")
    assert_bits_equal(w.detach(), perturbed.t().contiguous(), "the reshaped parameter (left as the user set it)")
    w.data = before[2].clone()
    full_step(model, opt)  # the optimizer is idle again and steps normally


# ----------------------------------------------------------------------------- 3. values changed mid-run
def _group(i, key, value):
    def set_(opt):
        opt.param_groups[i][key] = value
    return set_


def _attr(name, value):
    def set_(opt):
        setattr(opt, name, value)
    return set_


NAN = float("nan")
MID_RUN = {  # name: (optimizer class, setter, exception, message)
    "rho_nan": (FSAM, _group(1, "rho", NAN), ValueError,
                r"Invalid rho in param_groups\[1\]: nan; expected a finite number > 0"),
    "rho_negative": (FSAM, _group(0, "rho", -0.05), ValueError, r"Invalid rho in param_groups\[0\]: -0.05;"),
    "rho_string": (FSAM, _group(0, "rho", "0.1"), ValueError, r"Invalid rho in param_groups\[0\]: '0.1';"),
    "rho_bool": (FSAM, _group(0, "rho", True), ValueError, r"Invalid rho in param_groups\[0\]: True;"),
    "rho_vector": (FSAM, _group(1, "rho", torch.tensor([0.1])), ValueError, r"Invalid rho in param_groups\[1\]"),
    "adaptive_int": (FSAM, _group(0, "adaptive", 1), TypeError,
                     r"Invalid adaptive in param_groups\[0\]: 1; expected True or False"),
    "perturb_string": (FSAM, _group(1, "perturb", "no"), TypeError, r"Invalid perturb in param_groups\[1\]"),
    "sparsity_above_one": (FSAM, _attr("sparsity", 1.5), ValueError,
                           r"Invalid sparsity: 1.5; expected a number in \[0, 1\]"),
    "sparsity_nan": (FSAM, _attr("sparsity", NAN), ValueError, r"Invalid sparsity: nan"),
    "interval_zero": (FSAM, _attr("mask_update_interval", 0), ValueError,
                      r"Invalid mask_update_interval: 0; expected an int >= 1"),
    "interval_float": (FSAM, _attr("mask_update_interval", 2.5), ValueError, r"Invalid mask_update_interval: 2.5"),
    "eps_zero": (FSAM, _attr("perturb_eps", 0.0), ValueError, r"Invalid perturb_eps: 0.0; expected a finite number > 0"),
    "fisher_unknown": (FSAM, _attr("fisher", "hessian"), ValueError, r"Invalid fisher: 'hessian'"),
    "esam_beta_zero": (ESAM, _attr("beta", 0.0), ValueError, r"Invalid beta: 0.0; expected a number in \(0, 1\]"),
    "esam_gamma_nan": (ESAM, _attr("gamma", NAN), ValueError, r"Invalid gamma: nan"),
    "gsam_alpha_negative": (GSAM, _attr("alpha", -1.0), ValueError, r"Invalid alpha: -1.0; expected a finite number >= 0"),
    "gsam_rho_min_above_rho": (GSAM, _group(1, "rho_min", 0.5), ValueError, r"Invalid rho_min in param_groups\[1\]: 0.5"),
    "gsam_lr_max_nan": (GSAM, _group(0, "lr_max", NAN), ValueError, r"Invalid lr_max in param_groups\[0\]: nan"),
}


def _one_step(model, opt):
    if isinstance(opt, ESAM):
        losses = per_sample(model)
        losses.mean().backward()
        opt.step(lambda idx: per_sample(model, idx), losses=losses)
        opt.zero_grad()
    else:
        full_step(model, opt)


def _mid_run_case(name):
    cls, set_bad, exc, message = MID_RUN[name]

    def run(backend):
        model = make_model()
        opt = make_fsam(model, backend, cls, mask_update_interval=2)
        _one_step(model, opt)
        set_bad(opt)
        if cls is ESAM:
            losses = per_sample(model)
            losses.mean().backward()
            snap = snapshot(model, opt)
            with pytest.raises(exc, match=message):
                opt.step(lambda idx: per_sample(model, idx), losses=losses)
        else:
            loss_of(model).backward()
            snap = snapshot(model, opt)
            with pytest.raises(exc, match=message):
                opt.first_step()
        assert_same(snap, snapshot(model, opt))

    run.__name__ = f"mid_run_{name}"
    return run


for _name in MID_RUN:
    case(_mid_run_case(_name))


@case
def gsam_alpha_changed_between_passes(backend):
    model = make_model()
    opt = make_fsam(model, backend, GSAM)
    full_step(model, opt)
    loss_of(model).backward()
    weights = [p.detach().clone() for p in model.parameters()]
    opt.first_step(zero_grad=True)
    loss_of(model).backward()
    opt.alpha = NAN
    state = snapshot(model, opt)["state"]
    with pytest.raises(ValueError, match=r"Invalid alpha: nan"):
        opt.second_step()
    # a failure inside second_step abandons the step: weights restored, base optimizer not stepped
    assert_same(weights, [p.detach() for p in model.parameters()], "weights")
    assert_same(state, snapshot(model, opt)["state"], "base optimizer state")
    assert opt.phase.name == "IDLE"


@case
def bad_option_refused_before_the_closure_or_unscale_runs(backend):
    from fsam_kernels import amp as fsam_amp

    model = make_model()
    opt = make_fsam(model, backend)
    full_step(model, opt)
    opt.sparsity = 2.0
    calls = []

    def closure():
        calls.append(1)
        loss = loss_of(model)
        loss.backward()
        return loss

    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"Invalid sparsity: 2.0"):
        opt.step(closure)  # no gradient yet: the closure would run the first pass
    with pytest.raises(ValueError, match=r"Invalid sparsity: 2.0"):
        fsam_amp.step(opt, torch.amp.GradScaler("cpu"), closure)
    assert calls == [], "the closure ran"
    assert_same(snap, snapshot(model, opt))
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss_of(model)).backward()
    with pytest.raises(ValueError, match=r"Invalid sparsity: 2.0"):
        fsam_amp.first_step(opt, scaler)
    opt.sparsity = 0.5
    assert fsam_amp.first_step(opt, scaler)  # the scaler recorded no unscale_ of the refused call
    opt.restore()


# ----------------------------------------------------------------------------- 4. one rule for numbers
@case
def numbers_of_other_types_accepted_and_stored_as_python_numbers(backend):
    model = make_model()
    groups = groups_of(model)
    groups[1]["rho"] = torch.tensor(0.1, dtype=torch.float64)
    opt = FSAM(groups, torch.optim.SGD, np.float32(0.05), lr=0.1, sparsity=torch.tensor(0.5),
               mask_update_interval=np.int64(3), perturb_eps=np.float32(1e-12), backend=backend)
    assert [type(g["rho"]) for g in opt.param_groups] == [float, float]
    assert (type(opt.sparsity), type(opt.mask_update_interval), type(opt.perturb_eps)) == (float, int, float)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "rho": np.float16(0.25)})
    assert opt.param_groups[2]["rho"] == 0.25 and type(opt.param_groups[2]["rho"]) is float
    full_step(model, opt)
    opt.param_groups[0]["rho"] = torch.tensor(0.2)  # mid-run: read once, stored as a float
    opt.sparsity = np.float64(0.25)
    opt.mask_update_interval = torch.tensor(2)
    full_step(model, opt)
    assert type(opt.param_groups[0]["rho"]) is float and opt.param_groups[0]["rho"] == float(torch.tensor(0.2))
    assert (type(opt.sparsity), type(opt.mask_update_interval)) == (float, int)
    esam = ESAM(make_model().parameters(), torch.optim.SGD, lr=0.1, beta=np.float32(0.5), gamma=torch.tensor(0.5),
                backend=backend)
    gsam = GSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, alpha=np.float32(0.5),
                rho_min=torch.tensor(0.01, dtype=torch.float64), lr_min=np.int32(0), backend=backend)
    assert (type(esam.beta), type(esam.gamma), type(gsam.alpha)) == (float, float, float)
    assert [type(gsam.param_groups[0][k]) for k in ("rho_min", "lr_max", "lr_min")] == [float, float, float]


@case
def non_numbers_refused_at_construction_and_mid_run(backend):
    bad = [True, np.bool_(True), torch.tensor(True), torch.tensor([0.05]), 0.05 + 0j, "0.05", None]
    for value in bad:
        with pytest.raises(ValueError, match=r"Invalid rho: "):
            FSAM(make_model().parameters(), torch.optim.SGD, value, lr=0.1, backend=backend)
        with pytest.raises(ValueError, match=r"Invalid rho in param_groups\[1\]: "):
            FSAM([{"params": [torch.nn.Parameter(torch.randn(2))]},
                  {"params": [torch.nn.Parameter(torch.randn(2))], "rho": value}], torch.optim.SGD, lr=0.1,
                 backend=backend)
        model = make_model()
        opt = make_fsam(model, backend)
        full_step(model, opt)
        opt.param_groups[0]["rho"] = value
        loss_of(model).backward()
        snap = snapshot(model, opt)
        with pytest.raises(ValueError, match=r"Invalid rho in param_groups\[0\]: "):
            opt.first_step()
        assert_same(snap, snapshot(model, opt))


# ----------------------------------------------------------------------------- as a script
def main(argv: list[str]) -> None:
    backend, names = argv[0], argv[1:] or list(CASES)
    for name in names:
        try:
            CASES[name](backend)
            result = {"case": name, "ok": True}
        except BaseException:  # noqa: B036 - reported to the parent test, which fails
            result = {"case": name, "ok": False, "error": traceback.format_exc()}
        print("CASE " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
