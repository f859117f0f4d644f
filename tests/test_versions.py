"""What the supported-versions table (docs/install.md) promises, checked on the torch/Triton at hand:
the floor environment of .ci/run runs this file on the oldest supported torch."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from fsam_kernels import FSAM

from helpers import TinyNet, make_batches


def _one_step():
    model = TinyNet()
    opt = FSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, lr=0.1)
    tokens, labels = make_batches(1)[0]
    for second in (False, True):
        torch.nn.functional.cross_entropy(model(tokens), labels).backward()
        (opt.second_step if second else opt.first_step)(zero_grad=True)
    return opt


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_dtensor_module_without_dtensor_is_not_fsdp(monkeypatch):
    # torch 2.4's torch.distributed.tensor is a package without DTensor (that lives in
    # torch.distributed._tensor): a process that imported it holds ordinary parameters all the same.
    import torch._dynamo  # noqa: F401  (torch.optim imports it; it needs the real module on this torch)
    import torch.distributed.tensor as real

    like_24 = types.ModuleType(real.__name__)
    like_24.__dict__.update({k: v for k, v in vars(real).items() if k != "DTensor"})
    monkeypatch.setitem(sys.modules, real.__name__, like_24)
    monkeypatch.delitem(sys.modules, "torch.distributed._tensor", raising=False)
    assert _one_step().step_count == 1


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_plain_step_after_importing_torch_distributed_tensor():
    # A DDP or checkpointing user imports these without any FSDP; on torch 2.4 FSAM then met
    # "module 'torch.distributed.tensor' has no attribute 'DTensor'".
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    assert _one_step().step_count == 1


# ------------------------------------------------------------------ the Triton floor
def _fake_triton(version, histogram_mask):
    if histogram_mask:
        def histogram(input, num_bins, mask=None, _semantic=None, _generator=None): ...
    else:
        def histogram(input, num_bins, _builder=None, _generator=None): ...
    return types.SimpleNamespace(__version__=version, language=types.SimpleNamespace(histogram=histogram))


@pytest.mark.parametrize("version, mask, missing", [
    ("3.0.0", False, "version >= 3.4 and tl.histogram(..., mask=)"),  # torch 2.4's Triton
    ("3.3.1", False, "version >= 3.4 and tl.histogram(..., mask=)"),  # torch 2.7's
    ("3.4.0+git0123abcd", False, "tl.histogram(..., mask=)"),  # the feature, not only the number
    ("3.3.1", True, "version >= 3.4"),  # a feature alone is no tested release
])
def test_triton_too_old_names_what_is_missing_and_the_fix(version, mask, missing):
    from fsam_kernels.backends.triton_backend import triton_problem

    reason = triton_problem(_fake_triton(version, mask))
    assert f"Triton {version} is too old" in reason and f"need {missing})" in reason
    assert "torch >= 2.8" in reason and "pip install 'triton>=3.4'" in reason and "backend='native'" in reason


@pytest.mark.parametrize("version", ["3.4.0", "3.5.1", "3.6.0", "4.0.0"])
def test_triton_from_the_floor_on_is_accepted(version):
    from fsam_kernels.backends.triton_backend import triton_problem

    assert triton_problem(_fake_triton(version, True)) is None


def test_installed_triton_is_judged_by_its_release():
    triton = pytest.importorskip("triton")
    from fsam_kernels.backends.triton_backend import TRITON_FLOOR, triton_problem

    release = tuple(int(x) for x in triton.__version__.split(".")[:2])
    assert (triton_problem() is None) == (release >= TRITON_FLOOR), triton_problem()


def test_too_old_triton_is_unavailable_with_the_reason(monkeypatch):
    # In the mode where the kernels would run (interpreted, on CPU tensors), a Triton without the
    # features they use makes the backend unavailable, so backend="auto" never picks it.
    from fsam_kernels import backends as registry
    from fsam_kernels.backends import BackendUnavailable, available_backends, get_backend, triton_backend

    backend = triton_backend.TritonBackend()
    monkeypatch.setattr(triton_backend, "interpreted", lambda: True)
    monkeypatch.setattr(triton_backend, "mode_conflict", lambda: None)
    monkeypatch.setattr(backend, "_triton_installed", True)
    monkeypatch.setattr(triton_backend, "triton_problem", lambda: "Triton 3.3.1 is too old for fsam_kernels' kernels")
    assert backend.unsupported_reason("cpu") == "Triton 3.3.1 is too old for fsam_kernels' kernels"
    assert not backend.supports(torch.device("cpu"))
    monkeypatch.setitem(registry._loaded, "triton", backend)
    assert "triton" not in available_backends("cpu")
    with pytest.raises(BackendUnavailable, match="too old"):
        get_backend("triton", "cpu")


# ------------------------------------------------------------------ opcheck's floor
def test_opcheck_drops_aot_dispatch_only_for_list_mutating_ops_below_torch_25():
    pytest.importorskip("fsam_kernels._C")
    from torch.library import _OPCHECK_DEFAULT_UTILS as default

    from native_op_cases import OPS, opcheck_utils

    old_torch = tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5)
    reduced = {op for op in OPS if opcheck_utils(getattr(torch.ops.fsam_kernels, op).default) != default}
    assert reduced == ({"fisher_accumulate", "masked_perturb", "masked_restore"} if old_torch else set())


# ------------------------------------------------------------------ FSDP2's floor
@pytest.mark.parametrize("version, warns", [("2.7.1", True), ("2.9.1", False), ("2.13.0", False)])
def test_fsdp2_below_its_floor_warns(monkeypatch, version, warns):
    import warnings

    from fsam_kernels import fsdp

    class Shard:  # stand-ins for DTensor's placement, mesh and class: detect() reads only these
        def __init__(self, dim):
            self.dim = dim

        def __eq__(self, other):
            return isinstance(other, Shard) and other.dim == self.dim

    class Mesh:
        ndim = 1

        def get_group(self):
            raise LookupError("no process group in this test")

    class DTensor:
        device_mesh = Mesh()
        placements = (Shard(0),)

    monkeypatch.setattr(fsdp, "_dtensor_module", lambda: types.SimpleNamespace(DTensor=DTensor, Shard=Shard))
    monkeypatch.setattr(torch, "__version__", version)
    with warnings.catch_warnings(record=True) as seen, pytest.raises(LookupError):
        warnings.simplefilter("always")
        fsdp.ShardedParams.detect([DTensor(), DTensor()])
    messages = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert bool(messages) == warns, messages
    if warns:
        assert f"verified from torch 2.9; torch {version} is older" in messages[0]
