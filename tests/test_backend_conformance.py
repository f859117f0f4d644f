"""Every compiled backend against the reference, on every target that can run here.

Masks and restored weights bit for bit, Fisher accumulation and perturbed weights exactly (the
kernels round like the reference), the gradient norm within fp32 rounding; each computed on the same
device as the reference, with the reference ops forbidden while the backend runs (no silent
fallback). Targets and sizes: :mod:`backend_targets` (real sizes on a GPU, small ones on the CPU,
tiny ones in the Triton interpreter). Adding a backend is adding one target there.

Model-sized cases scale with the target; edge cases (sizes 1, 7, 123, 4097, 1 to 50 tensors, ties,
k = 0 and k = N, dense tensors among masked ones, missing gradients, non-finite norms, rounding
sweeps) run at their own small sizes on every target. What only one backend has (opcheck, its own
argument checks, launch counts, the sampled bracket, CPU chunk boundaries, fp64 routing) is tested
beside it: test_native_ops.py, test_native_gpu.py, test_triton_interpreter.py, test_triton_gpu.py.
"""
import contextlib
import copy

import pytest
import torch

from fsam_kernels import FSAM
from fsam_kernels import distributed_select as ds
from fsam_kernels import reference as ref
from fsam_kernels.reference import select_nm_mask_reference

from backend_targets import TARGETS, mixed_sizes, model_shapes, reference_forbidden, repairs
from helpers import (SKIP_RULE_CASES, TinyNet, assert_same_mask, check_sharded_select, first_mismatch,
                     halfway_case, layout_of, make_batches, random_tensors, skip_rule_case, views_into_one_buffer)
from plain_fsam import plain_topk_masks

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIXED = "mixed"  # fp32, bf16 and fp16 tensors in one layout


@pytest.fixture(params=TARGETS)
def target(request):
    return request.param


# ------------------------------------------------------------------------------ the mask, model-sized


def _dtypes(dtype, n):
    return [DTYPES[i % 3] for i in range(n)] if dtype == MIXED else [dtype] * n


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


# ------------------------------------------------------------------------------ the mask, edge cases
SMALL_LAYOUTS = [[1], [7], [123], [4097], [3, 50, 1, 20], [5] * 40, list(range(1, 51))]


def _check_select_for_each_k(backend, layout, scores, ks, square, monkeypatch):
    """The backend's mask for each k, bit for bit the reference's, with k bits set, and nothing repaired."""
    before = repairs(backend)
    for k in ks:
        want = ref.select_mask_reference(layout, scores, k, square)
        with reference_forbidden(monkeypatch):
            got = backend.select_mask(layout, scores, k, square)
        assert_same_mask(layout, got, want, f"k={k}:")
        assert ref.mask_popcount(got) == k
    assert repairs(backend) == before


def _ks(layout, tiny):
    """k = 0, 1, 1.3 %, 10 %, 50 %, N - 1 and N (in the interpreter 1, 10 % and N)."""
    n = layout.n_masked
    if tiny:
        return sorted({1, layout.k_for(0.9), n})
    return sorted({layout.k_for(1 - keep) for keep in (0.0, 0.013, 0.1, 0.5, 1.0)} | {1, max(n - 1, 0)})


