"""The native (C++) backend's own checks on the CPU: opcheck of every op, the ops' argument checks
(and their fakes'), the CPU select's paths beyond 2**16 keys, CPU chunk boundaries, the block prefix
counts, fp64 through the reference. Its results against the reference, on every target, are in
test_backend_conformance.py (target ``native-cpu``).
"""
import os

import pytest
import torch

from fsam_kernels import reference as ref
from helpers import assert_same_mask, first_mismatch, layout_of, random_tensors
from native_op_cases import OPS, opcheck_cases


@pytest.fixture(scope="module")
def native():
    if os.environ.get("FSAM_NO_NATIVE") == "1":
        pytest.skip("FSAM_NO_NATIVE=1: the native extension is not built")
    from fsam_kernels.backends.native_backend import NativeBackend

    return NativeBackend()


def ops():
    return torch.ops.fsam_kernels


# ------------------------------------------------------------------------------------------ mask


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
    assert_same_mask(lay, got, ref.select_mask_reference(lay, scores, k, True))
    assert ref.mask_popcount(got) == k


def test_mask_block_prefix_counts_set_bits(native):
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 256, (64 * 7,), dtype=torch.uint8, generator=g)
    prefix = ops().mask_block_prefix(bits)
    per_block = [ref.mask_popcount(bits[64 * b : 64 * (b + 1)]) for b in range(7)]
    want = torch.tensor([0] + per_block).cumsum(0)
    assert prefix.dtype == torch.int64 and torch.equal(prefix, want)


def test_mask_aux_counts_per_tensor(native):
    scores = random_tensors([700, 3, 1500], seed=8, quantize=True)
    lay = layout_of(scores)
    bits = native.select_mask(lay, scores, 400, True)
    aux = native.mask_aux(lay, bits)
    assert aux["counts"] == [int(m.sum()) for m in ref.unpack_mask(lay, bits)]


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
    from fsam_kernels import _native_ops

    scores = [torch.randn(s) for s in sizes]
    msg = (rf"select_mask: expected bit_offsets\[{bad}\] >= {least} \(bit_offsets\[{bad - 1}\] \+ numel rounded up "
           rf"to 512 bits\): masked tensors must own increasing, non-overlapping bit ranges, got {offsets[bad]}")
    with pytest.raises(ValueError, match=msg):
        ops().select_mask(scores, offsets, mask_bytes, 1, True)
    with pytest.raises(ValueError, match=msg):  # the fake says the same, without data
        _native_ops._select_mask_fake(scores, offsets, mask_bytes, 1, True)
    # masked_perturb / masked_restore (and their fake): a dense tensor (-1) in between does not count
    params = [torch.randn(s) for s in sizes]
    params.insert(bad, torch.randn(3))
    offs = offsets[:bad] + [-1] + offsets[bad:]
    counts = [3 if o == -1 else 0 for o in offs]
    saved = [torch.empty(c) for c in counts]
    before = [p.clone() for p in params]
    bits = torch.zeros(mask_bytes, dtype=torch.uint8)
    prefix = ops().mask_block_prefix(bits)
    norm = torch.tensor(1.0)
    msg = rf"expected bit_offsets\[{bad + 1}\] >= {least} \(bit_offsets\[{bad - 1}\] .*non-overlapping"
    with pytest.raises(ValueError, match="masked_perturb: " + msg):
        ops().masked_perturb(params, [torch.ones_like(p) for p in params], saved, bits, prefix, offs, counts,
                             [0.1] * len(params), [False] * len(params), norm, 0.0)
    with pytest.raises(ValueError, match="masked_restore: " + msg):
        ops().masked_restore(params, saved, bits, prefix, offs, counts, norm)
    with pytest.raises(ValueError, match="masked_restore: " + msg):
        _native_ops._masked_restore_fake(params, saved, bits, prefix, offs, counts, norm)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_bad_saved_buffer_is_rejected_and_weights_unchanged(native):
    w, g = torch.randn(600), torch.randn(600)
    lay = layout_of([w])
    bits = native.select_mask(lay, [g], 10, True)
    prefix = ops().mask_block_prefix(bits)
    before = w.clone()
    with pytest.raises(ValueError, match=r"masked_perturb: saved\[0\] must hold the 10 masked elements"):
        ops().masked_perturb([w], [g], [torch.empty(9)], bits, prefix, [0], [10], [0.1], [False], torch.tensor(1.0), 0.0)
    with pytest.raises(TypeError, match=r"masked_perturb: expected saved\[0\] of dtype"):
        ops().masked_perturb([w], [g], [torch.empty(10, dtype=torch.float16)], bits, prefix, [0], [10], [0.1], [False],
                             torch.tensor(1.0), 0.0)
    with pytest.raises(ValueError, match=r"masked_restore: expected block_prefix"):
        ops().masked_restore([w], [torch.empty(10)], bits, prefix[:-1], [0], [10], torch.tensor(1.0))
    assert torch.equal(w, before)


