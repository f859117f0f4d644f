"""The Triton backend's own checks under the Triton interpreter (CPU tensors): device support, fp64
through the reference, its argument checks, the select's sampled bracket, repair path and radix passes
with shrunk constants, the per-chunk prefix counts, the saved buffer's order, the plan cache. Its
results against the reference, on every target, are in test_backend_conformance.py (target
``triton-interpreter``).

The interpreter needs TRITON_INTERPRET=1 before the kernels are imported; conftest.py sets it for
every run that can select these tests. Shapes stay tiny: the interpreter runs every program in numpy.
"""
import pytest
import torch

pytest.importorskip("triton")

from fsam_kernels import reference as ref  # noqa: E402
from fsam_kernels.backends import BackendUnavailable, get_backend  # noqa: E402
from fsam_kernels.layout import ParamLayout  # noqa: E402

from helpers import TinyNet, assert_same_mask, first_mismatch, make_batches, views_into_one_buffer  # noqa: E402

SIZES = [1, 7, 123, 4097]


@pytest.fixture(scope="module")
def backend():
    try:
        return get_backend("triton", "cpu")
    except BackendUnavailable as exc:  # e.g. TRITON_INTERPRET=0, or Triton imported before it was set
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_aligned16_tells_views_at_odd_offsets(dtype):
    # the 128-bit load path is taken only when every tensor starts on 16 bytes
    from fsam_kernels.triton_kernels.tables import aligned16

    flat = torch.zeros(1 + 4096 * 3 + 8, dtype=dtype)
    for offset in (0, 1):
        views = [flat[offset : offset + 4096 * 2 + 8], flat[offset + 4096 * 2 + 8 : offset + 4096 * 3 + 8]]
        assert aligned16(views) == (offset == 0)


@pytest.mark.parametrize("split", [1, 2, 4])
def test_perturb_and_restore_in_sub_blocks(backend, monkeypatch, split):
    # PERTURB_SPLIT takes a chunk in sub-blocks, the saved position carried from one to the next: the
    # same weights and the same compact saved buffer for every candidate launch shape.
    from fsam_kernels.triton_kernels import perturb as kernels

    monkeypatch.setattr(kernels, "PERTURB_SPLIT", split)
    sizes = [4096 + 1500, 3000]  # full and partial sub-blocks, a dense tensor
    params = views_into_one_buffer(sizes, torch.float32, 0, seed=5)
    grads = views_into_one_buffer(sizes, torch.float32, 0, seed=6)
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
    # (squares are summed in fp64); both within rounding of the reference.
    from fsam_kernels.triton_kernels.tables import aligned16

    sizes = [4096 * 2 + 8, 4096, 3]
    params = views_into_one_buffer(sizes, dtype, 0, seed=7)
    grads = views_into_one_buffer(sizes, dtype, 0, seed=8)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_alignment_in_one_launch_and_a_mask_at_an_odd_offset(backend, dtype):
    # One launch over a tensor on 16 bytes (the vector path, per tensor) and views at an odd offset (the
    # masked path), and a mask handed in as a view at an odd byte offset (the kernels read it in 32-bit
    # words): norm, mask counts, perturbation and restore as the reference's.
    from fsam_kernels.triton_kernels.tables import aligned16

    sizes = [4096 * 2 + 8, 4096, 3]
    params = [torch.randn(4097, generator=torch.Generator().manual_seed(5)).to(dtype)]
    params += views_into_one_buffer(sizes, dtype, 1, seed=7)
    grads = [torch.randn(4097, generator=torch.Generator().manual_seed(6)).to(dtype)]
    grads += views_into_one_buffer(sizes, dtype, 1, seed=8)
    assert aligned16(params[:1] + grads[:1]) and not any(aligned16([t]) for t in params[1:] + grads[1:])
    layout = ParamLayout(params, [True] * 4, [0.05] * 4, [True, False, True, False])
    want_bits = ref.select_mask_reference(layout, grads, 5000, True)
    bits = torch.zeros(want_bits.numel() + 1, dtype=torch.uint8)[1:]
    bits.copy_(want_bits)
    assert bits.data_ptr() % 4 != 0
    norm = backend.grad_norm(layout, grads)
    torch.testing.assert_close(norm, ref.grad_norm_reference(layout, grads), rtol=2e-6, atol=0)
    originals = [p.clone() for p in params]
    expected = [p.clone() for p in params]
    ref.perturb_reference(ParamLayout(expected, [True] * 4, [0.05] * 4, [True, False, True, False]), grads,
                          want_bits, norm, 1e-12)
    saved = backend.perturb(layout, grads, bits, backend.mask_aux(layout, bits), norm, 1e-12)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert torch.equal(p, e), f"params[{i}] perturbed: {first_mismatch(p, e)}"
    backend.restore(layout, bits, None, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] restored: {first_mismatch(p, o)}"


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
    scores = views_into_one_buffer(sizes, dtype, offset, seed=9)
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


# ----------------------------------------------------------------------------- mask
def _ties(layout, seed=0):
    # few distinct values (and many zeros): ties at the threshold in every case
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 3, (layout.numel[i],), generator=g).float() for i in layout.masked_index]


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


def test_saved_buffer_is_dense_then_masked_in_bit_order(backend):
    # one buffer per weight dtype: the dense tensors' originals, then the kept elements' in global bit order
    layout = make_layout(SIZES + [600, 33], masked=[True, True, False, True, True, False],
                         adaptive=[False, True, False, False, True, True])
    grads = rand_like_list(layout.params)
    bits = backend.select_mask(layout, [grads[i] for i in layout.masked_index], layout.n_masked // 10, True)
    _, _, _, saved, saved_ref = _perturb_both(backend, layout, grads, bits, backend.grad_norm(layout, grads))
    (buffer,) = saved.buffers.values()
    assert torch.equal(buffer, torch.cat([saved_ref[i] for i in layout.dense_index + layout.masked_index]))


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


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
def test_key_histogram_and_threshold_mask_on_views_of_a_flat_buffer(backend, offset):

    sizes = [4096 * 2 + 8, 3]
    layout = make_layout(sizes, torch.bfloat16)
    scores = views_into_one_buffer(sizes, torch.bfloat16, offset, seed=14)
    want = ref.key_histogram_reference(layout, scores, True, 0, 24, 8)
    assert torch.equal(backend.key_histogram(layout, scores, True, 0, 24, 8), want)
    threshold = int(torch.cat([ref.fisher_key(s, True) for s in scores]).median())
    quotas = [1, 0]
    want = ref.mask_from_threshold_reference(layout, scores, True, threshold, quotas)
    assert_same_mask(layout, backend.mask_from_threshold(layout, scores, True, threshold, quotas), want)


