"""The Triton backend's kernels under the Triton interpreter (CPU tensors), against the reference.

TRITON_INTERPRET=1 must be set before the kernel modules are imported; the backend imports them on
first use, so setting it here (at collection) is enough. Shapes stay tiny: the interpreter runs
every program in numpy. It handles fp32, fp16 and bf16 tensors (bf16 through its own emulation).
"""
import copy
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fsam_kernels import FSAM  # noqa: E402
from fsam_kernels import reference as ref  # noqa: E402
from fsam_kernels.backends import BackendUnavailable, get_backend  # noqa: E402
from fsam_kernels.layout import ParamLayout  # noqa: E402

from conftest import TinyNet, first_mismatch, halfway_case, make_batches  # noqa: E402
from test_numeric_policy import SKIP_RULE_CASES, skip_rule_case  # noqa: E402

SIZES = [1, 7, 123, 4097]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def backend():
    try:
        return get_backend("triton", "cpu")
    except BackendUnavailable as exc:  # e.g. Triton was imported before this module set TRITON_INTERPRET
        pytest.skip(str(exc))


def make_layout(sizes, dtype=torch.float32, masked=None, adaptive=None, rho=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    n = len(sizes)
    return ParamLayout(
        params,
        masked if masked is not None else [True] * n,
        rho if rho is not None else [0.05] * n,
        adaptive if adaptive is not None else [False] * n,
    )


def rand_like_list(tensors, dtype=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.numel(), generator=g).to(dtype or t.dtype) for t in tensors]


def assert_same_mask(layout, got, want):
    assert got.dtype == torch.uint8 and got.shape == want.shape
    if not torch.equal(got, want):
        a, b = ref.unpack_mask(layout, got), ref.unpack_mask(layout, want)
        for j, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"masked tensor {j}: {first_mismatch(x, y)}"
        raise AssertionError(f"padding bits differ: {first_mismatch(got, want)}")


# ----------------------------------------------------------------------------- device support
def test_supports_cpu_only_in_interpreter_mode(backend):
    assert backend.supports(torch.device("cpu"))
    assert not backend.supports(torch.device("meta"))
    assert "CUDA" in backend.unsupported_reason(torch.device("meta"))
    # interpreted kernels dereference host pointers: CUDA tensors are refused, with the reason
    assert "TRITON_INTERPRET" in backend.unsupported_reason(torch.device("cuda"))


def test_launch_counting_needs_cuda():
    from fsam_kernels.profiling import count_kernel_launches

    if torch.cuda.is_available():
        pytest.skip("this checks the message on machines without CUDA")
    with pytest.raises(RuntimeError, match="CUDA"):
        count_kernel_launches(lambda: None)


# ----------------------------------------------------------------------------- Fisher
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_accumulate_bit_exact(backend, dtype):
    sizes = SIZES + list(range(1, 40, 3))
    g = torch.Generator().manual_seed(0)
    accum = [torch.rand(n, generator=g) for n in sizes]
    grads = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    want = [a.clone() for a in accum]
    ref.fisher_accumulate_reference(want, grads)
    backend.fisher_accumulate(accum, grads)
    backend.fisher_accumulate(accum, grads)  # twice: the cached tables are reused
    ref.fisher_accumulate_reference(want, grads)
    for i, (a, w) in enumerate(zip(accum, want)):
        assert torch.equal(a, w), f"tensor {i}: {first_mismatch(a, w)}"