@pytest.mark.parametrize("sizes", SMALL_LAYOUTS, ids=lambda s: f"{len(s)}x{s[0]}..{s[-1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["batch", "accum"])
def test_select_mask_small_layouts(target, sizes, dtype, square, monkeypatch):
    # scores with ties (multiples of 1/4)
    tiny = target.scale == "tiny"
    if tiny and len(sizes) > 4 and (dtype != torch.float32 or not square or len(sizes) == 40):
        pytest.skip("the interpreter runs one many-tensor layout, fp32 batch keys (k = 0 and N: the dense-tensor cases)")
    backend = target.backend()
    scores = random_tensors(sizes, dtype, target.device, seed=sum(sizes), quantize=True)
    if not square:
        scores = [s.float().abs() for s in scores]  # an fp32 accumulator is non-negative
    layout = layout_of(scores)
    _check_select_for_each_k(backend, layout, scores, _ks(layout, tiny), square, monkeypatch)


@pytest.mark.parametrize("case", ["grad-fp32", "grad-fp16", "grad-bf16", "fisher-ties", "all-zero"])
def test_select_mask_with_a_dense_tensor_between(target, case, monkeypatch):
    # the layout's fourth tensor is dense (fisher_mask=False): masked tensors' scores skip it
    backend = target.backend()
    params = random_tensors([1, 7, 123, 4097, 600], torch.float32, target.device, seed=0)
    layout = layout_of(params, masked=[True, True, False, True, True])
    shapes = [layout.numel[i] for i in layout.masked_index]
    if case.startswith("grad"):
        dtype = {"grad-fp32": torch.float32, "grad-fp16": torch.float16, "grad-bf16": torch.bfloat16}[case]
        scores, square = random_tensors(shapes, dtype, target.device, seed=1), True
    elif case == "fisher-ties":  # few distinct values (and many zeros)
        g = torch.Generator().manual_seed(0)
        scores, square = [torch.randint(0, 3, (n,), generator=g).float().to(target.device) for n in shapes], False
    else:
        scores, square = [torch.zeros(n, device=target.device) for n in shapes], False
    n = layout.n_masked
    _check_select_for_each_k(backend, layout, scores, (0, 1, 2, n // 3, n - 1, n), square, monkeypatch)


def test_select_mask_matches_a_sort_oracle(target):
    backend = target.backend()
    scores = random_tensors([33, 1, 600, 7], torch.float32, target.device, seed=3, quantize=True)
    layout = layout_of(scores)
    for k in (0, 1, 2, 17, 100, layout.n_masked - 1, layout.n_masked):
        got = ref.unpack_mask(layout, backend.select_mask(layout, scores, k, True))
        want = plain_topk_masks([s.cpu() * s.cpu() for s in scores], k)
        for a, b in zip(got, want):
            assert torch.equal(a.cpu(), b), f"k={k}: {first_mismatch(a.cpu().to(torch.uint8), b.to(torch.uint8))}"


def test_tie_rule_is_lowest_global_index_first(target):
    backend = target.backend()
    a = torch.tensor([1.0, 2.0, 2.0, 0.0], device=target.device)
    b = torch.tensor([2.0, 3.0, 2.0], device=target.device)
    layout = layout_of([a, b])
    masks = ref.unpack_mask(layout, backend.select_mask(layout, [a, b], 3, scores_are_grads=False))
    assert masks[0].tolist() == [False, True, True, False]
    assert masks[1].tolist() == [False, True, False]


def test_all_zero_scores_take_the_first_k(target):
    backend = target.backend()
    ts = [torch.zeros(n, device=target.device) for n in (10, 600, 6)]
    layout = layout_of(ts)
    for k in (1, 12, 609, 616):
        got = backend.select_mask(layout, ts, k, scores_are_grads=True)
        assert_same_mask(layout, got, ref.select_mask_reference(layout, ts, k, scores_are_grads=True), f"k={k}:")


def test_special_values_order_like_the_reference(target):
    # -0.0 has the smallest int32 key; denormals, inf and the largest finite value keep their order.
    backend = target.backend()
    s = torch.tensor([0.0, -0.0, 1e-45, 1e-40, float("inf"), 3.4e38, 1.0, -0.0, 0.0, 2.0], device=target.device)
    layout = layout_of([s])
    for k in range(s.numel() + 1):
        got = backend.select_mask(layout, [s], k, False)
        assert_same_mask(layout, got, ref.select_mask_reference(layout, [s], k, False), f"k={k}:")


def test_batch_key_is_g_squared_in_fp32(target):
    backend = target.backend()
    g = torch.tensor([1e-30, 2e-30, 3.0], device=target.device)  # both tiny squares are 0 in fp32: a tie
    layout = layout_of([g])
    assert ref.unpack_mask(layout, backend.select_mask(layout, [g], 2, True))[0].tolist() == [True, False, True]


def test_select_is_global_not_per_tensor(target):
    backend = target.backend()
    small, big = torch.full((10,), 1.0, device=target.device), torch.full((10,), 5.0, device=target.device)
    layout = layout_of([small, big])
    masks = ref.unpack_mask(layout, backend.select_mask(layout, [small, big], 10, False))
    assert not masks[0].any() and masks[1].all()


def test_layout_offsets_are_accepted(target):
    # what ParamLayout produces: tensors back to back, each from the next 512-bit boundary
    backend = target.backend()
    ts = random_tensors([512, 1, 513, 7], torch.float32, target.device, seed=5)
    layout = layout_of(ts)
    assert layout.bit_offset == [0, 512, 1024, 2048]
    assert_same_mask(layout, backend.select_mask(layout, ts, 100, True), ref.select_mask_reference(layout, ts, 100, True))


# ------------------------------------------------------------------------------ Fisher accumulation


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_accumulate_small_sizes_repeatedly(target, dtype, monkeypatch):
    # three rounds into the same accumulators: the backend's cached tables are reused
    backend = target.backend()
    sizes = [1, 7, 123, 4097] + list(range(1, 40, 3))
    grads = random_tensors(sizes, dtype, target.device, seed=2)
    g = torch.Generator().manual_seed(0)
    acc = [torch.rand(n, generator=g).to(target.device) for n in sizes]
    want = [a.clone() for a in acc]
    for _ in range(3):
        with reference_forbidden(monkeypatch):
            backend.fisher_accumulate(acc, grads)
        ref.fisher_accumulate_reference(want, grads)
    for i, (a, w) in enumerate(zip(acc, want)):
        assert torch.equal(a, w), f"accum[{i}]: {first_mismatch(a, w)}"


def _views_into_one_buffer(sizes, dtype, offset, device, seed):
    out = views_into_one_buffer(sizes, dtype, offset, seed, device)
    assert all(t.data_ptr() % 16 == 0 for t in out) == (offset == 0)
    return out


FLAT_SIZES = [4096 * 2 + 8, 4096, 3]  # a partial last 4096-chunk; aligned from offset 0 in fp32 and bf16


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_fisher_accumulate_on_views_of_a_flat_buffer(target, offset, monkeypatch):
    # vectorized loads assume 16-byte aligned tensors; views at odd offsets must take another path
    backend = target.backend()
    grads = _views_into_one_buffer(FLAT_SIZES, torch.float32, offset, target.device, seed=1)
    acc = _views_into_one_buffer(FLAT_SIZES, torch.float32, offset, target.device, seed=2)
    want = [a.clone() for a in acc]
    ref.fisher_accumulate_reference(want, grads)
    with reference_forbidden(monkeypatch):
        backend.fisher_accumulate(acc, grads)
    for i, (a, w) in enumerate(zip(acc, want)):
        assert torch.equal(a, w), f"accum[{i}]: {first_mismatch(a, w)}"


# ------------------------------------------------------------------------------ norm, perturb, restore


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


# ------------------------------------------------------------------------------ perturb, edge cases
def _perturb_both(backend, layout, grads, bits, norm, monkeypatch, eps=1e-12):
    """The backend's perturbation of ``layout`` (the reference forbidden) and the reference's of a copy,
    with the same norm: (the copy, the original weights, the backend's aux and saved state, the
    reference's saved originals). Without ``monkeypatch`` the backend may use the reference (fp64)."""
    twin = layout_of([p.clone() for p in layout.params], layout.masked, layout.adaptive, layout.rho)
    originals = [p.clone() for p in layout.params]
    saved_ref = ref.perturb_reference(twin, grads, bits, norm, eps)
    with reference_forbidden(monkeypatch) if monkeypatch is not None else contextlib.nullcontext():
        aux = backend.mask_aux(layout, bits) if bits is not None else None
        saved = backend.perturb(layout, grads, bits, aux, norm, eps)
    return twin, originals, aux, saved, saved_ref


def _assert_same_params(got, want, what):
    for i, (p, w) in enumerate(zip(got, want)):
        assert torch.equal(p, w), f"params[{i}] ({p.dtype}) {what}: {first_mismatch(p, w)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True, MIXED], ids=["sam", "asam", "mixed"])
def test_grad_norm_small_sizes(target, dtype, adaptive, monkeypatch):
    backend = target.backend()
    shapes = [1, 7, 123, 4097, (9, 11)]
    params = random_tensors(shapes, dtype, target.device, seed=0)
    grads = random_tensors(shapes, dtype, target.device, seed=1)
    layout = layout_of(params, adaptive=[i % 2 == 1 for i in range(5)] if adaptive == MIXED else adaptive)
    with reference_forbidden(monkeypatch):
        got = backend.grad_norm(layout, grads)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, ref.grad_norm_reference(layout, grads), rtol=2e-6, atol=0)


def test_grad_norm_skips_missing_grads(target, monkeypatch):
    backend = target.backend()
    params = random_tensors([5, 6, 7], torch.float32, target.device, seed=0)
    grads = random_tensors([5, 6, 7], torch.float32, target.device, seed=1)
    grads[1] = None
    layout = layout_of(params)
    with reference_forbidden(monkeypatch):
        got, none = backend.grad_norm(layout, grads), backend.grad_norm(layout, [None] * 3)
    torch.testing.assert_close(got, ref.grad_norm_reference(layout, grads), rtol=2e-6, atol=0)
    assert none.item() == 0.0


def _perturb_layout(target, dtype, adaptive, n_tensors=None):
    """Sizes 1 to 4097 (and, beyond the interpreter, 70,001: three CPU chunks, the last partial), two
    dense tensors and a tensor without a gradient among them; or ``n_tensors`` tensors of 1, 2, ...
    elements, every seventh dense."""
    if n_tensors is not None:
        sizes = list(range(1, n_tensors + 1))
        masked = [i % 7 != 3 for i in sizes]
        with_grad = [True] * n_tensors
    else:
        sizes = [1, 7, 123, 4097, (3, 50), 20, 600 if target.scale == "tiny" else 70001]
        masked = [True, True, False, True, True, False, True]
        with_grad = [True, True, True, True, False, True, True]
    n = len(sizes)
    params = random_tensors(sizes, dtype, target.device, seed=0)
    grads = [g if keep else None for g, keep in zip(random_tensors(sizes, dtype, target.device, seed=1), with_grad)]
    adaptive = [i % 5 == 0 for i in range(n)] if adaptive == MIXED else adaptive
    return layout_of(params, masked, adaptive, rho=[0.05 * (i % 4 + 1) for i in range(n)]), grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True, MIXED], ids=["sam", "asam", "mixed"])
