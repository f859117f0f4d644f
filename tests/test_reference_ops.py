"""The reference ops themselves: global top-k, tie rule, packing, perturb/restore exactness."""
import pytest
import torch

from fsam_kernels import reference as ref
from fsam_kernels.layout import MASK_ALIGN_BITS, ParamLayout
from helpers import first_mismatch, halfway_case
from plain_fsam import plain_topk_masks


def layout_of(tensors, masked=None, adaptive=False, rho=0.1):
    n = len(tensors)
    return ParamLayout(list(tensors), masked if masked is not None else [True] * n, [rho] * n, [adaptive] * n)


def test_layout_offsets_are_aligned_and_ordered():
    ts = [torch.zeros(7), torch.zeros(3, 200), torch.zeros(1), torch.zeros(513)]
    lay = layout_of(ts, masked=[True, True, False, True])
    assert lay.masked_index == [0, 1, 3] and lay.dense_index == [2]
    assert lay.bit_offset == [0, 512, 512 + 1024]
    assert all(o % MASK_ALIGN_BITS == 0 for o in lay.bit_offset)
    assert lay.n_masked == 7 + 600 + 513
    assert lay.mask_bytes == (1536 + 1024) // 8
    assert lay.k_for(0.9) == round(0.1 * lay.n_masked)


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(1)
    ts = [torch.zeros(s) for s in [(1,), (7,), (5, 9), (4097,)]]
    lay = layout_of(ts)
    masks = [torch.rand(t.shape, generator=g) < 0.3 for t in ts]
    bits = ref.pack_mask(lay, masks)
    assert bits.dtype == torch.uint8 and bits.numel() == lay.mask_bytes
    for a, b in zip(ref.unpack_mask(lay, bits), masks):
        assert torch.equal(a, b)
    assert ref.mask_popcount(bits) == sum(int(m.sum()) for m in masks)
    # bit order: element e of tensor 0 is bit e (LSB first)
    one = ref.pack_mask(layout_of([torch.zeros(10)]), [torch.tensor([False, False, True] + [False] * 7)])
    assert one[0].item() == 4


@pytest.mark.parametrize("sizes", [[1], [7], [123], [4097], [3, 50, 1, 20], [5] * 40], ids=str)
@pytest.mark.parametrize("keep", [0.0, 0.013, 0.1, 0.5, 1.0])
def test_select_matches_sort_oracle(sizes, keep):
    g = torch.Generator().manual_seed(sum(sizes))
    grads = [torch.randn(s, generator=g) for s in sizes]
    # quantize so that ties at the threshold are common
    grads = [torch.round(x * 4) / 4 for x in grads]
    lay = layout_of(grads)
    k = lay.k_for(1 - keep)
    bits = ref.select_mask_reference(lay, grads, k, scores_are_grads=True)
    got = ref.unpack_mask(lay, bits)
    want = plain_topk_masks([x.float() * x.float() for x in grads], k)
    assert sum(int(m.sum()) for m in got) == k
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_tie_rule_is_lowest_global_index_first():
    a = torch.tensor([1.0, 2.0, 2.0, 0.0])
    b = torch.tensor([2.0, 3.0, 2.0])
    lay = layout_of([a, b])
    masks = ref.unpack_mask(lay, ref.select_mask_reference(lay, [a, b], 3, scores_are_grads=False))
    # 3.0 first, then the two lowest-indexed 2.0s: a[1], a[2]
    assert masks[0].tolist() == [False, True, True, False]
    assert masks[1].tolist() == [False, True, False]


def test_all_zero_fisher_takes_first_k():
    ts = [torch.zeros(10), torch.zeros(6)]
    lay = layout_of(ts)
    masks = ref.unpack_mask(lay, ref.select_mask_reference(lay, ts, 12, scores_are_grads=True))
    assert masks[0].all() and masks[1].tolist() == [True, True, False, False, False, False]


def test_select_is_global_not_per_tensor():
    big = torch.full((10,), 5.0)
    small = torch.full((10,), 1.0)
    lay = layout_of([small, big])
    masks = ref.unpack_mask(lay, ref.select_mask_reference(lay, [small, big], 10, scores_are_grads=False))
    assert not masks[0].any() and masks[1].all()


def test_select_rejects_bad_k():
    lay = layout_of([torch.zeros(4)])
    with pytest.raises(ValueError, match="k"):
        ref.select_mask_reference(lay, [torch.zeros(4)], 5, scores_are_grads=True)


