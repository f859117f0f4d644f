"""The native (C++) ops on the CPU against the pure-torch reference, op by op, plus opcheck.

Masks and restored weights must match bit for bit; perturbed weights match exactly too on the CPU
(same fp32 formula, same roundings); the gradient norm within fp32 rounding (another summation order).
"""
import os

import pytest
import torch

from fsam_kernels import reference as ref
from fsam_kernels.layout import ParamLayout
from conftest import first_mismatch, halfway_case
from native_op_cases import OPS, opcheck_cases
from plain_fsam import plain_topk_masks

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [[1], [7], [123], [4097], [3, 50, 1, 20], [5] * 40, list(range(1, 51))]


@pytest.fixture(scope="module")
def native():
    if os.environ.get("FSAM_NO_NATIVE") == "1":
        pytest.skip("FSAM_NO_NATIVE=1: the native extension is not built")
    from fsam_kernels.backends.native_backend import NativeBackend

    return NativeBackend()


def ops():
    return torch.ops.fsam_kernels


def layout_of(tensors, masked=None, adaptive=False, rho=0.1):
    n = len(tensors)
    adaptive = adaptive if isinstance(adaptive, list) else [adaptive] * n
    rho = rho if isinstance(rho, list) else [rho] * n
    return ParamLayout(list(tensors), masked if masked is not None else [True] * n, rho, adaptive)


def random_tensors(sizes, dtype=torch.float32, seed=0, quantize=True):
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g) for s in sizes]
    if quantize:  # few distinct values: ties at the threshold are common
        ts = [torch.round(t * 4) / 4 for t in ts]
    return [t.to(dtype) for t in ts]


def assert_same_bits(got, want, layout):
    assert got.dtype == torch.uint8 and got.shape == want.shape
    if not torch.equal(got, want):
        for j, (a, b) in enumerate(zip(ref.unpack_mask(layout, got), ref.unpack_mask(layout, want))):
            assert torch.equal(a, b), f"masked tensor {j}: {first_mismatch(a.to(torch.uint8), b.to(torch.uint8))}"
        pytest.fail(f"packed masks differ outside the tensors (padding bits): {first_mismatch(got, want)}")