def _views_into_one_buffer(sizes, dtype, offset, seed):
    """Contiguous tensors that are views into one flat buffer from element ``offset`` on (a flattened
    model's parameters): with an odd offset none starts on 16 bytes."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randn(offset + sum(sizes), generator=g).to(dtype)
    out, at = [], offset
    for n in sizes:
        out.append(flat[at : at + n])
        at += n
    return out


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_fisher_accumulate_on_views_of_a_flat_buffer(backend, offset):
    # The full-block fast path assumes 16-byte aligned tensors; views at odd offsets take the masked one.
    from fsam_kernels.triton_kernels.tables import aligned16

    sizes = [4096 * 2 + 8, 4096, 3]  # a partial last chunk; aligned from offset 0 in fp32 and bf16
    grads = _views_into_one_buffer(sizes, torch.float32, offset, seed=1)
    accum = _views_into_one_buffer(sizes, torch.float32, offset, seed=2)
    assert aligned16(grads + accum) == (offset == 0)
    want = [a.clone() for a in accum]
    ref.fisher_accumulate_reference(want, grads)
    backend.fisher_accumulate(accum, grads)
    for i, (a, w) in enumerate(zip(accum, want)):
        assert torch.equal(a, w), f"tensor {i}: {first_mismatch(a, w)}"


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_perturb_and_restore_on_views_of_a_flat_buffer(backend, offset, dtype):
    sizes = [4096 * 2 + 8, 4096, 3]  # a partial last chunk; aligned from offset 0 in fp32 and bf16
    params = _views_into_one_buffer(sizes, dtype, offset, seed=3)
    grads = _views_into_one_buffer(sizes, dtype, offset, seed=4)
    from fsam_kernels.triton_kernels.tables import aligned16

    assert aligned16(params + grads) == (offset == 0)
    layout = ParamLayout(params, [True, False, True], [0.05] * 3, [False, True, False])
    originals = [p.clone() for p in params]
    bits = ref.select_mask_reference(layout, [grads[0], grads[2]], 2000, True)
    norm = ref.grad_norm_reference(layout, grads)
    twin = ParamLayout([p.clone() for p in params], layout.masked, layout.rho, layout.adaptive)
    ref.perturb_reference(twin, grads, bits, norm, 1e-12)
    saved = backend.perturb(layout, grads, bits, backend.mask_aux(layout, bits), norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, twin.params)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    backend.restore(layout, bits, backend.mask_aux(layout, bits), saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


@pytest.mark.parametrize("split", [1, 2, 4])
def test_perturb_and_restore_in_sub_blocks(backend, monkeypatch, split):
    # PERTURB_SPLIT takes a chunk in sub-blocks, the saved position carried from one to the next: the
    # same weights and the same compact saved buffer for every candidate launch shape.
    from fsam_kernels.triton_kernels import perturb as kernels

    monkeypatch.setattr(kernels, "PERTURB_SPLIT", split)
    sizes = [4096 + 1500, 3000]  # full and partial sub-blocks, a dense tensor
    params = _views_into_one_buffer(sizes, torch.float32, 0, seed=5)
    grads = _views_into_one_buffer(sizes, torch.float32, 0, seed=6)
    layout = ParamLayout(params, [True, False], [0.05] * 2, [True, False])
    originals = [p.clone() for p in params]
    bits = ref.select_mask_reference(layout, [grads[0]], 1700, True)
    norm = ref.grad_norm_reference(layout, grads)
    twin = ParamLayout([p.clone() for p in params], layout.masked, layout.rho, layout.adaptive)
    want_saved = ref.perturb_reference(twin, grads, bits, norm, 1e-12)
    saved = backend.perturb(layout, grads, bits, backend.mask_aux(layout, bits), norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, twin.params)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    got_saved = backend.saved_originals(layout, bits, None, saved)
    assert [torch.equal(a, b) for a, b in zip(got_saved, want_saved)] == [True, True]
    backend.restore(layout, bits, None, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


def _copies_in_one_buffer(tensors, offset):
    """The same values in views into one flat buffer from element ``offset`` on."""
    flat = torch.empty(offset + sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
    out, at = [], offset
    for t in tensors:
        out.append(flat[at : at + t.numel()].copy_(t))
        at += t.numel()
    return out


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy, the fp32 overflow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_norm_on_views_of_a_flat_buffer(backend, dtype):
    # The sum-of-squares kernel's full-block path (aligned views) must sum exactly what its masked path
    # (views at an odd offset) sums, ASAM and plain, also when a square overflows fp32 in a full chunk
    # (the fp64 redo); both within rounding of the reference.
    from fsam_kernels.triton_kernels.tables import aligned16

    sizes = [4096 * 2 + 8, 4096, 3]
    params = _views_into_one_buffer(sizes, dtype, 0, seed=7)
    grads = _views_into_one_buffer(sizes, dtype, 0, seed=8)
    for overflow in (False, True):
        if overflow:
            grads[1][77] = 3e19  # its square overflows fp32, not the norm
        norms = []
        for offset in (0, 1):
            ps, gs = _copies_in_one_buffer(params, offset), _copies_in_one_buffer(grads, offset)
            assert aligned16(ps + gs) == (offset == 0)
            layout = ParamLayout(ps, [True] * 3, [0.05] * 3, [True, False, True])
            norms.append(backend.grad_norm(layout, gs))
        want = ref.grad_norm_reference(layout, grads)
        assert torch.isfinite(want)
        assert torch.equal(norms[0], norms[1]), (overflow, norms)
        torch.testing.assert_close(norms[0], want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_select_mask_on_views_of_a_flat_buffer(backend, monkeypatch, offset, dtype):
    # The count, write and fix-up kernels and the repair's passes read scores that are views into one
    # buffer: full blocks of aligned views without a bounds mask, the rest masked; ties included.
    from fsam_kernels.triton_kernels.tables import aligned16

    for name, value in (("sample_size", 64), ("max_sample_size", 64), ("candidate_capacity", 4),
                        ("max_candidate_capacity", 4)):
        monkeypatch.setattr(backend, name, value)
    sizes = [4096 * 2 + 8, 4096, 3]
    layout = make_layout(sizes)
    scores = _views_into_one_buffer(sizes, dtype, offset, seed=9)
    scores[1][:2000] = 0.5  # ties at a threshold
    assert aligned16(scores) == (offset == 0)
    for k, square in ((3000, True), (7000, False)):
        before = backend.select_fallbacks
        keyed = scores if square else [s.abs() for s in scores]
        got = backend.select_mask(layout, keyed, k, square)
        assert_same_mask(layout, got, ref.select_mask_reference(layout, keyed, k, square))
    assert backend.select_fallbacks > before  # the repair's radix passes over the scores ran


def test_fisher_accumulate_float64_grads_use_the_reference(backend):
    accum = [torch.zeros(5), torch.zeros(6)]
    grads = [torch.randn(5, dtype=torch.float64), torch.randn(6)]
    backend.fisher_accumulate(accum, grads)
    assert torch.equal(accum[0], grads[0].float() * grads[0].float())
    assert torch.equal(accum[1], grads[1] * grads[1])


def test_fisher_accumulate_rejects_bad_input(backend):
    with pytest.raises(ValueError, match="accum\\[0\\]"):
        backend.fisher_accumulate([torch.zeros(3, dtype=torch.float64)], [torch.zeros(3)])
    with pytest.raises(ValueError, match="grads\\[0\\]"):
        backend.fisher_accumulate([torch.zeros(3)], [torch.zeros(4)])


# ----------------------------------------------------------------------------- mask
def _ties(layout, seed=0):
    # few distinct values (and many zeros): ties at the threshold in every case
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 3, (layout.numel[i],), generator=g).float() for i in layout.masked_index]


@pytest.mark.parametrize(
    "case",
    ["grad-fp32", "grad-fp16", "grad-bf16", "fisher-ties", "all-zero", "50-tensors"],
)
def test_select_mask_matches_reference(backend, case):
    if case == "50-tensors":
        layout = make_layout(list(range(1, 51)))
    else:
        layout = make_layout(SIZES + [600], masked=[True, True, False, True, True])
    n = layout.n_masked
    if case.startswith("grad"):
        dtype = {"grad-fp32": torch.float32, "grad-fp16": torch.float16, "grad-bf16": torch.bfloat16}[case]
        scores, square = rand_like_list(layout.masked_params, dtype), True
    elif case == "fisher-ties":
        scores, square = _ties(layout), False
    elif case == "all-zero":
        scores, square = [torch.zeros(layout.numel[i]) for i in layout.masked_index], False
    else:
        scores, square = rand_like_list(layout.masked_params), True
    before = backend.select_fallbacks
    ks = {0, 1, n // 3, n} if case == "50-tensors" else {0, 1, 2, n // 3, n - 1, n}
    for k in sorted(ks):
        got = backend.select_mask(layout, scores, k, square)
        assert_same_mask(layout, got, ref.select_mask_reference(layout, scores, k, square))
        assert ref.mask_popcount(got) == k
    assert backend.select_fallbacks == before


def test_select_mask_sampled_bracket(backend, monkeypatch):
    # A candidate buffer smaller than N forces the sampled bracket (the path large models take).
    monkeypatch.setattr(backend, "candidate_capacity", 3000)
    monkeypatch.setattr(backend, "sample_size", 2048)
    layout = make_layout([4097, 123, 4097, 7], masked=[True, True, True, True])
    before = backend.select_fallbacks
    for scores, square in [(rand_like_list(layout.masked_params), True), (_ties(layout, seed=3), False)]:
        for k in (1, 900, layout.n_masked // 2, layout.n_masked - 5):
            got = backend.select_mask(layout, scores, k, square)
            assert_same_mask(layout, got, ref.select_mask_reference(layout, scores, k, square))
    assert backend.select_fallbacks == before


@pytest.mark.parametrize("sampled", [False, True], ids=["all-candidates", "sampled"])
def test_select_mask_parallel_radix_path(backend, monkeypatch, sampled):
    # The bracket and the threshold among the candidates by radix passes over several programs (what
    # large models take): the same masks as the reference, ties and k = 1 / N included.
    monkeypatch.setattr(backend, "parallel_select_min", 0)
    if sampled:
        monkeypatch.setattr(backend, "candidate_capacity", 3000)
        monkeypatch.setattr(backend, "sample_size", 2048)
    layout = make_layout([4097, 123, 4097, 7, 5000])
    before = backend.select_fallbacks
    cases = [(rand_like_list(layout.masked_params), True), (_ties(layout, seed=5), False),
             ([torch.zeros(n) for n in layout.numel], True)]
    for scores, square in cases:
        for k in (1, 900, layout.n_masked // 2, layout.n_masked - 5, layout.n_masked):
            got = backend.select_mask(layout, scores, k, square)
            assert_same_mask(layout, got, ref.select_mask_reference(layout, scores, k, square))
            assert ref.mask_popcount(got) == k
    assert backend.select_fallbacks == before


def test_radix_passes_find_order_statistics():
    # Two selections at once over a buffer spread across several programs, bounds that share leading bytes.
    from fsam_kernels.triton_kernels import radix

    g = torch.Generator().manual_seed(9)
    keys = torch.randint(-(1 << 31), (1 << 31) - 1, (20000,), generator=g, dtype=torch.int64)
    keys[:3000] = 0x3F80_1234  # a block of ties
    keys[3000:6000] = torch.randint(0x3F80_0000, 0x3F80_FFFF, (3000,), generator=g)
    keys = keys.to(torch.int32)
    ordered = keys.sort(descending=True).values.tolist()
    near = keys[(keys >= 0x3F80_0000) & (keys <= 0x3F80_FFFF)].sort(descending=True).values.tolist()
    for rank_a, rank_b in ((1, 20000), (2999, 10000), (4567, 3001)):
        sel = torch.tensor([1, rank_a, -(1 << 31), (1 << 31) - 1, 1, rank_b, 0x3F80_0000, 0x3F80_FFFF, keys.numel()])
        sel[5] = min(rank_b, len(near))
        hist = torch.zeros(radix.PASSES * 2 * 256, dtype=torch.int32)
        radix.launch_passes(keys, sel[8:], sel, hist, 2, 3, 4096)
        counts = hist.view(radix.PASSES, 2, 256).sum(-1)
        assert int(counts[0, 0]) == keys.numel()  # pass 0 of the full-range selection sees every key
        assert int(counts[0, 1]) == 0 and int(counts[1, 1]) == 0  # bytes the narrow bounds share: skipped
        out = torch.zeros(2, dtype=torch.int32)
        radix._store_selected_kernel[(1,)](sel, hist, out, R=2)
        assert out.tolist() == [ordered[rank_a - 1], near[int(sel[5]) - 1]]


# Every branch of the select on a few thousand values: the constants shrunk so that a 64-key sample
# and a 4-key candidate buffer miss or overflow by design, and 2-chunk scan blocks over 6 chunks.
_SAMPLES = 64


def _repair_layout():
    # mixed weight dtypes: the per-chunk prefix counts restart in each saved-buffer group
    g = torch.Generator().manual_seed(4)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float16]
    params = [torch.randn(n, generator=g).to(dt) for n, dt in zip([4097, 300, 5000, 7], dtypes)]
    return ParamLayout(params, [True] * 4, [0.05] * 4, [False] * 4)


def _repair_cases(n):
    """(flat fp32 scores, k, whether the sampled bracket must be repaired) per case."""
    g = torch.Generator().manual_seed(6)
    at_samples = torch.zeros(n, dtype=torch.bool)
    at_samples[[((2 * s + 1) * n) // (2 * _SAMPLES) for s in range(_SAMPLES)]] = True  # what the sample reads
    ties = torch.randint(0, 3, (n,), generator=g).float()
    rand = torch.rand(n, generator=g)
    return {
        # the sample sees only zeros: the bracket collapses onto 0, far below the k-th key
        "threshold-above-bracket": (torch.where(at_samples, 0.0, torch.rand(n, generator=g) + 0.5), n // 2, True),
        # the sample sees only the two top values: the bracket sits above the k-th key (ties below it)
        "threshold-below-bracket": (torch.where(at_samples, 1e6 * (1 + torch.arange(n) % 2),
                                                torch.randint(0, 1000, (n,), generator=g).float()), n // 2, True),
        "candidates-overflow": (rand, n // 2, True),
        "heavy-ties": (ties, n // 2, None),
        "all-equal": (torch.full((n,), 0.25), n // 3, False),
        "k=1": (rand, 1, None),
        "k=N": (ties, n, None),
    }


def _expected_prefix(layout, bits, backend):
    """Per chunk, the masked elements of the earlier chunks of its weight-dtype group."""
    from fsam_kernels.triton_kernels import CHUNK
    from fsam_kernels.triton_kernels.tables import DTYPE_CODES

    prefix, totals = [], [0] * 4
    for j, i in enumerate(layout.masked_index):
        code, mask = DTYPE_CODES[layout.params[i].dtype], ref.mask_of(layout, bits, j)
        for start in range(0, layout.numel[i], CHUNK):
            prefix.append(totals[code])
            totals[code] += int(mask[start : start + CHUNK].sum())
    return prefix, tuple(totals)


@pytest.mark.parametrize("parallel", [False, True], ids=["one-program", "many-programs"])
def test_select_mask_is_exact_on_every_path_without_the_reference(backend, monkeypatch, parallel):
    reference = ref.select_mask_reference

    def no_reference(*args, **kwargs):
        raise AssertionError("the Triton select called the reference")

    monkeypatch.setattr(ref, "select_mask_reference", no_reference)
    for name, value in (("sample_size", _SAMPLES), ("max_sample_size", _SAMPLES), ("candidate_capacity", 4),
                        ("max_candidate_capacity", 4), ("scan_block", 2),
                        ("parallel_select_min", 0 if parallel else 1 << 24)):
        monkeypatch.setattr(backend, name, value)
    layout = _repair_layout()
    n = layout.n_masked
    assert backend.select_plan(n, 6, n // 2).n_samples == _SAMPLES
    for case, (flat, k, repaired) in _repair_cases(n).items():
        scores = list(flat.split(layout.numel))
        before = backend.select_fallbacks
        got = backend.select_mask(layout, scores, k, False)
        assert_same_mask(layout, got, reference(layout, scores, k, False))
        if repaired is not None:
            assert backend.select_fallbacks - before == int(repaired), case
        want_prefix, want_totals = _expected_prefix(layout, got, backend)
        aux = backend.mask_aux(layout, got)  # the counts the select produced
        assert aux["prefix"].tolist() == want_prefix and aux["totals"] == want_totals, case
    aux = backend.mask_aux(layout, got.clone())  # counted again from the bits alone (k = 0 scan)
    assert aux["prefix"].tolist() == want_prefix and aux["totals"] == want_totals


def test_select_mask_rejects_bad_input(backend):
    layout = make_layout([7, 9])
    scores = rand_like_list(layout.masked_params)
    with pytest.raises(ValueError, match="k="):
        backend.select_mask(layout, scores, 17, True)
    with pytest.raises(ValueError, match="2 score tensors"):
        backend.select_mask(layout, scores[:1], 3, True)
    with pytest.raises(ValueError, match="scores\\[1\\]"):
        backend.select_mask(layout, [scores[0], torch.zeros(3)], 3, True)


def test_mask_aux_of_a_loaded_mask_equals_the_one_select_built(backend):
    layout = make_layout([4097, 123, 50, 4097], masked=[True, False, True, True])
    scores = rand_like_list(layout.masked_params)
    bits = backend.select_mask(layout, scores, 3000, True)
    built = backend.mask_aux(layout, bits)
    loaded = backend.mask_aux(layout, bits.clone())  # not the cached mask: recomputed from the bits
    assert torch.equal(built["prefix"], loaded["prefix"]) and built["totals"] == loaded["totals"]
    assert loaded["totals"][0] == 3000


# ----------------------------------------------------------------------------- perturb / restore
def _perturb_both(backend, layout, grads, bits, norm, eps=1e-12):
    twin = ParamLayout([p.clone() for p in layout.params], layout.masked, layout.rho, layout.adaptive)
    originals = [p.clone() for p in layout.params]
    aux = backend.mask_aux(layout, bits) if bits is not None else None
    saved = backend.perturb(layout, grads, bits, aux, norm, eps)
    saved_ref = ref.perturb_reference(twin, grads, bits, norm, eps)
    return twin, originals, aux, saved, saved_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_and_restore(backend, dtype):
    sizes = SIZES + [600, 33]
    layout = make_layout(
        sizes, dtype, masked=[True, True, False, True, True, False],
        adaptive=[False, True, False, False, True, True], rho=[0.05, 0.05, 0.1, 0.05, 0.2, 0.1],
    )
    grads = rand_like_list(layout.params)
    grads[1] = None  # a parameter without a gradient is neither perturbed nor saved
    _check_perturb_and_restore(backend, layout, grads)


def test_perturb_and_restore_50_tensors(backend):
    n = 50
    layout = make_layout(list(range(1, n + 1)), masked=[i % 7 != 3 for i in range(n)],
                         adaptive=[i % 5 == 0 for i in range(n)])
    _check_perturb_and_restore(backend, layout, rand_like_list(layout.params))


def test_perturb_rounds_like_the_reference_for_random_rho_and_norm(backend):
    # scale = fl32(1 / (norm + eps)) * fl32(rho): a single division rho / (norm + eps) would differ
    g = torch.Generator().manual_seed(7)
    for trial in range(8):
        rho = [float(r) for r in torch.rand(3, generator=g) * 0.5 + 0.01]
        layout = make_layout([257, 64, 9], masked=[True, False, True], adaptive=[False, False, True], rho=rho, seed=trial)
        grads = rand_like_list(layout.params)
        bits = backend.select_mask(layout, [grads[0], grads[2]], 100, True)
        norm = (torch.rand((), generator=g) * 50 + 0.1).float()
        twin, *_ = _perturb_both(backend, layout, grads, bits, norm, eps=float(torch.rand((), generator=g)) * 1e-3)
        for i, (p, q) in enumerate(zip(layout.params, twin.params)):
            assert torch.equal(p, q), f"trial {trial}, param {i}: {first_mismatch(p, q)}"


def _check_perturb_and_restore(backend, layout, grads):
    scores = [g if g is not None else torch.zeros(layout.numel[i]) for i, g in
              ((i, grads[i]) for i in layout.masked_index)]
    bits = backend.select_mask(layout, scores, layout.n_masked // 10, True)
    norm = backend.grad_norm(layout, grads)
    torch.testing.assert_close(norm, ref.grad_norm_reference(layout, grads), rtol=1e-6, atol=0)
    twin, originals, aux, saved, saved_ref = _perturb_both(backend, layout, grads, bits, norm)
    # Same norm, same operation order, no FMA contraction: the perturbed weights are bit-identical.
    for i, (p, q) in enumerate(zip(layout.params, twin.params)):
        assert torch.equal(p, q), f"param {i}: {first_mismatch(p, q)}"
    assert backend.saved_nbytes(saved) == sum(s.numel() * s.element_size() for s in saved_ref if s is not None)
    if all(g is not None for g in grads):
        # compact: the dense tensors' originals, then the masked elements' in global bit order
        order = layout.dense_index + layout.masked_index
        (buffer,) = saved.buffers.values()
        assert torch.equal(buffer, torch.cat([saved_ref[i] for i in order]))
    backend.restore(layout, bits, aux, saved)
    for i, (p, o) in enumerate(zip(layout.params, originals)):
        assert torch.equal(p, o), f"param {i} not restored: {first_mismatch(p, o)}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy computing inf - inf
@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_norm_leaves_weights_untouched(backend, bad):
    layout = make_layout([123, 4097, 7], masked=[True, False, True])
    grads = rand_like_list(layout.params)
    bits = backend.select_mask(layout, [grads[0], grads[2]], 20, True)
    originals = [p.clone() for p in layout.params]
    saved = backend.perturb(layout, grads, bits, backend.mask_aux(layout, bits), torch.tensor(bad), 1e-12)
    backend.restore(layout, bits, None, saved)  # must not write the (never filled) saved buffer back
    for p, o in zip(layout.params, originals):
        assert torch.equal(p, o)


def test_float64_params_use_the_reference(backend):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(50, generator=g, dtype=torch.float64), torch.randn(70, generator=g)]
    layout = ParamLayout(params, [True, True], [0.05, 0.05], [False, False])
    grads = [torch.randn(50, generator=g, dtype=torch.float64), torch.randn(70, generator=g)]
    bits = backend.select_mask(layout, grads, 30, True)
    assert_same_mask(layout, bits, ref.select_mask_reference(layout, grads, 30, True))
    norm = backend.grad_norm(layout, grads)
    torch.testing.assert_close(norm, ref.grad_norm_reference(layout, grads), rtol=1e-6, atol=0)
    twin, originals, aux, saved, _ = _perturb_both(backend, layout, grads, bits, norm)
    for p, q in zip(layout.params, twin.params):
        assert torch.equal(p, q)
    backend.restore(layout, bits, aux, saved)
    for p, o in zip(layout.params, originals):
        assert torch.equal(p, o)


@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")  # numpy on inf/NaN
@pytest.mark.parametrize("case", SKIP_RULE_CASES, ids=[c[0] for c in SKIP_RULE_CASES])
def test_skip_rule_is_the_reference_one(backend, case):
    """The reference's skip rule (see tests/test_numeric_policy.py): the same decision, a norm that
    does not overflow for finite gradients, and the reference's perturbation."""
    _, values, dtype, weight, perturbed = case
    layout, params, grads = skip_rule_case(values, dtype, weight)
    norm = backend.grad_norm(layout, grads)
    assert norm.dtype == ref.grad_norm_reference(layout, grads).dtype
    assert bool(torch.isfinite(norm)) == perturbed, f"norm {norm.item()!r}"
    if perturbed:
        exact = ref.grad_sumsq_reference(layout, grads).sqrt()
        torch.testing.assert_close(norm.double(), exact, rtol=1e-6, atol=0)
    twin, originals, _, saved, _ = _perturb_both(backend, layout, grads, None, norm)
    for i, (p, q) in enumerate(zip(layout.params, twin.params)):
        assert torch.equal(p, q), f"param {i}: {first_mismatch(p, q)}"
    assert (not torch.equal(layout.params[0], originals[0])) == perturbed
    backend.restore(layout, None, None, saved)
    for p, o in zip(layout.params, originals):
        assert torch.equal(p, o)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_perturbation_halfway_between_two_values_rounds_to_nearest_even(backend, dtype):
    layout, grads, norm, want = halfway_case(dtype)
    backend.perturb(layout, grads, None, None, norm, 1e-12)
    assert torch.equal(layout.params[0], want), first_mismatch(layout.params[0], want)