def test_batch_key_is_g_squared_in_fp32():
    # two different |g| whose fp32 squares are both 0: they tie, so the lower index wins
    g = torch.tensor([1e-30, 2e-30, 3.0])
    lay = layout_of([g])
    masks = ref.unpack_mask(lay, ref.select_mask_reference(lay, [g], 2, scores_are_grads=True))
    assert masks[0].tolist() == [True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_then_restore_is_bit_exact(dtype, adaptive):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(dtype) for s in [(33,), (8, 9), (1,)]]
    grads = [torch.randn(p.shape, generator=g).to(dtype) for p in params]
    originals = [p.clone() for p in params]
    lay = ParamLayout(params, [True, True, False], [0.5, 0.5, 0.5], [adaptive] * 3)
    bits = ref.select_mask_reference(lay, [grads[0], grads[1]], 30, scores_are_grads=True)
    norm = ref.grad_norm_reference(lay, grads)
    saved = ref.perturb_reference(lay, grads, bits, norm, 1e-12)
    masks = ref.unpack_mask(lay, bits)
    for p, o, m in zip(params[:2], originals[:2], masks):
        assert torch.equal(p[~m], o[~m])  # unmasked elements untouched
        assert (p[m] != o[m]).any()
    assert sum(s.numel() for s in saved) == 30 + 1  # k masked values + the dense tensor
    ref.restore_reference(lay, bits, saved)
    for p, o in zip(params, originals):
        assert torch.equal(p, o)


def test_perturb_value_matches_formula():
    w = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([0.5, 1.0, -2.0])
    lay = ParamLayout([w], [True], [0.2], [False])
    bits = ref.select_mask_reference(lay, [g], 2, scores_are_grads=True)
    norm = ref.grad_norm_reference(lay, [g])
    torch.testing.assert_close(norm, g.norm())
    ref.perturb_reference(lay, [g], bits, norm, 0.0)
    expected = torch.tensor([1.0, -2.0 + 0.2 * 1.0 / g.norm(), 3.0 - 0.2 * 2.0 / g.norm()])
    torch.testing.assert_close(w, expected)


def test_asam_norm_and_perturbation():
    w = torch.tensor([2.0, -1.0])
    g = torch.tensor([1.0, 3.0])
    lay = ParamLayout([w.clone()], [True], [0.1], [True])
    norm = ref.grad_norm_reference(lay, [g])
    torch.testing.assert_close(norm, (w.abs() * g).norm())
    p = lay.params[0]
    ref.perturb_reference(lay, [g], ref.select_mask_reference(lay, [g], 2, scores_are_grads=True), norm, 0.0)
    torch.testing.assert_close(p, w + 0.1 * w * w * g / norm)


def test_nonfinite_norm_touches_nothing():
    w = torch.randn(10)
    before = w.clone()
    lay = layout_of([w])
    g = torch.randn(10)
    g[3] = float("nan")
    norm = ref.grad_norm_reference(lay, [g])
    assert ref.perturb_reference(lay, [g], lay.empty_mask(), norm, 1e-12) is None
    assert torch.equal(w, before)


def test_fisher_accumulate_reference():
    acc = [torch.zeros(3), torch.ones(2)]
    grads = [torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16), torch.tensor([3.0, 0.0])]
    ref.fisher_accumulate_reference(acc, grads)
    assert acc[0].dtype == torch.float32
    assert acc[0].tolist() == [1.0, 4.0, 0.25] and acc[1].tolist() == [10.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_perturbation_halfway_between_two_values_rounds_to_nearest_even(dtype):
    layout, grads, norm, want = halfway_case(dtype)
    ref.perturb_reference(layout, grads, None, norm, 1e-12)
    assert torch.equal(layout.params[0], want), first_mismatch(layout.params[0], want)


def test_eps_is_added_to_the_norm():
    """scale = rho / (norm + eps): with a norm far from 1 and a large eps, adding eps anywhere else
    (to the squared norm, to the scale, to 1/norm) gives another perturbation."""
    w = torch.zeros(4)
    g = torch.tensor([1.0, -2.0, 4.0, 8.0])
    lay = ParamLayout([w], [False], [3.0], [False])
    ref.perturb_reference(lay, [g], None, torch.tensor(1000.0), 24.0)
    assert torch.equal(w, g * (3.0 / 1024.0))  # exact: 1024 is a power of two
