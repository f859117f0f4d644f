"""Every compiled backend against the reference, on every target that can run here.

Masks and restored weights bit for bit, Fisher accumulation and perturbed weights exactly (the
kernels round like the reference), the gradient norm within fp32 rounding; each computed on the same
device as the reference, with the reference ops forbidden while the backend runs (no silent
fallback). Targets and sizes: :mod:`backend_targets` (real sizes on a GPU, small ones on the CPU).
"""
import copy

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import distributed_select as ds
from fsam_kernels import reference as ref
from fsam_kernels.reference import select_nm_mask_reference

from backend_targets import (TARGETS, layout_of, mixed_sizes, model_shapes, random_tensors,
                             reference_forbidden)
from conftest import check_sharded_select, first_mismatch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIXED = "mixed"  # fp32, bf16 and fp16 tensors in one layout


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


def _dtypes(dtype, n):
    return [DTYPES[i % 3] for i in range(n)] if dtype == MIXED else [dtype] * n


def assert_same_mask(layout, got, want, what=""):
    assert got.dtype == torch.uint8 and got.shape == want.shape, what
    if not torch.equal(got, want):
        for j, (a, b) in enumerate(zip(ref.unpack_mask(layout, got), ref.unpack_mask(layout, want))):
            assert torch.equal(a, b), f"{what} masked tensor {j}: {first_mismatch(a, b)}"
        raise AssertionError(f"{what} padding bits differ: {first_mismatch(got, want)}")