def test_perturb_rejects_bad_input(backend):
    layout = make_layout([7, 9])
    grads = rand_like_list(layout.params)
    norm = torch.tensor(1.0)
    with pytest.raises(ValueError, match="packed mask"):
        backend.perturb(layout, grads, None, None, norm, 1e-12)
    with pytest.raises(ValueError, match="uint8 mask of 128 bytes"):
        backend.perturb(layout, grads, torch.zeros(3, dtype=torch.uint8), None, norm, 1e-12)
    with pytest.raises(ValueError, match="grads\\[1\\]"):
        backend.perturb(layout, [grads[0], torch.zeros(4)], None, None, norm, 1e-12)


# ----------------------------------------------------------------------------- the optimizer
def _run(backend_name, net, batches, steps, **kw):
    opt = FSAM(
        [
            {"params": [net.emb.weight, net.fc1.weight], "adaptive": True},
            {"params": [net.fc1.bias, net.fc2.weight, net.fc2.bias]},
            {"params": list(net.norm.parameters()), "fisher_mask": False},
        ],
        torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, sparsity=0.8, mask_update_interval=2,
        backend=backend_name, **kw,
    )
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x, y):
        loss_fn(net(x), y).backward()
        opt.step(lambda: loss_fn(net(x), y).backward())
        opt.zero_grad()

    for x, y in batches[:steps]:
        step(x, y)
    return opt, step


