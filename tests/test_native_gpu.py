"""The native CUDA backend's own checks on a GPU (skipped without one): the ops' argument checks, fp64
through the reference, opcheck. Its results against the reference (real sizes, the perturbation's
rounding, non-finite norms...) are in test_backend_conformance.py (target ``native-cuda``).
"""
import pytest
import torch

from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout

from backend_targets import Target
from helpers import layout_of
from native_op_cases import OPS, opcheck_cases

pytestmark = [pytest.mark.gpu, pytest.mark.native]


@pytest.fixture(scope="module")
def native():
    # On a GPU machine an extension without CUDA kernels is a failure, not a skip (a build that fell
    # back to CPU-only must not make the GPU check look green).
    return Target("native", "cuda", "real").backend()


def test_overlapping_offsets_and_bad_saved_counts_are_rejected_on_cuda(native):
    w = [torch.randn(s, device="cuda") for s in (600, 5)]
    gr = [torch.randn(s, device="cuda") for s in (600, 5)]
    lay = ParamLayout(w[:1], [True], [0.1], [False])
    bits = native.select_mask(lay, gr[:1], 10, True)
    prefix = torch.ops.fsam_kernels.mask_block_prefix(bits)
    before = [p.clone() for p in w]
    norm = torch.tensor(1.0, device="cuda")
    op = torch.ops.fsam_kernels
    with pytest.raises(ValueError, match=r"select_mask: expected bit_offsets\[1\] >= 1024"):
        op.select_mask(gr, [0, 512], 192, 1, True)
    with pytest.raises(ValueError, match=r"masked_perturb: saved\[0\] must hold the 10 masked elements"):
        op.masked_perturb(w, gr, [torch.empty(9, device="cuda"), torch.empty(5, device="cuda")], bits, prefix, [0, -1],
                          [10, 5], [0.1, 0.1], [False, False], norm, 0.0)
    with pytest.raises(ValueError, match=r"masked_restore: saved\[0\] must hold the 9 masked elements"):
        op.masked_restore(w, [torch.empty(10, device="cuda"), torch.empty(5, device="cuda")], bits, prefix, [0, -1],
                          [9, 5], norm)
    assert all(torch.equal(p, b) for p, b in zip(w, before))


def test_float64_goes_through_the_reference(native):
    w = torch.randn(1000, device="cuda", dtype=torch.float64)
    g = torch.randn(1000, device="cuda", dtype=torch.float64)
    lay = layout_of([w])
    before = w.clone()
    bits = native.select_mask(lay, [g], 100, True)
    assert torch.equal(bits, ref.select_mask_reference(lay, [g], 100, True))
    aux = native.mask_aux(lay, bits)
    norm = native.grad_norm(lay, [g])
    saved = native.perturb(lay, [g], bits, aux, norm, 1e-12)
    assert not torch.equal(w, before)
    native.restore(lay, bits, aux, saved)
    assert torch.equal(w, before)


@pytest.mark.parametrize("op", OPS)
def test_opcheck_cuda(native, op):
    torch.library.opcheck(getattr(torch.ops.fsam_kernels, op), opcheck_cases("cuda")[op])
