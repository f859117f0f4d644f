"""A plain step (no mask update) never waits for the device (issue 22, item 1; the rule is in
docs/backends.md): FSAM makes 0 blocking reads of a value computed in the same step, on every backend.

On the CPU every read of a tensor's value through torch is counted while FSAM's ``first_step`` and
``second_step`` (or ``step(closure)``) run: ``aten._local_scalar_dense`` (``.item()``, ``bool()``,
``int()``, ``float()`` of a tensor), ``.tolist()``, and the ops whose output size depends on the
values (``nonzero``, ``masked_select``, boolean indexing), which wait for the device too. The base
optimizer's own step and the work inside kernels (Triton's interpreter, the native ops) are not
FSAM's host code and are not counted. On a GPU the same steps run under
``torch.cuda.set_sync_debug_mode("error")``.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fsam_kernels import FSAM
from fsam_kernels.backends import available_backends
from fsam_kernels.protocol import Phase

aten = torch.ops.aten
_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default,
          aten.masked_select.default, aten.nonzero_numpy.default, aten.unique_consecutive.default,
          aten._unique2.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class HostReads(TorchDispatchMode):
    """Records the host reads of tensor values (see the module docstring) made while it is active."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            if func in _READS:
                self.reads.append(str(func))
            elif func in _INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                           for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])
                                           if i is not None):
                self.reads.append(f"{func} with a boolean index")
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def counting(opt, monkeypatch):
    """Count FSAM's host reads: not the base optimizer's step, nor what runs inside a Triton kernel."""
    mode = HostReads()
    base_step = opt.base_optimizer.step

    def paused_step(*args, **kwargs):
        with mode.pause():
            return base_step(*args, **kwargs)

    monkeypatch.setattr(opt.base_optimizer, "step", paused_step)
    original_tolist = torch.Tensor.tolist

    def tolist(self):
        if not mode.paused:
            mode.reads.append("Tensor.tolist")
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    try:
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def paused_run(self, *args, **kwargs):
            with mode.pause():
                return run(self, *args, **kwargs)

        monkeypatch.setattr(InterpretedFunction, "run", paused_run)
    except ImportError:
        pass
    with mode:
        yield mode
    monkeypatch.undo()


def backend_param(name, *marks):
    return pytest.param(name, id=name, marks=list(marks))


BACKENDS = [backend_param("torch"), backend_param("native", pytest.mark.native),
            backend_param("triton", pytest.mark.triton)]


def model_and_data(device="cpu", seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)
    g = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 6, generator=g).to(device), torch.randint(0, 3, (8,), generator=g).to(device))
            for _ in range(6)]
    return model, data


def loss_of(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def make_opt(model, backend, device="cpu"):
    if backend not in available_backends(device):
        pytest.skip(f"the {backend} backend does not run on {device} here")
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[2].bias], "fisher_mask": False, "rho": 0.1}]
    return FSAM(groups, torch.optim.SGD, rho=0.05, sparsity=0.5, mask_update_interval=100, lr=0.1, momentum=0.9,
                backend=backend)


def two_call_step(opt, model, batch):
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)


def closure_step(opt, model, batch):
    loss_of(model, batch).backward()

    def closure():
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_plain_step_reads_nothing_from_the_device(backend, monkeypatch):
    model, data = model_and_data()
    opt = make_opt(model, backend)
    two_call_step(opt, model, data[0])  # the mask update: it may read (the top-k's threshold, counts)
    steps = []
    with counting(opt, monkeypatch) as mode:
        two_call_step(opt, model, data[1])
        closure_step(opt, model, data[2])
        opt.param_groups[1]["rho"] = 0.2  # options changed between steps are read as Python numbers
        two_call_step(opt, model, data[3])
        steps = mode.reads
    assert steps == []
    assert opt.step_count == 4 and opt.phase is Phase.IDLE


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_non_finite_plain_step_is_skipped_without_a_read(backend, monkeypatch):
    model, data = model_and_data(seed=1)
    opt = make_opt(model, backend)
    two_call_step(opt, model, data[0])
    before = [p.detach().clone() for p in model.parameters()]
    loss_of(model, data[1]).backward()
    model[2].bias.grad[0] = float("nan")
    with counting(opt, monkeypatch) as mode, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.first_step(zero_grad=True)
        assert caught == []  # the decision is read at the end of the step
        unchanged = all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
        loss_of(model, data[1]).backward()  # the second pass, at the unperturbed weights
        stepped = opt.second_step(zero_grad=True)  # steps the base optimizer from there
        reads = list(mode.reads)
    assert reads == [] and unchanged and stepped
    assert [str(w.message).count("non-finite gradient norm") for w in caught] == [1]
    assert opt.step_count == 1 and opt.phase is Phase.IDLE
    # the closure form skips the whole step: no second pass, no base step
    loss_of(model, data[2]).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    calls = []
    with counting(opt, monkeypatch) as mode, pytest.warns(RuntimeWarning, match="non-finite gradient norm"):
        assert opt.step(lambda: calls.append(1)) is None
        reads = list(mode.reads)
    assert reads == [] and calls == []
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert opt.step_count == 1 and opt.phase is Phase.IDLE
    two_call_step(opt, model, data[3])  # and training goes on
    assert opt.step_count == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_closure_step_computes_the_first_norm_once(backend, monkeypatch):
    """step(closure) with the caller's first gradient reads whether it is zero from its norm; first_step
    then perturbs with that norm instead of computing it again, and the step equals the two-call form."""
    model, data = model_and_data()
    twin = copy.deepcopy(model)
    opt, twin_opt = make_opt(model, backend), make_opt(twin, backend)
    for batch in data[:3]:
        two_call_step(twin_opt, twin, batch)
    norms = []
    backend_cls = type(opt._mask.backend_for(opt._current_layout()))
    real = backend_cls.grad_norm
    monkeypatch.setattr(backend_cls, "grad_norm", lambda self, *a: norms.append(1) or real(self, *a))
    for batch in data[:3]:
        closure_step(opt, model, batch)
    assert len(norms) == 3, f"{len(norms)} gradient norms for 3 closure steps"
    assert opt._norm_ahead is None
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_steps_under_cuda_sync_debug_mode(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model, data = model_and_data("cuda")
    opt = make_opt(model, backend, "cuda")
    two_call_step(opt, model, data[0])  # the mask update (may synchronise) and first-use setup
    two_call_step(opt, model, data[1])
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        two_call_step(opt, model, data[2])
        closure_step(opt, model, data[3])
        loss_of(model, data[4]).backward()
        model[2].bias.grad[0] = float("inf")
        opt.first_step(zero_grad=True)
        loss_of(model, data[4]).backward()
        with pytest.warns(RuntimeWarning, match="non-finite gradient norm"):
            opt.second_step(zero_grad=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert opt.step_count == 3