def test_optimizer_trajectory_and_checkpoint_match_the_reference(backend):
    batches = make_batches(n_batches=4)
    torch.manual_seed(0)
    net_t, net_r = TinyNet(), TinyNet()
    net_r.load_state_dict(net_t.state_dict())
    opt_t, step_t = _run("triton", net_t, batches, 2)
    opt_r, step_r = _run("torch", net_r, batches, 2)
    assert opt_t.backend == "triton"
    for a, b in zip(opt_t.masks(), opt_r.masks()):
        assert torch.equal(a, b), first_mismatch(a, b)
    # save mid-run, load into a fresh optimizer on a copy of the model, and continue both
    net_c = TinyNet()
    net_c.load_state_dict(net_t.state_dict())
    opt_c, step_c = _run("triton", net_c, batches, 0)
    opt_c.load_state_dict(copy.deepcopy(opt_t.state_dict()))  # as if through torch.save/torch.load
    for x, y in batches[2:]:  # the first of these rebuilds the mask (mask_update_interval=2)
        step_t(x, y)
        step_r(x, y)
        step_c(x, y)
    for (name, p), q, c in zip(net_t.named_parameters(), net_r.parameters(), net_c.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        assert torch.equal(p, c), f"{name} after reload: {first_mismatch(p, c)}"


def test_optimizer_empirical_fisher_and_perturb_false_group(backend):
    torch.manual_seed(1)
    nets = [TinyNet(), TinyNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = []
    for name, net in zip(("triton", "torch"), nets):
        opts.append(FSAM(
            [{"params": [net.emb.weight, net.fc1.weight, net.fc1.bias]},
             {"params": [net.fc2.weight, net.fc2.bias], "perturb": False},
             {"params": list(net.norm.parameters()), "fisher_mask": False}],
            torch.optim.SGD, lr=0.1, fisher="empirical", sparsity=0.5, backend=name,
        ))
    loss_fn = torch.nn.CrossEntropyLoss()
    for net, opt in zip(nets, opts):
        for x, y in make_batches(n_batches=2, seed=5):
            loss_fn(net(x), y).backward()
            opt.accumulate_fisher()
            opt.zero_grad()
        x, y = make_batches(n_batches=1, seed=6)[0]
        loss_fn(net(x), y).backward()
        opt.step(lambda: loss_fn(net(x), y).backward())
    for a, b in zip(opts[0].masks(), opts[1].masks()):
        assert torch.equal(a, b), first_mismatch(a, b)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_optimizer_structured_mask_uses_triton_kernel(backend):
    """FSAM(structure="2:4", backend="triton") builds the same N:M mask as the reference."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    masks = []
    for name in ("torch", "triton"):
        model = copy.deepcopy(net)
        opt = FSAM(model.parameters(), torch.optim.SGD, structure="2:4", sparsity=0.5, lr=0.1, backend=name)
        model(x).square().mean().backward()
        opt.first_step(zero_grad=True)
        model(x).square().mean().backward()
        opt.second_step()
        masks.append(opt.masks())
    for a, b in zip(*masks):
        assert torch.equal(a, b), first_mismatch(a, b)
    assert int(masks[1][0].sum()) == 16 * 8 // 2  # 2 of every 4 along the input dimension


def test_rho_schedule_reuses_the_plan_and_applies_each_rho(backend, monkeypatch):
    # GSAM changes rho at every step with the learning rate: the device tables must be built once, and
    # each step must still perturb with that step's rho (weights match the torch backend's).
    import fsam_kernels.backends.triton_backend as tb
    from fsam_kernels import GSAM

    built = []
    monkeypatch.setattr(tb, "_LayoutPlan", lambda layout, _cls=tb._LayoutPlan: built.append(1) or _cls(layout))
    torch.manual_seed(3)
    nets = [TinyNet(), TinyNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    loss_fn = torch.nn.CrossEntropyLoss()
    rhos = {}
    for name, net in zip(("triton", "torch"), nets):
        opt = GSAM(net.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.01, lr=0.1, alpha=0.3, sparsity=0.5,
                   backend=name)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        seen = []
        for x, y in make_batches(n_batches=3, seed=7):
            seen.append(opt.current_rho()[0])
            loss_fn(net(x), y).backward()
            opt.step(lambda: loss_fn(net(x), y).backward())
            opt.zero_grad()
            sched.step()
        rhos[name] = seen
    assert len(set(rhos["triton"])) == 3 and rhos["triton"] == rhos["torch"]
    assert len(built) == 1, f"{len(built)} Triton plans built for one set of tensors"
    for (n, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


# ----------------------------------------------------------------------------- sharded top-k primitives
def _tied_scores(sizes, dtype, levels, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        s = torch.randn(n, generator=g)
        if levels is not None:
            s = torch.randint(0, levels, (n,), generator=g).float() * 0.5
        out.append(s.to(dtype))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("square", [True, False])
def test_key_histogram_matches_the_reference(backend, dtype, square):
    sizes = [1, 7, 0, 123, 4097]
    scores = _tied_scores(sizes, dtype, None, seed=11)
    if not square:
        scores = [s.abs() for s in scores]
    layout = make_layout(sizes, dtype)
    keys = torch.cat([ref.fisher_key(s, square) for s in scores]).to(torch.int64)
    # the first pass, then prefixes that hold keys (the largest key's, a middle key's) and one that holds none
    cases = [(0, 24)]
    for key in (int(keys.max()), int(keys.sort().values[keys.numel() // 2])):
        cases += [(key >> 24, 16), (key >> 16, 8), (key >> 8, 0)]
    cases += [(0x7F, 16), (1 << 8, 16), (1 << 40, 0)]  # prefixes no key can have (keys < 2**31)
    for prefix, shift in cases:
        want = ref.key_histogram_reference(layout, scores, square, prefix, shift, 8)
        got = backend.key_histogram(layout, scores, square, prefix, shift, 8)
        assert got.dtype == torch.int64 and torch.equal(got, want), (prefix, shift)
    # other digit widths: 4 bits run in the kernel, 12 go to the reference
    for bits in (4, 12):
        want = ref.key_histogram_reference(layout, scores, square, 0, 32 - bits, bits)
        assert torch.equal(backend.key_histogram(layout, scores, square, 0, 32 - bits, bits), want)
    with pytest.raises(ValueError, match="shift"):
        backend.key_histogram(layout, scores, square, 0, 30, 8)


@pytest.mark.parametrize("levels", [None, 3, 1], ids=["distinct", "3-levels", "all-equal"])
def test_mask_from_threshold_matches_the_reference(backend, levels):
    sizes = [4097, 0, 7, 1100, 1]
    scores = _tied_scores(sizes, torch.float32, levels, seed=12)
    layout = make_layout(sizes)
    keys = [ref.fisher_key(s, True).to(torch.int64) for s in scores]
    flat = torch.cat(keys)
    for threshold in (int(flat.median()), int(flat.max()), int(flat.min())):
        ties = [int((k == threshold).sum()) for k in keys]
        for quotas in ([0] * len(sizes), ties, [t // 2 + (t % 3) % 2 for t in ties]):
            want = ref.mask_from_threshold_reference(layout, scores, True, threshold, quotas)
            assert_same_mask(layout, backend.mask_from_threshold(layout, scores, True, threshold, quotas), want)
    with pytest.raises(ValueError, match="quotas"):
        backend.mask_from_threshold(layout, scores, True, 0, [0])


@pytest.mark.parametrize("levels", [None, 2], ids=["distinct", "2-levels"])
def test_select_by_histogram_equals_the_reference_mask(backend, levels):
    from fsam_kernels import distributed_select as ds

    sizes = [600, 7, 2049]
    scores = _tied_scores(sizes, torch.float32, levels, seed=13)
    layout = make_layout(sizes)
    for k in (1, 500, 1328, 2656):
        want = ref.select_mask_reference(layout, scores, k, True)
        assert_same_mask(layout, ds.select_mask_by_histogram(backend, layout, scores, k, True), want)


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_key_histogram_and_threshold_mask_on_views_of_a_flat_buffer(backend, offset):
    from fsam_kernels import distributed_select as ds

    sizes = [4096 * 2 + 8, 3]
    layout = make_layout(sizes, torch.bfloat16)
    scores = _views_into_one_buffer(sizes, torch.bfloat16, offset, seed=14)
    want = ref.key_histogram_reference(layout, scores, True, 0, 24, 8)
    assert torch.equal(backend.key_histogram(layout, scores, True, 0, 24, 8), want)
    threshold = int(torch.cat([ref.fisher_key(s, True) for s in scores]).median())
    quotas = [1, 0]
    want = ref.mask_from_threshold_reference(layout, scores, True, threshold, quotas)
    assert_same_mask(layout, backend.mask_from_threshold(layout, scores, True, threshold, quotas), want)


def test_sharded_select_pass_by_pass(backend):
    from conftest import check_sharded_select

    layout = make_layout([600, 7, 5000, 2049])
    check_sharded_select(backend, layout, _tied_scores([600, 7, 5000, 2049], torch.float32, 4, seed=17),
                         layout.k_for(0.9))