@pytest.mark.parametrize("keep", [0.0, 0.1, 1.0])
def test_perturb_and_restore_small_layouts(target, dtype, adaptive, keep, monkeypatch):
    backend = target.backend()
    layout, grads = _perturb_layout(target, dtype, adaptive)
    _check_perturb_and_restore(backend, layout, grads, keep, monkeypatch)


def test_perturb_and_restore_50_tensors(target, monkeypatch):
    backend = target.backend()
    layout, grads = _perturb_layout(target, torch.float32, MIXED, n_tensors=50)
    _check_perturb_and_restore(backend, layout, grads, 0.1, monkeypatch)


def _check_perturb_and_restore(backend, layout, grads, keep, monkeypatch):
    """The backend's norm within rounding of the reference's; with it the reference's perturbed
    weights bit for bit, the saved state as compact as the reference's (the kept elements and the dense
    tensors, of tensors with a gradient), then the originals back bit for bit."""
    scores = [grads[i] if grads[i] is not None else torch.zeros_like(layout.params[i]) for i in layout.masked_index]
    bits = ref.select_mask_reference(layout, scores, layout.k_for(1 - keep), True)
    with reference_forbidden(monkeypatch):
        norm = backend.grad_norm(layout, grads)
    torch.testing.assert_close(norm, ref.grad_norm_reference(layout, grads), rtol=1e-5, atol=0)
    twin, originals, aux, saved, saved_ref = _perturb_both(backend, layout, grads, bits, norm, monkeypatch)
    _assert_same_params(layout.params, twin.params, "after perturb")
    compact = sum(s.numel() * s.element_size() for s in saved_ref if s is not None)
    if backend.name == "triton":
        # Triton sizes its saved buffer by the mask's counts: kept elements of a tensor without a
        # gradient get slots it never fills (a memory-only difference from the reference)
        compact += sum(int(m.sum()) * layout.params[i].element_size()
                       for m, i in zip(ref.unpack_mask(layout, bits), layout.masked_index) if grads[i] is None)
    assert backend.saved_nbytes(saved) == compact
    with reference_forbidden(monkeypatch):
        backend.restore(layout, bits, aux, saved)
    _assert_same_params(layout.params, originals, "after restore")


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_perturb_and_restore_on_views_of_a_flat_buffer(target, offset, dtype, monkeypatch):
    backend = target.backend()
    params = _views_into_one_buffer(FLAT_SIZES, dtype, offset, target.device, seed=3)
    grads = _views_into_one_buffer(FLAT_SIZES, dtype, offset, target.device, seed=4)
    layout = layout_of(params, [True, False, True], [False, True, False], rho=0.05)
    bits = ref.select_mask_reference(layout, [grads[0], grads[2]], 2000, True)
    norm = ref.grad_norm_reference(layout, grads)
    twin, originals, aux, saved, _ = _perturb_both(backend, layout, grads, bits, norm, monkeypatch)
    _assert_same_params(params, twin.params, "after perturb")
    with reference_forbidden(monkeypatch):
        backend.restore(layout, bits, aux, saved)
    _assert_same_params(params, originals, "after restore")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_perturbation_halfway_between_two_values_rounds_to_nearest_even(target, dtype):
    backend = target.backend()
    layout, grads, norm, want = halfway_case(dtype, target.device)
    backend.perturb(layout, grads, None, None, norm, 1e-12)
    assert torch.equal(layout.params[0], want), first_mismatch(layout.params[0], want)