def _scores(target, shapes, dtype, square, quantize, seed):
    s = random_tensors(shapes, _dtypes(dtype, len(shapes)), target.device, seed, quantize)
    if quantize:
        s[0].view(-1)[: s[0].numel() // 3] = 0  # unused embedding rows: ties at zero
    return s if square else [t.abs() for t in s]  # empirical Fisher: non-negative scores


@pytest.mark.parametrize("dtype", [*DTYPES, MIXED], ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["batch", "empirical"])
@pytest.mark.parametrize("quantize", [False, True], ids=["distinct", "ties"])
def test_select_mask(target, dtype, square, quantize, monkeypatch):
    backend = target.backend()
    shapes = model_shapes(target)
    scores = _scores(target, shapes, dtype, square, quantize, seed=1)
    layout = layout_of([torch.empty(s, device=target.device) for s in shapes])
    k = layout.k_for(0.9)
    with reference_forbidden(monkeypatch):
        got = backend.select_mask(layout, scores, k, square)
    assert_same_mask(layout, got, ref.select_mask_reference(layout, scores, k, square))


@pytest.mark.parametrize("keep", [0.001, 0.5], ids=["keep0.1%", "keep50%"])
def test_select_mask_keep_fractions(target, keep, monkeypatch):
    backend = target.backend()
    sizes = mixed_sizes(target)
    scores = random_tensors(sizes, torch.float32, target.device, seed=2)
    layout = layout_of(scores)
    k = layout.k_for(1 - keep)
    with reference_forbidden(monkeypatch):
        got = backend.select_mask(layout, scores, k, True)
    assert_same_mask(layout, got, ref.select_mask_reference(layout, scores, k, True))


def test_select_mask_k_edges_and_heavy_ties(target):
    backend = target.backend()
    sizes = mixed_sizes(target, seed=3)
    zeros = [torch.zeros(s, device=target.device) for s in sizes]
    few = random_tensors(sizes, torch.bfloat16, target.device, seed=4, quantize=True)
    layout = layout_of(zeros)
    n = layout.n_masked
    for name, scores in (("all equal", zeros), ("few values", few)):
        for k in (0, 1, n // 2, n - 1, n):
            got = backend.select_mask(layout, scores, k, True)
            assert_same_mask(layout, got, ref.select_mask_reference(layout, scores, k, True), f"{name}, k={k}:")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_accumulate(target, dtype, monkeypatch):
    backend = target.backend()
    sizes = mixed_sizes(target, seed=5)
    grads = random_tensors(sizes, dtype, target.device, seed=6)
    acc = [torch.rand(s, device=target.device) for s in sizes]
    want = [a.clone() for a in acc]
    with reference_forbidden(monkeypatch):
        backend.fisher_accumulate(acc, grads)
    ref.fisher_accumulate_reference(want, grads)
    for i, (a, w) in enumerate(zip(acc, want)):
        assert torch.equal(a, w), f"accum[{i}]: {first_mismatch(a, w)}"


@pytest.mark.parametrize("dtype", [*DTYPES, MIXED], ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_norm_perturb_restore(target, dtype, adaptive, monkeypatch):
    # masked tensors with dense (fisher_mask=False) ones among them; the weights' own dtype saved
    backend = target.backend()
    sizes = mixed_sizes(target, seed=7)
    dts = _dtypes(dtype, len(sizes))
    params = random_tensors(sizes, dts, target.device, seed=8)
    grads = random_tensors(sizes, dts, target.device, seed=9)
    masked = [i % 7 != 3 for i in range(len(sizes))]
    layout = layout_of(params, masked, [adaptive] * len(sizes))
    originals = [p.clone() for p in params]
    bits = ref.select_mask_reference(layout, [grads[i] for i in layout.masked_index], layout.k_for(0.9), True)
    with reference_forbidden(monkeypatch):
        aux = backend.mask_aux(layout, bits)
        norm = backend.grad_norm(layout, grads)
    want_norm = ref.grad_norm_reference(layout, grads)
    torch.testing.assert_close(norm, want_norm, rtol=1e-5, atol=0)
    ref.perturb_reference(layout, grads, bits, want_norm, 1e-12)
    want = [p.clone() for p in params]
    for p, o in zip(params, originals):
        p.copy_(o)
    with reference_forbidden(monkeypatch):
        saved = backend.perturb(layout, grads, bits, aux, want_norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, want)):
        assert torch.equal(p, w), f"params[{i}] ({p.dtype}) after perturb: {first_mismatch(p, w)}"
    kept = sum(int(m.sum()) * p.element_size() for m, p in zip(ref.unpack_mask(layout, bits), layout.masked_params))
    dense = sum(p.numel() * p.element_size() for i, p in enumerate(params) if not masked[i])
    assert backend.saved_nbytes(saved) == kept + dense
    with reference_forbidden(monkeypatch):
        backend.restore(layout, bits, aux, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] ({p.dtype}) after restore: {first_mismatch(p, o)}"


def test_model_sized_mask_perturb_restore(target, monkeypatch):
    # RoBERTa-large's 393 tensors (on CUDA) at 10 % kept: the mask, then a perturbation and its restore.
    backend = target.backend()
    shapes = model_shapes(target)
    params = random_tensors(shapes, torch.float32, target.device, seed=10)
    grads = random_tensors(shapes, torch.float32, target.device, seed=11)
    layout = layout_of(params)
    k = layout.k_for(0.9)
    originals = [p.clone() for p in params]
    with reference_forbidden(monkeypatch):
        bits = backend.select_mask(layout, grads, k, True)
        aux = backend.mask_aux(layout, bits)
        norm = backend.grad_norm(layout, grads)
        saved = backend.perturb(layout, grads, bits, aux, norm, 1e-12)
    assert_same_mask(layout, bits, ref.select_mask_reference(layout, grads, k, True))
    twin = layout_of([o.clone() for o in originals], layout.masked, layout.adaptive, layout.rho)
    ref.perturb_reference(twin, grads, bits, norm, 1e-12)
    for i, (p, q) in enumerate(zip(params, twin.params)):
        assert torch.equal(p, q), f"params[{i}] after perturb: {first_mismatch(p, q)}"
    assert backend.saved_nbytes(saved) == k * 4
    with reference_forbidden(monkeypatch):
        backend.restore(layout, bits, aux, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_support", [False, True], ids=["dense", "support"])
def test_nm_mask(target, dtype, with_support, monkeypatch):
    backend = target.backend()
    shapes = [s for s in model_shapes(target) if len(s) == 2 and s[-1] % 4 == 0][:12]
    layout = layout_of(random_tensors(shapes, dtype, target.device, seed=12))
    scores = random_tensors(shapes, dtype, target.device, seed=13, quantize=True)
    support = [p.masked_fill(p.abs() < 0.3, 0) for p in layout.params] if with_support else None
    for n, m in ((2, 4), (1, 4)):
        with reference_forbidden(monkeypatch):
            got = backend.select_nm_mask(layout, scores, n, m, True, support)
        assert_same_mask(layout, got, select_nm_mask_reference(layout, scores, n, m, True, support), f"{n}:{m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quantize", [False, True], ids=["distinct", "ties"])
def test_sharded_select_primitives(target, dtype, quantize, monkeypatch):
    # FSDP2's top-k: per-pass key histograms and the mask from a threshold with per-tensor tie quotas.
    backend = target.backend()
    sizes = mixed_sizes(target, seed=14)
    scores = random_tensors(sizes, dtype, target.device, seed=15, quantize=quantize)
    layout = layout_of([torch.empty(s, device=target.device) for s in sizes])
    k = layout.k_for(0.9)
    with reference_forbidden(monkeypatch):
        hist = backend.key_histogram(layout, scores, True, 0, ds.PASS_SHIFTS[0], ds.RADIX_BITS)
    assert torch.equal(hist, ref.key_histogram_reference(layout, scores, True, 0, ds.PASS_SHIFTS[0], ds.RADIX_BITS))
    check_sharded_select(backend, layout, scores, k)


def test_optimizer_matches_the_torch_backend(target):
    # FSAM end to end: the same masks and (within fp32 rounding of the norm) the same weights.
    target.backend()
    torch.manual_seed(0)
    width = {"real": 1024, "small": 128, "tiny": 16}[target.scale]
    m1 = torch.nn.Sequential(torch.nn.Linear(width // 2, width), torch.nn.GELU(), torch.nn.LayerNorm(width),
                             torch.nn.Linear(width, 10)).to(target.device)
    m2 = copy.deepcopy(m1)
    o1 = FSAM(m1.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, lr=1e-3, mask_update_interval=2,
              backend=target.backend_name)
    o2 = FSAM(m2.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.9, lr=1e-3, mask_update_interval=2,
              backend="torch")
    g = torch.Generator(device=target.device).manual_seed(1)
    for step in range(4):
        x = torch.randn(16, width // 2, device=target.device, generator=g)
        y = torch.randint(0, 10, (16,), device=target.device, generator=g)
        for m, o in ((m1, o1), (m2, o2)):
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.second_step(zero_grad=True)
        assert o1.backend == target.backend_name
        if step == 0:  # later masks may differ by a tie the weights' last bits decide
            for a, b in zip(o1.masks(), o2.masks()):
                assert torch.equal(a, b), first_mismatch(a, b)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
