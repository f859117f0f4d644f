"""FSAM with a torch.compile-d model: two forward passes per step at w and at w + e (CPU).

Each compile runs in a child process: a compile may change process-wide state (after an inductor
compile torch 2.4 flushes denormals to zero for the whole process), which must not reach other tests.
"""
import subprocess
import sys

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels.utils import frozen_running_stats

from helpers import TESTS_DIR, child_env


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _train(model, steps=3):
    x, y = _data()
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, mask_update_interval=1, lr=0.1, backend="torch")
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        with frozen_running_stats(model):
            loss2 = torch.nn.functional.cross_entropy(model(x), y)
        loss2.backward()
        opt.second_step(zero_grad=True)
        losses.append((float(loss.detach()), float(loss2.detach())))
    return losses, opt


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend, inline_modules", [
    ("aot_eager", None),
    ("inductor", None),
    # built-in modules not inlined (torch < 2.5's default): graphs ignore track_running_stats
    ("aot_eager", False),
], ids=["aot_eager", "inductor", "aot_eager-modules-not-inlined"])
def test_compiled_model_matches_eager(backend, inline_modules):
    code = f"import test_compile; test_compile.compare_compiled_with_eager({backend!r}, {inline_modules!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=TESTS_DIR, env=child_env(), capture_output=True, text=True,
                          timeout=290)
    assert proc.returncode == 0, proc.stderr[-4000:]


def compare_compiled_with_eager(backend, inline_modules=None):
    """The test's body, run in a child process."""
    if inline_modules is not None:
        torch._dynamo.config.inline_inbuilt_nn_modules = inline_modules
    torch._dynamo.reset()
    eager = _model()
    compiled_module = _model()
    compiled = torch.compile(compiled_module, backend=backend)
    eager_losses, eager_opt = _train(eager)
    compiled_losses, compiled_opt = _train(compiled)
    # The second loss must see the perturbation: a compiled graph that captured stale weights would
    # give the first loss again.
    for (l1, l2), (c1, c2) in zip(eager_losses, compiled_losses):
        assert l1 != l2
        assert c1 == pytest.approx(l1, rel=1e-5) and c2 == pytest.approx(l2, rel=1e-5)
    for i, (a, b) in enumerate(zip(eager.parameters(), compiled_module.parameters())):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"parameter {i}: max abs diff {(a - b).abs().max().item():.3e}"
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(eager[1], name), getattr(compiled_module[1], name)
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), f"BatchNorm {name} differs"
    assert int(compiled_module[1].num_batches_tracked) == 3  # the second passes did not count
    assert compiled_opt.step_count == eager_opt.step_count == 3
