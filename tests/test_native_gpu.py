"""The native CUDA kernels at real sizes against the reference on the same GPU (skipped without one).

Masks and restored weights bit for bit; Fisher accumulation exact; perturbed weights equal too (the
kernels use the reference's roundings: scale = fl32(1 / (norm + eps)) * fl32(rho), then fp32 multiplies
and one add, none fused); the gradient norm within fp32 rounding.
"""
import copy

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout
from conftest import check_sharded_select, first_mismatch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def native():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from fsam_kernels.backends.native_backend import NativeBackend

    b = NativeBackend()
    reason = b.unsupported_reason(torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    return b


def model_like_sizes(total=24_000_000, seed=0):
    """~100 tensors shaped like a transformer's (big matrices, odd biases and norms), summing to ~total."""
    g = torch.Generator().manual_seed(seed)
    sizes = []
    while sum(sizes) < total:
        d = int(torch.randint(300, 1100, (1,), generator=g))
        sizes += [d * 4 * d // 3, d, d * 3 + 1, 7, 1]
    return sizes


def tensors(sizes, dtype, seed, quantize=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for s in sizes:
        t = torch.randn(s, device="cuda", generator=g)
        if quantize:
            t = torch.round(t * 8) / 8
        out.append(t.to(dtype))
    return out


def layout_of(ts, masked=None, adaptive=False):
    n = len(ts)
    return ParamLayout(ts, masked or [True] * n, [0.05] * n, [adaptive] * n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quantize", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("keep", [0.001, 0.1, 0.5])
def test_select_mask_bit_identical(native, dtype, quantize, keep):
    scores = tensors(model_like_sizes(), dtype, seed=1, quantize=quantize)
    lay = layout_of(scores)
    k = lay.k_for(1 - keep)
    got = native.select_mask(lay, scores, k, True)
    want = ref.select_mask_reference(lay, scores, k, True)
    assert torch.equal(got, want), first_mismatch(got, want)


def test_select_mask_edge_cases(native):
    ts = [torch.zeros(s, device="cuda") for s in (1, 7, 123, 4097, 70_001)]
    lay = layout_of(ts)
    for k in (0, 1, 5000, lay.n_masked - 1, lay.n_masked):
        got, want = native.select_mask(lay, ts, k, True), ref.select_mask_reference(lay, ts, k, True)
        assert torch.equal(got, want), f"k={k}: {first_mismatch(got, want)}"
    acc = [t.abs().float() for t in tensors([3, 600, 5000], torch.float32, seed=2, quantize=True)]
    lay = layout_of(acc)
    for k in (1, 17, 3000, lay.n_masked):
        got, want = native.select_mask(lay, acc, k, False), ref.select_mask_reference(lay, acc, k, False)
        assert torch.equal(got, want), f"k={k}: {first_mismatch(got, want)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_accumulate_exact(native, dtype):
    grads = tensors(model_like_sizes(4_000_000), dtype, seed=3)
    a1 = [torch.rand(g.shape, device="cuda") for g in grads]
    a2 = [a.clone() for a in a1]
    native.fisher_accumulate(a1, grads)
    ref.fisher_accumulate_reference(a2, grads)
    for a, b in zip(a1, a2):
        assert torch.equal(a, b), first_mismatch(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_norm_perturb_restore(native, dtype, adaptive):
    sizes = model_like_sizes(8_000_000)
    params = tensors(sizes, dtype, seed=4)
    grads = tensors(sizes, dtype, seed=5)
    masked = [i % 7 != 3 for i in range(len(sizes))]  # some dense tensors in between
    lay = layout_of(params, masked, adaptive)
    originals = [p.clone() for p in params]
    bits = native.select_mask(lay, [grads[i] for i in lay.masked_index], lay.k_for(0.9), True)
    norm = native.grad_norm(lay, grads)
    want_norm = ref.grad_norm_reference(lay, grads)
    torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
    ref.perturb_reference(lay, grads, bits, want_norm, 1e-12)
    want = [p.clone() for p in params]
    for p, o in zip(params, originals):
        p.copy_(o)
    aux = native.mask_aux(lay, bits)
    saved = native.perturb(lay, grads, bits, aux, want_norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, want)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    native.restore(lay, bits, aux, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}]: {first_mismatch(p, o)}"


def test_nonfinite_norm_touches_nothing(native):
    params = tensors([5000, 600], torch.float32, seed=6)
    grads = tensors([5000, 600], torch.float32, seed=7)
    lay = layout_of(params, [True, False])
    originals = [p.clone() for p in params]
    bits = native.select_mask(lay, [grads[0]], 100, True)
    aux = native.mask_aux(lay, bits)
    saved = native.perturb(lay, grads, bits, aux, torch.tensor(float("nan"), device="cuda"), 1e-12)
    native.restore(lay, bits, aux, saved)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


def test_opcheck_cuda(native):
    g = torch.Generator(device="cuda").manual_seed(8)
    w = [torch.randn(s, device="cuda", generator=g) for s in (7, 600, 5)]
    gr = [torch.randn(s, device="cuda", generator=g) for s in (7, 600, 5)]
    lay = layout_of(w[:2])
    bits = native.select_mask(lay, gr[:2], 300, True)
    aux = native.mask_aux(lay, bits)
    counts = aux["counts"] + [5]
    saved = [torch.empty(c, device="cuda") for c in counts]
    norm = torch.tensor(2.5, device="cuda")
    op = torch.ops.fsam_kernels
    cases = [
        (op.fisher_accumulate, ([torch.rand(7, device="cuda"), torch.rand(600, device="cuda")], [gr[0], gr[1].half()])),
        (op.select_mask, ([gr[0], gr[1].bfloat16()], [0, 512], 192, 100, True)),
        (op.mask_block_prefix, (bits,)),
        (op.grad_norm, (w, gr, [False, True, False])),
        (op.masked_perturb, (w, gr, saved, bits, aux["block_prefix"], [0, 512, -1], counts, [0.1, 0.2, 0.3],
                             [False, True, False], norm, 1e-12)),
        (op.masked_restore, (w, saved, bits, aux["block_prefix"], [0, 512, -1], counts, norm)),
        (op.key_histogram, ([gr[0], gr[1].half()], True, 0x3F, 16, 8)),
        (op.mask_from_threshold, ([gr[0], gr[1]], [0, 512], 192, False, 0x3E000000, [0, 3])),
    ]
    for fn, args in cases:
        torch.library.opcheck(fn, args)


@pytest.mark.parametrize("quantize", [False, True], ids=["continuous", "quantized"])
def test_sharded_select_primitives_match_the_reference(native, quantize):
    # FSDP2's top-k: per-pass key histograms and the mask from a threshold with per-tensor tie quotas.
    sizes = model_like_sizes(8_000_000, seed=5)
    scores = tensors(sizes, torch.float32, seed=6, quantize=quantize)
    lay = layout_of([torch.empty(s, device="cuda") for s in sizes])
    check_sharded_select(native, lay, scores, lay.k_for(0.9))


def test_perturb_scale_rounds_like_the_reference_on_cuda(native):
    g = torch.Generator().manual_seed(22)
    sizes = [1000, 4097, 513, 77]  # masked SAM, masked ASAM, dense SAM, dense ASAM
    params0 = [torch.randn(s, generator=g).cuda() for s in sizes]
    grads = [torch.randn(s, generator=g).cuda() for s in sizes]
    rhos = (torch.rand(800, generator=g, dtype=torch.float64) * 16 - 12).exp2().tolist()
    norms = (torch.rand(200, generator=g, dtype=torch.float64) * 34 - 20).exp2().tolist()
    epss = [1e-12, 1e-8, 0.0] + (torch.rand(200, generator=g, dtype=torch.float64) * 28 - 30).exp2().tolist()
    for t in range(200):
        rho, eps = rhos[4 * t : 4 * t + 4], epss[t]
        norm = torch.tensor(norms[t], dtype=torch.float32, device="cuda")
        params = [p.clone() for p in params0]
        lay = ParamLayout(params, [True, True, False, False], rho, [False, True, False, True])
        bits = native.select_mask(lay, grads[:2], 2000, True)
        ref.perturb_reference(lay, grads, bits, norm, eps)
        want = [p.clone() for p in params]
        for p, p0 in zip(params, params0):
            p.copy_(p0)
        native.perturb(lay, grads, bits, native.mask_aux(lay, bits), norm, eps)
        for i, (p, w) in enumerate(zip(params, want)):
            assert torch.equal(p, w), f"rho={rho[i]!r} norm={norms[t]!r} eps={eps!r} params[{i}]: {first_mismatch(p, w)}"


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


def test_optimizer_native_matches_torch_on_cuda(native):
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.LayerNorm(1024),
                             torch.nn.Linear(1024, 10)).cuda()
    m2 = copy.deepcopy(m1)
    o1 = FSAM(m1.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, lr=1e-3, backend="native")
    o2 = FSAM(m2.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, lr=1e-3, backend="torch")
    g = torch.Generator(device="cuda").manual_seed(1)
    for step in range(4):
        x = torch.randn(64, 512, device="cuda", generator=g)
        y = torch.randint(0, 10, (64,), device="cuda", generator=g)
        for m, o in ((m1, o1), (m2, o2)):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
        if step == 0:
            for a, b in zip(o1.masks(), o2.masks()):
                assert torch.equal(a, b)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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