# ------------------------------------------------------------------------------------------ mask
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}x{s[0]}..{s[-1]}")
@pytest.mark.parametrize("keep", [0.0, 0.013, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["batch", "accum"])
def test_select_mask_matches_reference(native, sizes, keep, dtype, square):
    scores = random_tensors(sizes, dtype, seed=sum(sizes))
    if not square:
        scores = [s.float().abs() for s in scores]  # an fp32 accumulator is non-negative
    lay = layout_of(scores)
    k = lay.k_for(1 - keep)
    got = native.select_mask(lay, scores, k, square)
    assert_same_bits(got, ref.select_mask_reference(lay, scores, k, square), lay)
    assert ref.mask_popcount(got) == k


def test_select_mask_matches_sort_oracle(native):
    scores = random_tensors([33, 1, 600, 7], seed=3)
    lay = layout_of(scores)
    for k in (0, 1, 2, 17, 100, lay.n_masked - 1, lay.n_masked):
        got = ref.unpack_mask(lay, native.select_mask(lay, scores, k, True))
        want = plain_topk_masks([s * s for s in scores], k)
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"k={k}: {first_mismatch(a.to(torch.uint8), b.to(torch.uint8))}"


@pytest.mark.parametrize("scores_kind", ["spread", "clustered"])
@pytest.mark.parametrize("k_at", ["inside_ties", "tie_boundary"])
def test_select_mask_on_large_inputs_matches_reference(native, scores_kind, k_at):
    # Beyond 2**16 keys the CPU op chooses its path by how many keys share the top 11-bit digit with
    # the threshold: spread scores leave few (copied, selected in memory), clustered ones (a quarter
    # of the keys equal to the threshold) too many (two more histogram passes). Either way, the ties
    # at the threshold are split (inside_ties) or all taken (tie_boundary).
    g = torch.Generator().manual_seed(7)
    sizes = [300_000, 5, 250_001]
    scores = [torch.round(torch.randn(n, generator=g) * 64) / 64 for n in sizes]  # ties everywhere
    lay = layout_of(scores)
    if scores_kind == "clustered":
        scores[0][::2] = 1.5
        level = torch.tensor(2.25)
    keys = torch.cat(scores).square()
    if scores_kind == "spread":
        level = keys.sort(descending=True).values[lay.n_masked // 10]
    above, at = int((keys > level).sum()), int((keys == level).sum())
    assert at > 1
    k = above + at // 2 if k_at == "inside_ties" else above + at
    got = native.select_mask(lay, scores, k, True)
    assert_same_bits(got, ref.select_mask_reference(lay, scores, k, True), lay)
    assert ref.mask_popcount(got) == k


def test_tie_rule_is_lowest_global_index_first(native):
    a = torch.tensor([1.0, 2.0, 2.0, 0.0])
    b = torch.tensor([2.0, 3.0, 2.0])
    lay = layout_of([a, b])
    masks = ref.unpack_mask(lay, native.select_mask(lay, [a, b], 3, scores_are_grads=False))
    assert masks[0].tolist() == [False, True, True, False]
    assert masks[1].tolist() == [False, True, False]


def test_all_zero_scores_take_the_first_k(native):
    ts = [torch.zeros(10), torch.zeros(600), torch.zeros(6)]
    lay = layout_of(ts)
    for k in (1, 12, 609, 616):
        bits = native.select_mask(lay, ts, k, scores_are_grads=True)
        assert_same_bits(bits, ref.select_mask_reference(lay, ts, k, scores_are_grads=True), lay)


def test_special_values_order_like_the_reference(native):
    # -0.0 has the smallest int32 key; denormals, inf and the largest finite value keep their order.
    s = torch.tensor([0.0, -0.0, 1e-45, 1e-40, float("inf"), 3.4e38, 1.0, -0.0, 0.0, 2.0])
    lay = layout_of([s])
    for k in range(s.numel() + 1):
        assert_same_bits(native.select_mask(lay, [s], k, False), ref.select_mask_reference(lay, [s], k, False), lay)


def test_batch_key_is_g_squared_in_fp32(native):
    g = torch.tensor([1e-30, 2e-30, 3.0])  # both tiny squares are 0 in fp32: a tie, lowest index wins
    lay = layout_of([g])
    assert ref.unpack_mask(lay, native.select_mask(lay, [g], 2, True))[0].tolist() == [True, False, True]


def test_select_is_global_not_per_tensor(native):
    small, big = torch.full((10,), 1.0), torch.full((10,), 5.0)
    lay = layout_of([small, big])
    masks = ref.unpack_mask(lay, native.select_mask(lay, [small, big], 10, False))
    assert not masks[0].any() and masks[1].all()


def test_mask_block_prefix_counts_set_bits(native):
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 256, (64 * 7,), dtype=torch.uint8, generator=g)
    prefix = ops().mask_block_prefix(bits)
    per_block = [ref.mask_popcount(bits[64 * b : 64 * (b + 1)]) for b in range(7)]
    want = torch.tensor([0] + per_block).cumsum(0)
    assert prefix.dtype == torch.int64 and torch.equal(prefix, want)


def test_mask_aux_counts_per_tensor(native):
    scores = random_tensors([700, 3, 1500], seed=8)
    lay = layout_of(scores)
    bits = native.select_mask(lay, scores, 400, True)
    aux = native.mask_aux(lay, bits)
    assert aux.counts == [int(m.sum()) for m in ref.unpack_mask(lay, bits)]


# ------------------------------------------------------------------------------------------ Fisher
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fisher_accumulate_is_exact(native, dtype):
    grads = random_tensors([1, 7, 123, 4097], dtype, seed=2, quantize=False)
    acc_native = [torch.rand(g.shape) for g in grads]
    acc_ref = [a.clone() for a in acc_native]
    for _ in range(3):
        native.fisher_accumulate(acc_native, grads)
        ref.fisher_accumulate_reference(acc_ref, grads)
    for a, b in zip(acc_native, acc_ref):
        assert torch.equal(a, b), first_mismatch(a, b)


# ------------------------------------------------------------------------------------ norm, perturb
def perturb_case(sizes, dtype, masked, adaptive, with_grad=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in sizes]
    if with_grad is not None:
        grads = [gr if keep else None for gr, keep in zip(grads, with_grad)]
    lay = layout_of(params, masked=masked, adaptive=adaptive, rho=[0.05 * (i + 1) for i in range(len(sizes))])
    return lay, params, grads


def check_norm_perturb_restore(native, lay, params, grads, bits):
    """The native norm within rounding of the reference's, then with that norm the reference's
    perturbed weights bit for bit, then the originals back bit for bit."""
    originals = [p.clone() for p in params]
    norm = native.grad_norm(lay, grads)
    assert norm.dtype == ref.grad_norm_reference(lay, grads).dtype
    torch.testing.assert_close(norm, ref.grad_norm_reference(lay, grads), rtol=2e-6, atol=0)
    ref.perturb_reference(lay, grads, bits, norm, 1e-12)
    want = [p.clone() for p in params]
    for p, o in zip(params, originals):
        p.copy_(o)
    aux = None if bits is None else native.mask_aux(lay, bits)
    saved = native.perturb(lay, grads, bits, aux, norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, want)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    native.restore(lay, bits, aux, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_grad_norm_matches_reference(native, dtype, adaptive):
    lay, _, grads = perturb_case([1, 7, 123, 4097, (9, 11)], dtype, None, adaptive)
    got, want = native.grad_norm(lay, grads), ref.grad_norm_reference(lay, grads)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_grad_norm_skips_missing_grads_and_handles_none(native):
    lay, _, grads = perturb_case([5, 6, 7], torch.float32, None, False, with_grad=[True, False, True])
    torch.testing.assert_close(native.grad_norm(lay, grads), ref.grad_norm_reference(lay, grads), rtol=2e-6, atol=0)
    assert native.grad_norm(lay, [None] * 3).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("keep", [0.0, 0.1, 1.0])
def test_perturb_and_restore_match_reference(native, dtype, adaptive, keep):
    sizes = [1, 7, 123, 4097, (3, 50), 20, 70001]  # the last spans three CPU chunks, the third partial
    masked = [True, True, False, True, True, False, True]  # two dense tensors in between
    with_grad = [True, True, True, True, False, True, True]
    lay, params, grads = perturb_case(sizes, dtype, masked, adaptive, with_grad=with_grad)
    originals = [p.clone() for p in params]
    scores = [grads[i] if grads[i] is not None else torch.zeros_like(params[i]) for i in lay.masked_index]
    k = lay.k_for(1 - keep)
    bits = native.select_mask(lay, scores, k, True)
    norm = ref.grad_norm_reference(lay, grads)

    ref.perturb_reference(lay, grads, bits, norm, 1e-12)
    want = [p.clone() for p in params]
    for p, o in zip(params, originals):
        p.copy_(o)

    aux = native.mask_aux(lay, bits)
    saved = native.perturb(lay, grads, bits, aux, norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, want)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    # compact: k masked values (of tensors with a gradient) + every element of dense tensors with one
    masks = ref.unpack_mask(lay, bits)
    expected = sum(int(m.sum()) for j, m in enumerate(masks) if grads[lay.masked_index[j]] is not None)
    expected += sum(lay.numel[i] for i in lay.dense_index if grads[i] is not None)
    assert native.saved_nbytes(saved) == expected * params[0].element_size()

    native.restore(lay, bits, aux, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


def test_dense_tensors_larger_than_one_cpu_chunk(native):
    """Dense (unmasked) tensors of 70,001 elements span three 32,768-element CPU chunks: saved
    originals, perturbed values, the norm and the Fisher accumulator at chunk-absolute positions."""
    sizes, adaptive = [70001, 5, 70001], [False, False, True]
    lay, params, grads = perturb_case(sizes, torch.float32, [False] * 3, adaptive, seed=4)
    check_norm_perturb_restore(native, lay, params, grads, None)
    acc_native = [torch.rand(g.shape) for g in grads]
    acc_ref = [a.clone() for a in acc_native]
    native.fisher_accumulate(acc_native, grads)
    ref.fisher_accumulate_reference(acc_ref, grads)
    for i, (a, b) in enumerate(zip(acc_native, acc_ref)):
        assert torch.equal(a, b), f"accum[{i}]: {first_mismatch(a, b)}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_perturbation_halfway_between_two_values_rounds_to_nearest_even(native, dtype):
    layout, grads, norm, want = halfway_case(dtype)
    native.perturb(layout, grads, None, None, norm, 1e-12)
    assert torch.equal(layout.params[0], want), first_mismatch(layout.params[0], want)


def test_perturb_scale_rounds_like_the_reference(native):
    """scale = fl32(1 / (norm + eps)) * fl32(rho): many random (rho, norm, eps), SAM and ASAM, masked and
    dense, bit for bit. fl32(rho / denom) rounds once and differs in the last bit for some of them."""
    g = torch.Generator().manual_seed(21)
    sizes = [37, 600, 29, 41]  # masked SAM, masked ASAM, dense SAM, dense ASAM
    params0 = [torch.randn(s, generator=g) for s in sizes]
    grads = [torch.randn(s, generator=g) for s in sizes]

    def log_uniform(lo, hi, n):
        return (torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo).exp2().tolist()

    n = 300
    rhos, norms = log_uniform(-12, 4, 4 * n), log_uniform(-20, 14, n)
    epss = [1e-12, 1e-8, 0.0] + log_uniform(-30, -2, n)
    old_rule_differs = 0
    for t in range(n):
        rho, norm, eps = rhos[4 * t : 4 * t + 4], torch.tensor(norms[t], dtype=torch.float32), epss[t]
        params = [p.clone() for p in params0]
        lay = layout_of(params, masked=[True, True, False, False], adaptive=[False, True, False, True], rho=rho)
        bits = native.select_mask(lay, grads[:2], 300, True)
        ref.perturb_reference(lay, grads, bits, norm, eps)
        want = [p.clone() for p in params]
        for p, p0 in zip(params, params0):
            p.copy_(p0)
        native.perturb(lay, grads, bits, native.mask_aux(lay, bits), norm, eps)
        for i, (p, w) in enumerate(zip(params, want)):
            assert torch.equal(p, w), f"rho={rho[i]!r} norm={norms[t]!r} eps={eps!r} params[{i}]: {first_mismatch(p, w)}"
        denom = norm + eps
        r32 = torch.tensor(rho, dtype=torch.float32)
        old_rule_differs += int((r32 / denom != denom.reciprocal() * r32).sum())
    assert old_rule_differs > 0  # the triples do tell the two roundings apart


def test_perturb_with_a_nonfinite_norm_touches_nothing(native):
    lay, params, grads = perturb_case([10, 600], torch.float32, [True, False], False)
    originals = [p.clone() for p in params]
    bits = native.select_mask(lay, [grads[0]], 5, True)
    aux = native.mask_aux(lay, bits)
    for bad in (float("nan"), float("inf")):
        saved = native.perturb(lay, grads, bits, aux, torch.tensor(bad), 1e-12)
        native.restore(lay, bits, aux, saved)
        for p, o in zip(params, originals):
            assert torch.equal(p, o)


def test_perturb_of_dense_only_layout(native):
    lay, params, grads = perturb_case([10, 3], torch.float32, [False, False], True)
    originals = [p.clone() for p in params]
    norm = native.grad_norm(lay, grads)
    saved = native.perturb(lay, grads, None, None, norm, 1e-12)
    assert all(not torch.equal(p, o) for p, o in zip(params, originals))
    native.restore(lay, None, None, saved)
    assert all(torch.equal(p, o) for p, o in zip(params, originals))


# ------------------------------------------------------------------------------------------ input checks
def test_bad_inputs_name_the_op_and_argument(native):
    acc, g = [torch.zeros(4)], [torch.zeros(4)]
    with pytest.raises(TypeError, match=r"fisher_accumulate: expected accum\[0\] of dtype float32"):
        ops().fisher_accumulate([torch.zeros(4, dtype=torch.float16)], g)
    with pytest.raises(TypeError, match=r"fisher_accumulate: expected grads\[0\] of dtype"):
        ops().fisher_accumulate(acc, [torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(ValueError, match=r"fisher_accumulate: grads\[0\] has 5 elements"):
        ops().fisher_accumulate(acc, [torch.zeros(5)])
    with pytest.raises(ValueError, match=r"fisher_accumulate: expected grads\[0\] to be contiguous"):
        ops().fisher_accumulate([torch.zeros(4)], [torch.zeros(8)[::2]])
    with pytest.raises(ValueError, match=r"select_mask: expected 0 <= k <= 4, got k=5"):
        ops().select_mask([torch.zeros(4)], [0], 64, 5, True)
    with pytest.raises(ValueError, match=r"select_mask: expected bit_offsets\[1\] to be a non-negative multiple of 512"):
        ops().select_mask([torch.zeros(4), torch.zeros(4)], [0, 8], 128, 1, True)
    with pytest.raises(ValueError, match=r"select_mask: bit_offsets\[0\] \+ numel"):
        ops().select_mask([torch.zeros(600)], [0], 64, 1, True)
    with pytest.raises(TypeError, match=r"mask_block_prefix: expected bits of dtype uint8"):
        ops().mask_block_prefix(torch.zeros(64))
    with pytest.raises(ValueError, match=r"grad_norm: expected params, grads and adaptive of the same length"):
        ops().grad_norm([torch.zeros(3)], [torch.zeros(3)], [True, False])


OVERLAPPING_OFFSETS = [
    # (sizes, bit_offsets, mask_bytes, the offending index, the smallest offset it may have)
    ([4, 4], [0, 0], 128, 1, 512),  # the same block
    ([600, 4], [0, 512], 192, 1, 1024),  # 600 bits run into the second block
    ([4, 4], [512, 0], 128, 1, 1024),  # out of order
    ([4, 700, 4], [0, 512, 1024], 256, 2, 1536),
]


@pytest.mark.parametrize("sizes,offsets,mask_bytes,bad,least", OVERLAPPING_OFFSETS)
def test_overlapping_or_unordered_bit_offsets_are_rejected(native, sizes, offsets, mask_bytes, bad, least):
    scores = [torch.randn(s) for s in sizes]
    msg = (rf"select_mask: expected bit_offsets\[{bad}\] >= {least} \(bit_offsets\[{bad - 1}\] \+ numel rounded up "
           rf"to 512 bits\): masked tensors must own increasing, non-overlapping bit ranges, got {offsets[bad]}")
    with pytest.raises(ValueError, match=msg):
        ops().select_mask(scores, offsets, mask_bytes, 1, True)
    # masked_perturb / masked_restore: a dense tensor (-1) in between does not count
    params = [torch.randn(s) for s in sizes]
    params.insert(bad, torch.randn(3))
    offs = offsets[:bad] + [-1] + offsets[bad:]
    counts = [3 if o == -1 else 0 for o in offs]
    saved, slots, starts = per_tensor_buffers(counts)
    before = [p.clone() for p in params]
    bits = torch.zeros(mask_bytes, dtype=torch.uint8)
    prefix = ops().mask_block_prefix(bits)
    norm = torch.tensor(1.0)
    msg = rf"expected bit_offsets\[{bad + 1}\] >= {least} \(bit_offsets\[{bad - 1}\] .*non-overlapping"
    with pytest.raises(ValueError, match="masked_perturb: " + msg):
        ops().masked_perturb(params, [torch.ones_like(p) for p in params], saved, slots, starts, counts, bits, prefix,
                             offs, [0.1] * len(params), [False] * len(params), norm, 0.0)
    with pytest.raises(ValueError, match="masked_restore: " + msg):
        ops().masked_restore(params, saved, slots, starts, counts, bits, prefix, offs, norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def per_tensor_buffers(counts, dtype=torch.float32):
    """One saved buffer per tensor (the ops also take several buffers of a dtype): (saved, slots, offsets)."""
    return [torch.empty(c, dtype=dtype) for c in counts], list(range(len(counts))), [0] * len(counts)


def test_layout_offsets_are_accepted(native):
    # what ParamLayout produces: tensors back to back, each from the next 512-bit boundary
    ts = [torch.randn(s) for s in (512, 1, 513, 7)]
    lay = layout_of(ts)
    assert lay.bit_offset == [0, 512, 1024, 2048]
    assert_same_bits(native.select_mask(lay, ts, 100, True), ref.select_mask_reference(lay, ts, 100, True), lay)


def test_bad_saved_buffer_is_rejected_and_weights_unchanged(native):
    w, g = torch.randn(600), torch.randn(600)
    lay = layout_of([w])
    bits = native.select_mask(lay, [g], 10, True)
    prefix = ops().mask_block_prefix(bits)
    before = w.clone()
    with pytest.raises(ValueError, match=r"masked_perturb: saved\[0\] must hold the 10 originals of params\[0\]"):
        ops().masked_perturb([w], [g], [torch.empty(9)], [0], [0], [10], bits, prefix, [0], [0.1], [False],
                             torch.tensor(1.0), 0.0)
    with pytest.raises(TypeError, match=r"masked_perturb: expected saved\[0\] \(the buffer of params\[0\]\) of dtype"):
        ops().masked_perturb([w], [g], [torch.empty(10, dtype=torch.float16)], [0], [0], [10], bits, prefix, [0], [0.1],
                             [False], torch.tensor(1.0), 0.0)
    with pytest.raises(ValueError, match=r"masked_restore: expected block_prefix"):
        ops().masked_restore([w], [torch.empty(10)], [0], [0], [10], bits, prefix[:-1], [0], torch.tensor(1.0))
    assert torch.equal(w, before)


def saved_count_cases():
    """(the op's args with a bad saved_counts / saved, the error) for masked_perturb and masked_restore."""
    g = torch.Generator().manual_seed(13)
    w = [torch.randn(s, generator=g) for s in (600, 5)]
    gr = [torch.randn(s, generator=g) for s in (600, 5)]
    bits = ref.pack_mask(layout_of(w[:1]), [torch.arange(600) % 60 == 0])  # 10 set bits
    prefix = torch.ops.fsam_kernels.mask_block_prefix(bits)
    cases = [  # (saved sizes, saved_slots, saved_offsets, saved_counts, grads present, error)
        ([9, 5], [0, 1], [0, 0], [10, 5], [1, 1], r"saved\[0\] must hold the 10 originals of params\[0\] from offset 0, but has 9"),
        ([20], [0, 0], [0, 16], [10, 5], [1, 1], r"saved\[0\] must hold the 5 originals of params\[1\] from offset 16, but has 20"),
        ([15], [0, 0], [0, 9], [10, 5], [1, 1], r"expected saved_offsets\[1\] >= 10 \(where the previous tensor's originals"),
        ([10, 5], [0, 2], [0, 0], [10, 5], [1, 1], r"expected saved_slots\[1\] in \[0, 2\) \(an index into saved\) or -1, got 2"),
        ([10, 4], [0, 1], [0, 0], [10, 4], [1, 1], r"expected saved_counts\[1\] of a dense tensor to be its numel 5, got 4"),
        ([10, 5], [0, 1], [0, 0], [10, 5, 0], [1, 1], r"expected one saved slot, offset and count per parameter \(2\), got 2, 2 and 3"),
        ([10, 5], [0, 1], [0], [10, 5], [1, 1], r"expected one saved slot, offset and count per parameter \(2\), got 2, 1 and 2"),
        ([0, 5], [0, 1], [0, 0], [-1, 5], [1, 1], r"expected saved_counts\[0\] \(the set mask bits of params\[0\]\) in \[0, 600\], got -1"),
        ([10, 5], [0, 1], [0, 0], [601, 5], [1, 1], r"expected saved_counts\[0\] \(the set mask bits of params\[0\]\) in \[0, 600\], got 601"),
        ([10, 5], [0, 1], [0, 0], [10, 5], [1, 0], r"expected grads\[1\] to be a tensor, as saved_slots\[1\] is 1", "perturb"),
        ([10, 5], [0, -1], [0, 0], [10, 5], [1, 1], r"expected grads\[1\] to be None, as saved_slots\[1\] is -1", "perturb"),
    ]
    for sizes, slots, offsets, counts, present, error, *only in cases:
        saved = [torch.empty(n) for n in sizes]
        norm = torch.tensor(1.0)
        grads = [g if keep else None for g, keep in zip(gr, present)]
        yield ("masked_perturb", (w, grads, saved, slots, offsets, counts, bits, prefix, [0, -1], [0.1, 0.1],
                                  [False, True], norm, 0.0), error)
        if not only:
            yield ("masked_restore", (w, saved, slots, offsets, counts, bits, prefix, [0, -1], norm), error)


@pytest.mark.parametrize("case", range(20))
def test_saved_counts_are_checked_by_the_op(native, case):
    name, args, error = list(saved_count_cases())[case]
    before = [p.clone() for p in args[0]]
    with pytest.raises(ValueError, match=f"fsam_kernels::{name}: {error}"):
        getattr(ops(), name)(*args)
    assert all(torch.equal(p, b) for p, b in zip(args[0], before))


def test_set_padding_bits_are_not_read_as_elements(native):
    # Bits between one tensor's end and the next block belong to no element (a mask loaded from a
    # checkpoint may have them set); the kernels read whole 64-bit words and must ignore them.
    sizes = [7, 70001, 100]
    lay, params, grads = perturb_case(sizes, torch.float32, None, False)
    g = torch.Generator().manual_seed(5)
    clean = ref.pack_mask(lay, [torch.rand(s, generator=g) < 0.3 for s in sizes])
    dirty = clean.clone()
    for t, n in enumerate(sizes):
        for b in range(lay.bit_offset[t] + n, lay.bit_offset[t] + n + 130):
            if b < dirty.numel() * 8:
                dirty[b // 8] |= 1 << (b % 8)
    assert not torch.equal(dirty, clean)
    norm = ref.grad_norm_reference(lay, grads)
    originals = [p.clone() for p in params]
    aux = native.mask_aux(lay, clean)
    saved = native.perturb(lay, grads, clean, aux, norm, 1e-12)
    want = [p.clone() for p in params]
    native.restore(lay, clean, aux, saved)
    for p, o in zip(params, originals):
        assert torch.equal(p, o)
    # the block prefix counts of the dirty mask include the padding bits, so the op gets counts
    # (aux) derived from the clean mask, as the optimizer's own checked mask would give them
    prefix = ops().mask_block_prefix(clean)
    counts = [int(m.sum()) for m in ref.unpack_mask(lay, clean)]
    saved, slots, starts = per_tensor_buffers(counts)
    offsets = list(lay.bit_offset)
    ops().masked_perturb(params, grads, saved, slots, starts, counts, dirty, prefix, offsets, list(lay.rho), [False] * 3,
                         norm, 1e-12)
    for i, (p, w) in enumerate(zip(params, want)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    ops().masked_restore(params, saved, slots, starts, counts, dirty, prefix, offsets, norm)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


def mixed_dtype_case(with_grad):
    """fp32 and bf16 weights, masked and dense, some without a gradient; a mask from their gradients."""
    g = torch.Generator().manual_seed(21)
    sizes, dtypes = [700, 40, 1500, 9, 600], [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]
    params = [torch.randn(n, generator=g).to(d) for n, d in zip(sizes, dtypes)]
    grads = [torch.randn(n, generator=g).to(d) if keep else None for n, d, keep in zip(sizes, dtypes, with_grad)]
    lay = layout_of(params, masked=[True, False, True, False, True], rho=[0.05, 0.1, 0.2, 0.3, 0.4])
    scores = [torch.randn(lay.numel[i], generator=g) for i in lay.masked_index]
    return lay, params, grads, ref.select_mask_reference(lay, scores, 500, True)


@pytest.mark.parametrize("with_grad", [[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], ids=["all-grads", "some-none"])
def test_originals_are_saved_in_one_compact_buffer_per_dtype(native, with_grad):
    lay, params, grads, bits = mixed_dtype_case(with_grad)
    originals = [p.clone() for p in params]
    norm = ref.grad_norm_reference(lay, grads)
    want = ref.perturb_reference(lay, grads, bits, norm, 1e-12)  # the reference's saved originals
    perturbed = [p.clone() for p in params]
    for p, o in zip(params, originals):
        p.copy_(o)
    aux = native.mask_aux(lay, bits)
    saved = native.perturb(lay, grads, bits, aux, norm, 1e-12)
    assert [b.dtype for b in saved.buffers] == [torch.float32, torch.bfloat16]
    assert [b.numel() for b in saved.buffers] == [
        sum(w.numel() for w, p in zip(want, params) if w is not None and p.dtype == d) for d in (torch.float32, torch.bfloat16)]
    for i, (p, w) in enumerate(zip(params, perturbed)):
        assert torch.equal(p, w), f"params[{i}] after perturb: {first_mismatch(p, w)}"
    # what a restore into replaced storage writes back: the reference's format, bit for bit
    got = native.saved_originals(lay, bits, aux, saved)
    for i, (a, b) in enumerate(zip(got, want)):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"originals of params[{i}]"
    native.restore(lay, bits, aux, saved)
    for i, (p, o) in enumerate(zip(params, originals)):
        assert torch.equal(p, o), f"params[{i}] after restore: {first_mismatch(p, o)}"


def test_saved_ranges_are_built_once_per_mask_and_missing_gradients(native):
    lay, params, grads, bits = mixed_dtype_case([1, 1, 1, 1, 1])
    aux = native.mask_aux(lay, bits)
    norm = ref.grad_norm_reference(lay, grads)
    first = native.perturb(lay, grads, bits, aux, norm, 1e-12)
    native.restore(lay, bits, aux, first)
    again = native.perturb(lay.with_rho([0.5] * 5), [g.clone() for g in grads], bits, aux, norm, 1e-12)
    native.restore(lay, bits, aux, again)
    assert again.ranges is first.ranges and again.plan is first.plan  # rho and gradients changed, nothing else
    fewer = native.perturb(lay, [None] + grads[1:], bits, aux, norm, 1e-12)
    native.restore(lay, bits, aux, fewer)
    assert fewer.ranges is not first.ranges and fewer.ranges.slots[0] == -1


def test_step_runs_the_same_few_aten_ops_whatever_the_number_of_tensors(native):
    # The cost: a detach, a contiguous and a saved-buffer allocation per tensor every step.
    from torch.profiler import ProfilerActivity, profile

    def top_level_aten_ops(n_tensors):
        lay, params, grads = perturb_case([300] * n_tensors, torch.float32, [j % 2 == 0 for j in range(n_tensors)], False)
        bits = native.select_mask(lay, [grads[i] for i in lay.masked_index], 50, True)
        aux = native.mask_aux(lay, bits)

        def step():
            norm = native.grad_norm(lay, grads)
            native.restore(lay, bits, aux, native.perturb(lay, grads, bits, aux, norm, 1e-12))

        step()  # the per-layout lists are built once, here
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return sum(1 for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::"))

    few, many = top_level_aten_ops(4), top_level_aten_ops(40)
    assert few == many <= 4, (few, many)


def test_strided_gradients_are_read_in_place_of_a_copy_by_the_caller(native):
    lay, params, grads = perturb_case([300, 7, 1000], torch.float32, [True, False, True], True)
    strided = [torch.stack([g, torch.zeros_like(g)], 1)[:, 0] for g in grads]
    assert not any(g.is_contiguous() for g in strided)
    bits = native.select_mask(lay, [grads[i] for i in lay.masked_index], 200, True)
    assert torch.equal(ops().grad_norm(params, strided, [True] * 3), ops().grad_norm(params, grads, [True] * 3))
    check_norm_perturb_restore(native, lay, params, strided, bits)


def test_counts_that_disagree_with_the_mask_stay_inside_saved(native):
    # The op trusts saved_counts to be the mask's popcounts (it does not read the mask on the host, on
    # any device); when they are not, it must still never write past saved.
    w, g = torch.randn(600), torch.randn(600)
    bits = ref.pack_mask(layout_of([w]), [torch.arange(600) % 60 == 0])  # 10 set bits
    prefix = ops().mask_block_prefix(bits)
    buf = torch.full((12,), 123.0)
    saved = buf[:4]  # claims 4 of the 10
    ops().masked_perturb([w], [g], [saved], [0], [0], [4], bits, prefix, [0], [0.1], [False], torch.tensor(1.0), 0.0)
    assert torch.equal(buf[4:], torch.full((8,), 123.0))
    ops().masked_restore([w], [saved], [0], [0], [4], bits, prefix, [0], torch.tensor(1.0))


# ------------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("op", OPS)
def test_opcheck(native, op):
    args = opcheck_cases("cpu")[op]
    torch.library.opcheck(getattr(torch.ops.fsam_kernels, op), args)


def test_float64_on_the_cpu_matches_reference(native):
    lay, params, grads = perturb_case([7, 600], torch.float64, [True, False], True)
    bits = native.select_mask(lay, [grads[0]], 3, True)
    assert_same_bits(bits, ref.select_mask_reference(lay, [grads[0]], 3, True), lay)
    check_norm_perturb_restore(native, lay, params, grads, bits)


def test_nm_mask_goes_through_the_native_op(native):
    scores = random_tensors([(4, 8), (5,), (2, 16)], seed=12)
    lay = layout_of([torch.zeros(s.shape) for s in scores])
    got = native.select_nm_mask(lay, scores, 2, 4, True)
    assert_same_bits(got, ref.select_nm_mask_reference(lay, scores, 2, 4, True), lay)


# ------------------------------------------------------------------------------------------ sharded top-k
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("square", [True, False], ids=["batch", "accum"])
def test_key_histogram_matches_reference(native, dtype, square):
    scores = random_tensors([1, 7, 0, 123, 40000, 4097], dtype, seed=13)
    if not square:
        scores = [s.abs() for s in scores]
    scores[4][:5000] = 0  # a tie block
    lay = layout_of([torch.zeros(s.shape) for s in scores])
    keys = torch.cat([ref.fisher_key(s, square) for s in scores]).to(torch.int64)
    cases = [(0, 24, 8), (0, 16, 16), (0, 28, 4), (5, 24, 8)]  # the last: a top pass with a prefix matches nothing
    for key in (int(keys.max()), int(keys.median()), 0):
        cases += [(key >> 24, 16, 8), (key >> 16, 8, 8), (key >> 8, 0, 8), (key >> 20, 9, 11), (12345, 0, 8)]
    for prefix, shift, bits in cases:
        want = ref.key_histogram_reference(lay, scores, square, prefix, shift, bits)
        got = native.key_histogram(lay, scores, square, prefix, shift, bits)
        assert got.dtype == torch.int64 and torch.equal(got, want), (prefix, shift, bits)
    # a prefix no key can have (keys < 2**31): nothing counted, as in the reference
    for prefix, shift, bits in ((1 << 8, 16, 8), (1 << 40, 0, 8)):
        want = ref.key_histogram_reference(lay, scores, square, prefix, shift, bits)
        assert int(want.sum()) == 0 and torch.equal(native.key_histogram(lay, scores, square, prefix, shift, bits), want)
    with pytest.raises(ValueError, match="key_histogram: expected 0 < radix_bits"):
        ops().key_histogram(scores, square, 0, 30, 8)
    with pytest.raises(ValueError, match="key_histogram: expected prefix >= 0"):
        ops().key_histogram(scores, square, -1, 0, 8)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_mask_from_threshold_matches_reference(native, dtype):
    scores = random_tensors([40000, 0, 7, 70000, 1], dtype, seed=14)
    lay = layout_of([torch.zeros(s.shape) for s in scores])
    keys = [ref.fisher_key(s, True).to(torch.int64) for s in scores]
    flat = torch.cat(keys)
    for threshold in (int(flat.median()), int(flat.max()), int(flat.min()), int(flat.max()) + 1):
        ties = [int((k == threshold).sum()) for k in keys]
        for quotas in ([0] * len(keys), ties, [t // 3 for t in ties], [min(t, 1) for t in ties]):
            want = ref.mask_from_threshold_reference(lay, scores, True, threshold, quotas)
            assert_same_bits(native.mask_from_threshold(lay, scores, True, threshold, quotas), want, lay)
    with pytest.raises(ValueError, match="quotas"):
        native.mask_from_threshold(lay, scores, True, 0, [0])
    with pytest.raises(ValueError, match=r"mask_from_threshold: expected quotas\[0\] in \[0, 40000\]"):
        ops().mask_from_threshold(scores, list(lay.bit_offset), lay.mask_bytes, True, 0, [40001, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="threshold key"):
        ops().mask_from_threshold(scores, list(lay.bit_offset), lay.mask_bytes, True, -1, [0] * 5)


def test_histogram_select_through_the_native_ops_equals_select_mask(native):
    from fsam_kernels import distributed_select as ds

    scores = random_tensors([600, 7, 70000, 2049], seed=15)
    lay = layout_of([torch.zeros(s.shape) for s in scores])
    n = lay.n_masked
    for k in (1, 500, n // 10, n // 2, n - 1, n):
        want = ref.select_mask_reference(lay, scores, k, True)
        assert_same_bits(ds.select_mask_by_histogram(native, lay, scores, k, True), want, lay)


def test_sharded_select_pass_by_pass(native):
    from conftest import check_sharded_select

    scores = random_tensors([600, 7, 70000, 0, 2049], seed=16)
    lay = layout_of([torch.zeros(s.shape) for s in scores])
    check_sharded_select(native, lay, scores, lay.k_for(0.9))