def test_perturb_scale_rounds_like_the_reference(target):
    """scale = fl32(1 / (norm + eps)) * fl32(rho): many random (rho, norm, eps), SAM and ASAM, masked and
    dense, bit for bit. fl32(rho / denom) rounds once and differs in the last bit for some of them."""
    backend = target.backend()
    trials, sizes = {"real": (200, [1000, 4097, 513, 77]), "small": (300, [37, 600, 29, 41]),
                     "tiny": (12, [37, 60, 29, 41])}[target.scale]  # masked SAM, masked ASAM, dense SAM, dense ASAM
    g = torch.Generator().manual_seed(21)
    params0 = [torch.randn(s, generator=g).to(target.device) for s in sizes]
    grads = [torch.randn(s, generator=g).to(target.device) for s in sizes]

    def log_uniform(lo, hi, n):
        return (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).exp2().tolist()

    rhos, norms = log_uniform(-12, 4, 4 * trials), log_uniform(-20, 14, trials)
    epss = [1e-12, 1e-8, 0.0] + log_uniform(-30, -2, trials)
    old_rule_differs = 0
    for t in range(trials):
        rho, eps = rhos[4 * t : 4 * t + 4], epss[t]
        norm = torch.tensor(norms[t], dtype=torch.float32, device=target.device)
        params = [p.clone() for p in params0]
        layout = layout_of(params, [True, True, False, False], [False, True, False, True], rho)
        bits = ref.select_mask_reference(layout, grads[:2], (sizes[0] + sizes[1]) // 2, True)
        ref.perturb_reference(layout, grads, bits, norm, eps)
        want = [p.clone() for p in params]
        for p, p0 in zip(params, params0):
            p.copy_(p0)
        backend.perturb(layout, grads, bits, backend.mask_aux(layout, bits), norm, eps)
        for i, (p, w) in enumerate(zip(params, want)):
            assert torch.equal(p, w), f"rho={rho[i]!r} norm={norms[t]!r} eps={eps!r} params[{i}]: {first_mismatch(p, w)}"
        denom = norm.cpu() + eps
        r32 = torch.tensor(rho, dtype=torch.float32)
        old_rule_differs += int((r32 / denom != denom.reciprocal() * r32).sum())
    assert old_rule_differs > 0  # the triples do tell the two roundings apart


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy: inf - inf
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_norm_leaves_weights_untouched(target, bad):
    backend = target.backend()
    params = random_tensors([123, 4097, 7], torch.float32, target.device, seed=0)
    grads = random_tensors([123, 4097, 7], torch.float32, target.device, seed=1)
    layout = layout_of(params, [True, False, True])
    bits = backend.select_mask(layout, [grads[0], grads[2]], 20, True)
    originals = [p.clone() for p in params]
    aux = backend.mask_aux(layout, bits)
    saved = backend.perturb(layout, grads, bits, aux, torch.tensor(bad, device=target.device), 1e-12)
    _assert_same_params(params, originals, "after perturb")
    backend.restore(layout, bits, aux, saved)  # must not write the (never filled) saved buffer back
    _assert_same_params(params, originals, "after restore")


def test_perturb_of_dense_only_layout(target, monkeypatch):
    backend = target.backend()
    params = random_tensors([10, 3], torch.float32, target.device, seed=0)
    grads = random_tensors([10, 3], torch.float32, target.device, seed=1)
    layout = layout_of(params, [False, False], True)
    with reference_forbidden(monkeypatch):
        norm = backend.grad_norm(layout, grads)
    twin, originals, _, saved, _ = _perturb_both(backend, layout, grads, None, norm, monkeypatch)
    _assert_same_params(params, twin.params, "after perturb")
    assert all(not torch.equal(p, o) for p, o in zip(params, originals))
    with reference_forbidden(monkeypatch):
        backend.restore(layout, None, None, saved)
    _assert_same_params(params, originals, "after restore")


def test_set_padding_bits_are_not_read_as_elements(target, monkeypatch):
    # Bits between one tensor's end and the next block belong to no element (a mask loaded from a
    # checkpoint may have them set); kernels that read whole words must ignore them. The counts (aux)
    # come from the clean mask, as the optimizer's own checked mask would give them.
    backend = target.backend()
    sizes = [7, 600 if target.scale == "tiny" else 70001, 100]
    params = random_tensors(sizes, torch.float32, target.device, seed=0)
    grads = random_tensors(sizes, torch.float32, target.device, seed=1)
    layout = layout_of(params)
    g = torch.Generator().manual_seed(5)
    clean = ref.pack_mask(layout, [(torch.rand(s, generator=g) < 0.3).to(target.device) for s in sizes])
    dirty = clean.clone()
    for t, n in enumerate(sizes):
        for b in range(layout.bit_offset[t] + n, min(layout.bit_offset[t] + n + 130, dirty.numel() * 8)):
            dirty[b // 8] |= 1 << (b % 8)
    assert not torch.equal(dirty, clean)
    norm = ref.grad_norm_reference(layout, grads)
    twin, originals, aux, _, _ = _perturb_both(backend, layout, grads, clean, norm, monkeypatch)
    for p, o in zip(params, originals):
        p.copy_(o)
    with reference_forbidden(monkeypatch):
        saved = backend.perturb(layout, grads, dirty, aux, norm, 1e-12)
    _assert_same_params(params, twin.params, "after perturb with padding bits set")
    with reference_forbidden(monkeypatch):
        backend.restore(layout, dirty, aux, saved)
    _assert_same_params(params, originals, "after restore with padding bits set")


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize("case", SKIP_RULE_CASES, ids=[c[0] for c in SKIP_RULE_CASES])
def test_skip_rule_is_the_reference_one(target, case, monkeypatch):
    """The reference's skip rule (tests/test_numeric_policy.py): the same decision, a norm that does
    not overflow for finite gradients, and the reference's perturbation."""
    backend = target.backend()
    _, values, dtype, weight, perturbed = case
    layout, params, grads = skip_rule_case(values, dtype, weight, target.device)
    norm = backend.grad_norm(layout, grads)
    assert norm.dtype == ref.grad_norm_reference(layout, grads).dtype
    assert bool(torch.isfinite(norm)) == perturbed, f"norm {norm.item()!r}"
    if perturbed:
        exact = ref.grad_sumsq_reference(layout, grads).sqrt()
        torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)
    if dtype == torch.float64:  # fp64 goes through the reference on every backend
        monkeypatch = None
    twin, originals, _, saved, _ = _perturb_both(backend, layout, grads, None, norm, monkeypatch)
    _assert_same_params(params, twin.params, "after perturb")
    assert (not torch.equal(params[0], originals[0])) == perturbed
    backend.restore(layout, None, None, saved)
    _assert_same_params(params, originals, "after restore")


# ------------------------------------------------------------------------------ N:M masks


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


def test_nm_mask_small_shapes(target, monkeypatch):
    # a 1-D tensor of 5 among matrices: 2 of every 4 along the last dimension, the reference's rule for the rest
    backend = target.backend()
    scores = random_tensors([(4, 8), (5,), (2, 16)], torch.float32, target.device, seed=12, quantize=True)
    layout = layout_of([torch.zeros(s.shape, device=target.device) for s in scores])
    want = select_nm_mask_reference(layout, scores, 2, 4, True)
    with reference_forbidden(monkeypatch):
        got = backend.select_nm_mask(layout, scores, 2, 4, True)
    assert_same_mask(layout, got, want)


# ------------------------------------------------------------------------------ the sharded (FSDP2) top-k


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


def _sharded_sizes(target, sizes):
    """The CPU sizes of the sharded-select cases; 40,000 and 70,000 (beyond one CPU chunk) shrink in the
    interpreter."""
    if target.scale != "tiny":
        return sizes
    return [{40000: 4097, 70000: 1100}.get(n, n) for n in sizes]


def _levels(sizes, dtype, levels, device, seed):
    """Scores with ties: multiples of 1/4 (levels None), or ``levels`` values 0, 0.5, 1, ..."""
    scores = random_tensors(sizes, dtype, device, seed, quantize=True)
    if levels is not None:
        g = torch.Generator().manual_seed(seed)
        scores = [(torch.randint(0, levels, (n,), generator=g).float() * 0.5).to(dtype).to(device) for n in sizes]
    return scores


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["batch", "accum"])
def test_key_histogram_small_layouts(target, dtype, square):
    # the first pass, prefixes that hold keys (the largest, the middle one, 0) at several shifts and
    # digit widths, prefixes that hold none; a tie block, an empty tensor; fp64 as the reference does it
    backend = target.backend()
    sizes = _sharded_sizes(target, [1, 7, 0, 123, 40000, 4097])
    scores = random_tensors(sizes, dtype, target.device, seed=13, quantize=True)
    if not square:
        scores = [s.abs() for s in scores]
    scores[4][: sizes[4] // 8] = 0  # a tie block
    layout = layout_of([torch.zeros(n, device=target.device) for n in sizes])
    keys = torch.cat([ref.fisher_key(s, square) for s in scores]).to(torch.int64).cpu()
    cases = [(0, 24, 8), (0, 16, 16), (0, 28, 4), (0, 20, 12), (5, 24, 8), (0x7F, 16, 8)]
    for key in (int(keys.max()), int(keys.sort().values[keys.numel() // 2]), 0):
        cases += [(key >> 24, 16, 8), (key >> 16, 8, 8), (key >> 8, 0, 8), (key >> 20, 9, 11), (12345, 0, 8)]
    for prefix, shift, bits in cases:
        want = ref.key_histogram_reference(layout, scores, square, prefix, shift, bits)
        got = backend.key_histogram(layout, scores, square, prefix, shift, bits)
        assert got.dtype == torch.int64 and torch.equal(got, want), (prefix, shift, bits)
    for prefix, shift in ((1 << 8, 16), (1 << 40, 0)):  # prefixes no key can have (keys < 2**31): nothing counted
        want = ref.key_histogram_reference(layout, scores, square, prefix, shift, 8)
        assert int(want.sum()) == 0 and torch.equal(backend.key_histogram(layout, scores, square, prefix, shift, 8), want)


MASK_FROM_THRESHOLD_CASES = [(dt, None) for dt in (*DTYPES, torch.float64)] + [(torch.float32, 3), (torch.float32, 1)]


@pytest.mark.parametrize("dtype,levels", MASK_FROM_THRESHOLD_CASES,
                         ids=[f"{str(d)[6:]}-{'quarters' if lv is None else f'{lv}-levels'}"
                              for d, lv in MASK_FROM_THRESHOLD_CASES])
def test_mask_from_threshold_small_layouts(target, dtype, levels):
    # thresholds at the median, the largest and smallest key and above every key; no ties taken, all,
    # a third, some or at most one per tensor; an empty tensor and a one-element one
    backend = target.backend()
    sizes = _sharded_sizes(target, [40000, 0, 7, 70000, 1])
    scores = _levels(sizes, dtype, levels, target.device, seed=14)
    layout = layout_of([torch.zeros(n, device=target.device) for n in sizes])
    keys = [ref.fisher_key(s, True).to(torch.int64).cpu() for s in scores]
    flat = torch.cat(keys)
    for threshold in (int(flat.median()), int(flat.max()), int(flat.min()), int(flat.max()) + 1):
        ties = [int((k == threshold).sum()) for k in keys]
        for quotas in ([0] * len(keys), ties, [t // 3 for t in ties], [t // 2 + (t % 3) % 2 for t in ties],
                       [min(t, 1) for t in ties]):
            want = ref.mask_from_threshold_reference(layout, scores, True, threshold, quotas)
            got = backend.mask_from_threshold(layout, scores, True, threshold, quotas)
            assert_same_mask(layout, got, want, f"threshold {threshold}, quotas {quotas}:")


@pytest.mark.parametrize("levels", [None, 2], ids=["quarters", "2-levels"])
def test_select_by_histogram_equals_the_reference_mask(target, levels):
    backend = target.backend()
    sizes = _sharded_sizes(target, [600, 7, 70000, 2049])
    scores = _levels(sizes, torch.float32, levels, target.device, seed=15)
    layout = layout_of([torch.zeros(n, device=target.device) for n in sizes])
    n = layout.n_masked
    for k in (1, 500, n // 10, n // 2, n - 1, n):
        want = ref.select_mask_reference(layout, scores, k, True)
        assert_same_mask(layout, ds.select_mask_by_histogram(backend, layout, scores, k, True), want, f"k={k}:")


@pytest.mark.parametrize("levels", [None, 4], ids=["quarters", "4-levels"])
def test_sharded_select_pass_by_pass_small_layouts(target, levels):
    # an empty tensor among them; with 4 levels most keys tie at the threshold
    backend = target.backend()
    sizes = _sharded_sizes(target, [600, 7, 70000, 0, 2049])
    scores = _levels(sizes, torch.float32, levels, target.device, seed=16)
    layout = layout_of([torch.zeros(n, device=target.device) for n in sizes])
    check_sharded_select(backend, layout, scores, layout.k_for(0.9))


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_rejected_naming_the_argument(target):
    # the checks every backend makes the same way (each backend's own further checks: beside it)
    backend = target.backend()
    dev = target.device
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        backend.fisher_accumulate([torch.zeros(3, device=dev)], [torch.zeros(4, device=dev)])
    layout = layout_of([torch.zeros(7, device=dev), torch.zeros(9, device=dev)])
    scores = random_tensors([7, 9], torch.float32, dev, seed=0)
    with pytest.raises(ValueError, match=r"select_mask: expected 0 <= k <= 16, got k=17"):
        backend.select_mask(layout, scores, 17, True)
    with pytest.raises(ValueError, match="shift"):
        backend.key_histogram(layout, scores, True, 0, 30, 8)
    with pytest.raises(ValueError, match=r"mask_from_threshold: expected 2 quotas \(one per masked tensor\), got 1"):
        backend.mask_from_threshold(layout, scores, True, 0, [0])


# ------------------------------------------------------------------------------ the optimizer


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


def _tiny_fsam(backend_name, net, batches, steps, device):
    """FSAM over TinyNet: an ASAM group, a plain one and a dense (fisher_mask=False) one, SGD with
    momentum, a new mask every second step; ``steps`` steps of ``batches``, and the step function."""
    opt = FSAM(
        [
            {"params": [net.emb.weight, net.fc1.weight], "adaptive": True},
            {"params": [net.fc1.bias, net.fc2.weight, net.fc2.bias]},
            {"params": list(net.norm.parameters()), "fisher_mask": False},
        ],
        torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, sparsity=0.8, mask_update_interval=2,
        backend=backend_name,
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        x, y = x.to(device), y.to(device)
        loss_fn(net(x), y).backward()
        opt.step(lambda: loss_fn(net(x), y).backward())
        opt.zero_grad()

    for x, y in batches[:steps]:
        step(x, y)
    return opt, step


def _tiny_nets(n, seed, device):
    torch.manual_seed(seed)
    nets = [TinyNet().to(device) for _ in range(n)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    return nets


def test_optimizer_trajectory_and_checkpoint_match_the_reference(target):
    target.backend()
    batches = make_batches(n_batches=4)
    net_b, net_r, net_c = _tiny_nets(3, 0, target.device)
    opt_b, step_b = _tiny_fsam(target.backend_name, net_b, batches, 2, target.device)
    opt_r, step_r = _tiny_fsam("torch", net_r, batches, 2, target.device)
    assert opt_b.backend == target.backend_name
    for a, b in zip(opt_b.masks(), opt_r.masks()):
        assert torch.equal(a, b), first_mismatch(a, b)
    # save mid-run, load into a fresh optimizer on a copy of the model, and continue all three
    net_c.load_state_dict(net_b.state_dict())
    opt_c, step_c = _tiny_fsam(target.backend_name, net_c, batches, 0, target.device)
    opt_c.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # as if through torch.save/torch.load
    for x, y in batches[2:]:  # the first of these rebuilds the mask (mask_update_interval=2)
        step_b(x, y)
        step_r(x, y)
        step_c(x, y)
    for (name, p), q, c in zip(net_b.named_parameters(), net_r.parameters(), net_c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert torch.equal(p, c), f"{name} after reload: {first_mismatch(p, c)}"


def test_optimizer_empirical_fisher_and_perturb_false_group(target):
    target.backend()
    nets = _tiny_nets(2, 1, target.device)
    opts = []
    for name, net in zip((target.backend_name, "torch"), nets):
        opts.append(FSAM(
            [{"params": [net.emb.weight, net.fc1.weight, net.fc1.bias]},
             {"params": [net.fc2.weight, net.fc2.bias], "perturb": False},
             {"params": list(net.norm.parameters()), "fisher_mask": False}],
            torch.optim.SGD, lr=0.1, fisher="empirical", sparsity=0.5, backend=name,
        ))
    loss_fn = torch.nn.CrossEntropyLoss()
    dev = target.device
    for net, opt in zip(nets, opts):
        for x, y in make_batches(n_batches=2, seed=5):
            loss_fn(net(x.to(dev)), y.to(dev)).backward()
            opt.accumulate_fisher()
            opt.zero_grad()
        x, y = (t.to(dev) for t in make_batches(n_batches=1, seed=6)[0])
        loss_fn(net(x), y).backward()
        opt.step(lambda: loss_fn(net(x), y).backward())
    assert opts[0].backend == target.backend_name
    for a, b in zip(opts[0].masks(), opts[1].masks()):
        assert torch.equal(a, b), first_mismatch(a, b)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_optimizer_structured_mask_matches_the_reference(target):
    """FSAM(structure="2:4") builds the same N:M mask on the backend as on the reference."""
    target.backend()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(target.device)
    x = torch.randn(5, 8).to(target.device)
    masks = []
    for name in ("torch", target.backend_name):
        model = copy.deepcopy(net)
        opt = FSAM(model.parameters(), torch.optim.SGD, structure="2:4", sparsity=0.5, lr=0.1, backend=name)
        model(x).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step()
        assert opt.backend == name
        masks.append(opt.masks())
    for a, b in zip(*masks):
        assert torch.equal(a, b), first_mismatch(a, b)
    assert int(masks[1][0].sum()) == 16 * 8 // 2  # 2 of every 4 along the input dimension


def test_interpreter_mode_follows_the_mark_expression():
    # conftest.py sets TRITON_INTERPRET from this: a GPU-only selection must leave Triton compiled
    from backend_targets import triton_interpreter_selected

    for expr in ("", "triton", "triton and not gpu", "not gpu", "native or triton", "not (gpu)"):
        assert triton_interpreter_selected(expr), expr
    for expr in ("gpu", "gpu and triton", "gpu and not triton", "native", "not triton", "slow"):
        assert not triton_interpreter_selected(expr), expr
