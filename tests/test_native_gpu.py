"""The native CUDA backend's own checks on a GPU (skipped without one): the ops' argument checks, fp64
through the reference, opcheck. Its results against the reference (real sizes, the perturbation's
rounding, non-finite norms...) are in test_backend_conformance.py (target ``native-cuda``).
"""
import pytest
import torch

from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout

from backend_targets import Target
from helpers import first_mismatch, layout_of
from native_op_cases import OPS, opcheck_cases, opcheck_utils

pytestmark = [pytest.mark.gpu, pytest.mark.native]


@pytest.fixture(scope="module")
def native():
    # On a GPU machine an extension without CUDA kernels is a failure, not a skip (a build that fell
    # back to CPU-only must not make the GPU check look green).
    return Target("native", "cuda", "real").backend()


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_and_element_paths_on_views_of_a_flat_buffer(native, offset, dtype):
    # Views into one buffer: at offset 0 full ranges take the 128-bit paths (write_mask's lane-byte
    # words, perturb_block_wide), at an odd offset the element-wise ones; both equal the reference.
    sizes = [4096 * 2 + 8, 1000, 3]
    g = torch.Generator().manual_seed(31)
    flat_w = torch.randn(offset + sum(sizes), generator=g).to(dtype).cuda()
    flat_g = torch.randn(offset + sum(sizes), generator=g).to(dtype).cuda()
    params = list(flat_w[offset:].split(sizes))
    grads = list(flat_g[offset:].split(sizes))
    grads[0][100:900] = 0.5  # ties at the threshold across lanes and warps
    assert all((t.data_ptr() % 16 == 0) == (offset == 0) for t in params[:1] + grads[:1])
    lay = ParamLayout(params, [True, False, True], [0.05] * 3, [True, False, False])
    scores = [grads[0], grads[2]]
    for k in (1, 700, 5000):
        bits = native.select_mask(lay, scores, k, True)
        want = ref.select_mask_reference(lay, scores, k, True)
        assert torch.equal(bits.cpu(), want.cpu()), k
    norm = ref.grad_norm_reference(lay, grads)
    twin = [p.clone() for p in params]
    want_saved = ref.perturb_reference(ParamLayout(twin, lay.masked, lay.rho, lay.adaptive), grads, bits, norm, 1e-12)
    originals = [p.clone() for p in params]
    aux = native.mask_aux(lay, bits)
    saved = native.perturb(lay, grads, bits, aux, norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, twin)):
        assert torch.equal(p, w), f"params[{i}]: {first_mismatch(p.cpu(), w.cpu())}"
    got_saved = native.saved_originals(lay, bits, aux, saved)
    assert all(torch.equal(a, b) for a, b in zip(got_saved, want_saved))
    native.restore(lay, bits, aux, saved)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


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
    with pytest.raises(ValueError, match=r"masked_perturb: saved\[0\] must hold the 10 originals of params\[0\]"):
        op.masked_perturb(w, gr, [torch.empty(9, device="cuda"), torch.empty(5, device="cuda")], [0, 1], [0, 0],
                          [10, 5], bits, prefix, [0, -1], [0.1, 0.1], [False, False], norm, 0.0)
    with pytest.raises(ValueError, match=r"masked_restore: expected saved_offsets\[1\] >= 9"):
        op.masked_restore(w, [torch.empty(14, device="cuda")], [0, 0], [0, 8], [9, 5], bits, prefix, [0, -1], norm)
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
    torch.library.opcheck(getattr(torch.ops.fsam_kernels, op), opcheck_cases("cuda")[op],
                          test_utils=opcheck_utils(getattr(torch.ops.fsam_kernels, op).default))


def test_a_plain_step_uploads_no_table(native):
    # The ops' tables (pointers, sizes, dtypes) are the same step after step: uploaded once (pinned
    # memory, one copy) and found in the extension's cache afterwards; the mask-update bounds are on
    # the device once per layout. A repeated norm + perturb + restore (and Fisher accumulation) copies
    # nothing from the host.
    from torch.profiler import ProfilerActivity, profile

    params = [torch.randn(n, device="cuda") for n in (5000, 300, 4097)]
    grads = [torch.randn_like(p) for p in params]
    lay = ParamLayout(params, [True, False, True], [0.05] * 3, [True, False, False])
    bits = native.select_mask(lay, [grads[0], grads[2]], 900, True)
    aux = native.mask_aux(lay, bits)
    accum = [torch.zeros_like(p) for p in params]

    def step():
        native.fisher_accumulate(accum, grads)
        saved = native.perturb(lay, grads, bits, aux, native.grad_norm(lay, grads), 1e-12)
        native.restore(lay, bits, aux, saved)

    step()  # the first step uploads its tables
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("perturb_restore_kernel" in n for n in names), names  # the profile saw the kernels
    uploads = [n for n in names if "Memcpy HtoD" in n]
    assert not uploads, uploads
