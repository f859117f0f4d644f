"""FSAM's norm epsilon is ``perturb_eps``; ``eps`` (like every keyword FSAM does not own) is the base
optimizer's, as in davda54/sam. Copies pickled before the rename still load."""
from __future__ import annotations

import pickle

import pytest
import torch

from fsam_kernels import ESAM, FSAM, GSAM, SAM
from helpers import cpu_backend_or_skip


def _trainer_fsam():
    return pytest.importorskip("fsam_kernels.integrations.hf").TrainerFSAM


MEMBERS = {"FSAM": lambda: FSAM, "SAM": lambda: SAM, "ESAM": lambda: ESAM, "GSAM": lambda: GSAM,
           "TrainerFSAM": _trainer_fsam}
BASE_KWARGS = dict(lr=2e-5, eps=1e-6, betas=(0.8, 0.95), weight_decay=0.123)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


@pytest.mark.parametrize("member", MEMBERS)
def test_eps_betas_weight_decay_reach_the_base_optimizer(member):
    cls = MEMBERS[member]()
    model = _model()
    opt = cls(model.parameters(), torch.optim.AdamW, **BASE_KWARGS)
    for key, value in BASE_KWARGS.items():
        assert opt.base_optimizer.defaults[key] == value, key
        assert opt.defaults[key] == value, key
        for group in opt.param_groups:
            assert group[key] == value, key
    assert opt.perturb_eps == 1e-12  # FSAM's own default, untouched by the base optimizer's eps


@pytest.mark.parametrize("member", MEMBERS)
def test_eps_of_a_param_group_reaches_the_base_optimizer(member):
    cls = MEMBERS[member]()
    model = _model()
    groups = [{"params": model[0].parameters(), "eps": 1e-5}, {"params": model[1].parameters()}]
    opt = cls(groups, torch.optim.AdamW, lr=1e-3, eps=1e-7, perturb_eps=1e-9)
    assert [g["eps"] for g in opt.base_optimizer.param_groups] == [1e-5, 1e-7]
    assert opt.perturb_eps == 1e-9


@pytest.mark.parametrize("member", MEMBERS)
def test_davda54_positional_form(member):
    cls = MEMBERS[member]()
    model = _model()
    opt = cls(model.parameters(), torch.optim.SGD, 0.07, True, lr=0.1)
    assert [(g["rho"], g["adaptive"], g["lr"]) for g in opt.param_groups] == [(0.07, True, 0.1)]


def test_sgd_gets_eps_and_says_it_takes_none():
    # eps is the base optimizer's now: SGD, which has no eps, refuses it itself.
    with pytest.raises(TypeError, match="eps"):
        FSAM(_model().parameters(), torch.optim.SGD, lr=0.1, eps=1e-6)


def test_eps_attribute_is_a_deprecated_alias():
    opt = FSAM(_model().parameters(), torch.optim.SGD, lr=0.1, perturb_eps=1e-10)
    with pytest.warns(FutureWarning, match="perturb_eps"):
        assert opt.eps == 1e-10
    with pytest.warns(FutureWarning, match="perturb_eps"):
        opt.eps = 1e-8
    assert opt.perturb_eps == 1e-8


def _pickled_before_the_rename(opt, monkeypatch):
    """``pickle.dumps(opt)`` as the version before the rename wrote it: FSAM's epsilon under ``eps``."""
    state = opt.__getstate__()
    state["eps"] = state.pop("perturb_eps")
    with monkeypatch.context() as m:
        m.setattr(type(opt), "__getstate__", lambda self: state)
        return pickle.dumps(opt)


@pytest.mark.parametrize("member", ["FSAM", "SAM", "ESAM", "GSAM"])
def test_copies_pickled_with_the_old_eps_attribute_load(member, monkeypatch):
    cls = MEMBERS[member]()
    model = _model()
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, perturb_eps=3e-9, backend="torch")
    loaded = pickle.loads(_pickled_before_the_rename(opt, monkeypatch))
    assert loaded.perturb_eps == 3e-9
    assert "eps" not in vars(loaded)
    # it steps like the original
    params = [p for g in loaded.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    loaded.first_step()
    loaded.restore()


# ----------------------------------------------------------------------------- an epsilon the norm can use
FP32_TINY = torch.finfo(torch.float32).tiny
FP64_TINY = torch.finfo(torch.float64).tiny


@pytest.mark.parametrize("value", [1e-40, 1e-46, FP32_TINY / 2])
def test_an_epsilon_fp32_cannot_use_is_refused_at_construction(value):
    with pytest.raises(ValueError, match=r"Invalid perturb_eps: .*float32.*expected a number >= 1\.17549435\d*e-38"):
        FSAM(_model().parameters(), torch.optim.SGD, lr=0.1, perturb_eps=value)
    FSAM(_model().parameters(), torch.optim.SGD, lr=0.1, perturb_eps=FP32_TINY)  # the smallest usable value


def test_fp64_parameters_use_fp64s_smallest_epsilon():
    model = _model().double()
    FSAM(model.parameters(), torch.optim.SGD, lr=0.1, perturb_eps=1e-300)
    with pytest.raises(ValueError, match=r"Invalid perturb_eps: 1e-310; too small for the float64 gradient norm"):
        FSAM(model.parameters(), torch.optim.SGD, lr=0.1, perturb_eps=1e-310)


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_an_epsilon_set_mid_run_is_refused_before_anything_changes(backend):
    model = _model()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, sparsity=0.5, backend=cpu_backend_or_skip(backend))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.perturb_eps = 1e-40
    with pytest.raises(ValueError, match="perturb_eps: 1e-40; too small for the float32 gradient norm"):
        opt.first_step()
    assert opt.phase.name == "IDLE" and opt.step_count == 0 and opt.masks() == []
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_a_zero_norm_perturbs_by_exactly_zero(backend, adaptive, dtype):
    """An all-zero gradient: 1 / perturb_eps times a large rho overflows (scale inf), yet no weight moves
    (0 * inf would make every masked weight NaN)."""
    model = _model().to(dtype)
    tiny = torch.finfo(dtype).tiny
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "fisher_mask": False}]
    opt = FSAM(groups, torch.optim.SGD, 100.0, adaptive, lr=0.1, sparsity=0.5, perturb_eps=tiny,
               backend=cpu_backend_or_skip(backend))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    norm = opt.first_step()
    assert float(norm) == 0.0 and opt.phase.name == "PERTURBED"
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b), f"{p} moved from {b}"
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_an_epsilon_set_mid_run_is_refused_before_the_scaler_unscales():
    """check_options (what the closure form and fsam_kernels.amp call before anything acts) refuses it
    too, so a GradScaler is never left unscaled by a refused step."""
    model = _model()
    opt = FSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="torch")
    opt.perturb_eps = 1e-40
    with pytest.raises(ValueError, match="perturb_eps: 1e-40; too small for the float32 gradient norm"):
        opt.check_options()