def saved_count_cases():
    """(the op's args with a bad saved_counts / saved, the error) for masked_perturb and masked_restore."""
    g = torch.Generator().manual_seed(13)
    w = [torch.randn(s, generator=g) for s in (600, 5)]
    gr = [torch.randn(s, generator=g) for s in (600, 5)]
    bits = ref.pack_mask(layout_of(w[:1]), [torch.arange(600) % 60 == 0])  # 10 set bits
    prefix = torch.ops.fsam_kernels.mask_block_prefix(bits)
    cases = [  # (saved sizes, saved_counts, error)
        ([9, 5], [10, 5], r"saved\[0\] must hold the 10 masked elements of params\[0\], got 9"),
        ([10, 5], [9, 5], r"saved\[0\] must hold the 9 masked elements of params\[0\], got 10"),
        ([10, 4], [10, 4], r"expected saved_counts\[1\] of a dense tensor to be its numel 5, got 4"),
        ([10, 5], [10, 5, 0], r"expected one saved count per parameter \(2\), got 3"),
        ([10, 5], [10], r"expected one saved count per parameter \(2\), got 1"),
        ([0, 5], [-1, 5], r"expected saved_counts\[0\] \(the set mask bits of params\[0\]\) in \[0, 600\], got -1"),
        ([10, 5], [601, 5], r"expected saved_counts\[0\] \(the set mask bits of params\[0\]\) in \[0, 600\], got 601"),
    ]
    for sizes, counts, error in cases:
        saved = [torch.empty(n) for n in sizes]
        norm = torch.tensor(1.0)
        yield ("masked_perturb", (w, gr, saved, bits, prefix, [0, -1], counts, [0.1, 0.1], [False, True], norm, 0.0), error)
        yield ("masked_restore", (w, saved, bits, prefix, [0, -1], counts, norm), error)


@pytest.mark.parametrize("case", range(14))
def test_saved_counts_are_checked_by_the_op_and_its_fake(native, case):
    from fsam_kernels import _native_ops

    name, args, error = list(saved_count_cases())[case]
    before = [p.clone() for p in args[0]]
    with pytest.raises(ValueError, match=f"fsam_kernels::{name}: {error}"):
        getattr(ops(), name)(*args)
    with pytest.raises(ValueError, match=f"fsam_kernels::{name}: {error}"):
        getattr(_native_ops, f"_{name}_fake")(*args)
    assert all(torch.equal(p, b) for p, b in zip(args[0], before))


def test_counts_that_disagree_with_the_mask_stay_inside_saved(native):
    # The op trusts saved_counts to be the mask's popcounts (it does not read the mask on the host, on
    # any device); when they are not, it must still never write past saved.
    w, g = torch.randn(600), torch.randn(600)
    bits = ref.pack_mask(layout_of([w]), [torch.arange(600) % 60 == 0])  # 10 set bits
    prefix = ops().mask_block_prefix(bits)
    buf = torch.full((12,), 123.0)
    saved = buf[:4]  # claims 4 of the 10
    ops().masked_perturb([w], [g], [saved], bits, prefix, [0], [4], [0.1], [False], torch.tensor(1.0), 0.0)
    assert torch.equal(buf[4:], torch.full((8,), 123.0))
    ops().masked_restore([w], [saved], bits, prefix, [0], [4], torch.tensor(1.0))


# ------------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("op", OPS)
def test_opcheck(native, op):
    args = opcheck_cases("cpu")[op]
    torch.library.opcheck(getattr(torch.ops.fsam_kernels, op), args)


def test_float64_on_the_cpu_matches_reference(native):
    lay, params, grads = perturb_case([7, 600], torch.float64, [True, False], True)
    bits = native.select_mask(lay, [grads[0]], 3, True)
    assert_same_mask(lay, bits, ref.select_mask_reference(lay, [grads[0]], 3, True))
    check_norm_perturb_restore(native, lay, params, grads, bits)


# ------------------------------------------------------------------------------------------ sharded top-k
def test_sharded_select_ops_reject_bad_arguments(native):
    scores = random_tensors([40000, 0, 7, 70000, 1], seed=14, quantize=True)
    lay = layout_of([torch.zeros(s.shape) for s in scores])
    with pytest.raises(ValueError, match="key_histogram: expected 0 < radix_bits"):
        ops().key_histogram(scores, True, 0, 30, 8)
    with pytest.raises(ValueError, match="key_histogram: expected prefix >= 0"):
        ops().key_histogram(scores, True, -1, 0, 8)
    with pytest.raises(ValueError, match=r"mask_from_threshold: expected quotas\[0\] in \[0, 40000\]"):
        ops().mask_from_threshold(scores, list(lay.bit_offset), lay.mask_bytes, True, 0, [40001, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="threshold key"):
        ops().mask_from_threshold(scores, list(lay.bit_offset), lay.mask_bytes, True, -1, [0] * 5)
