"""Radix-histogram top-k (the sharded mask selection) against the unsharded reference, in one process.

Ranks are simulated with threads and in-memory collectives, so every split of the rows (uneven,
empty shards) is checked bit for bit without starting process groups; tests/test_fsdp.py runs the
same code under real FSDP2.
"""
import threading

import pytest
import torch

from fsam_kernels import available_backends
from fsam_kernels import distributed_select as ds
from fsam_kernels import reference as ref
from fsam_kernels.backends import get_backend
from fsam_kernels.layout import ParamLayout
from helpers import first_mismatch

SHAPES = [(5, 7), (3,), (0, 4), (13, 2), (1,), (600,)]


def layout_of(tensors):
    n = len(tensors)
    return ParamLayout(list(tensors), [True] * n, [0.1] * n, [False] * n)


def random_scores(seed, shapes=SHAPES, levels=None, signed=False):
    """Scores; with ``levels`` they take only that many magnitudes, so ties are everywhere.
    ``signed`` gives gradients (keyed by g*g), else non-negative Fisher values."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        if levels is None:
            v = torch.rand(s, generator=g) * 1e-3
        else:
            v = torch.randint(0, levels, s, generator=g).float() * 0.25
        if signed:
            v = v * (torch.randint(0, 2, s, generator=g).float() * 2 - 1)
        out.append(v)
    return out


def shard_rows(t, world):
    """The ``world`` local shards FSDP2 makes: torch.chunk along dim 0, padded with empty shards."""
    chunks = list(torch.chunk(t, world, dim=0)) if t.shape[0] > 0 else []
    while len(chunks) < world:
        chunks.append(t[t.shape[0]:])
    return chunks


def assert_bits_equal(layout, got, want):
    for j, (a, b) in enumerate(zip(ref.unpack_mask(layout, got), ref.unpack_mask(layout, want))):
        assert torch.equal(a, b), f"masked tensor {j}: {first_mismatch(a, b)}"
    assert torch.equal(got, want), "padding bits differ"


# --------------------------------------------------------------------------- one process
@pytest.mark.parametrize("backend_name", available_backends("cpu"))
@pytest.mark.parametrize("square", [True, False], ids=["batch", "empirical"])
@pytest.mark.parametrize("levels", [None, 3, 1], ids=["distinct", "3-levels", "all-equal"])
def test_histogram_select_equals_select_mask(backend_name, square, levels):
    backend = get_backend(backend_name, "cpu")
    scores = random_scores(1, levels=levels, signed=square)
    layout = layout_of(scores)
    n = layout.n_masked
    for k in sorted({0, 1, 2, n // 10, n // 2, n - 1, n}):
        want = ref.select_mask_reference(layout, scores, k, square)
        got = ds.select_mask_by_histogram(backend, layout, scores, k, square)
        assert ref.mask_popcount(got) == k
        assert_bits_equal(layout, got, want)
        assert_bits_equal(layout, backend.select_mask(layout, scores, k, square), want)


def test_histogram_select_rejects_bad_k():
    scores = random_scores(2)
    layout = layout_of(scores)
    backend = get_backend("torch", "cpu")
    with pytest.raises(ValueError, match="k="):
        ds.select_mask_by_histogram(backend, layout, scores, layout.n_masked + 1, True)
    with pytest.raises(ValueError, match="k="):
        ds.select_mask_by_histogram(backend, layout, scores, -1, True)


def test_key_histogram_counts_keys_under_prefix():
    scores = [torch.tensor([0.5, 0.5, 2.0, 0.0]), torch.tensor([[2.0], [0.25]])]
    layout = layout_of(scores)
    keys = torch.cat([ref.fisher_key(s, False) for s in scores]).to(torch.int64)
    top = ref.key_histogram_reference(layout, scores, False, 0, 24)
    assert top.shape == (2, 256) and int(top.sum()) == 6
    for d in range(256):
        assert int(top[:, d].sum()) == int(((keys >> 24) == d).sum())
    prefix = int(keys[2]) >> 24  # the digit of 2.0
    sub = ref.key_histogram_reference(layout, scores, False, prefix, 16)
    assert sub[0].sum() == 1 and sub[1].sum() == 1  # only the two 2.0 keys share that top digit
    with pytest.raises(ValueError, match="shift"):
        ref.key_histogram_reference(layout, scores, False, 0, 30)


def test_mask_from_threshold_takes_ties_row_major():
    scores = [torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5, 1.0, 1.0, 1.0])]
    layout = layout_of(scores)
    thr = int(ref.fisher_key(torch.tensor(1.0), False))
    m = ref.unpack_mask(layout, ref.mask_from_threshold_reference(layout, scores, False, thr, [2]))[0]
    assert m.tolist() == [True, True, True, False, False, False, False, False]
    with pytest.raises(ValueError, match="quotas"):
        ref.mask_from_threshold_reference(layout, scores, False, thr, [1, 2])


def test_tie_quotas_follow_global_order():
    # 2 ranks x 3 tensors; global order: (t0,r0) (t0,r1) (t1,r0) (t1,r1) (t2,r0) (t2,r1)
    ties = torch.tensor([[2, 0, 5], [1, 4, 1]])
    assert ds.tie_quotas(ties, 0).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert ds.tie_quotas(ties, 2).tolist() == [[2, 0, 0], [0, 0, 0]]
    assert ds.tie_quotas(ties, 5).tolist() == [[2, 0, 0], [1, 2, 0]]
    assert ds.tie_quotas(ties, 13).tolist() == [[2, 0, 5], [1, 4, 1]]


def test_driver_counts_past_2_31_exactly():
    # 70B values sharded: digit and tie counts past 32 bits (no int32 or float on the way)
    big = 1 << 31
    hist = torch.zeros(256, dtype=torch.int64)
    hist[200], hist[100] = 3 * big, 5 * big + 1
    assert ds.next_digit(hist, 3 * big + 7) == (100, 7)
    assert ds.next_digit(hist, 8 * big + 1) == (100, 5 * big + 1)
    ties = torch.tensor([[2 * big, 5], [big + 3, 9]])  # global order: (t0,r0) (t0,r1) (t1,r0) (t1,r1)
    assert ds.tie_quotas(ties, 3 * big + 4).tolist() == [[2 * big, 1], [big + 3, 0]]


def test_next_digit_detects_inconsistent_histograms():
    hist = torch.zeros(256, dtype=torch.int64)
    hist[3] = 2
    assert ds.next_digit(hist, 1) == (3, 1)
    with pytest.raises(RuntimeError, match="fewer than"):
        ds.next_digit(hist, 3)


# --------------------------------------------------------------------------- simulated ranks
class ThreadWorld:
    """In-memory all_reduce / all_gather for ``world`` threads (one per simulated rank)."""

    def __init__(self, world):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots = [None] * world

    def _exchange(self, rank, t):
        self.slots[rank] = t.clone()
        self.barrier.wait()
        out = torch.stack(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone read it
        return out

    def for_rank(self, rank):
        return dict(
            all_reduce_sum=lambda t: self._exchange(rank, t).sum(dim=0),
            all_gather=lambda t: self._exchange(rank, t),
            rank=rank,
        )


def sharded_select(backend, scores, k, square, world):
    shards = [shard_rows(s, world) for s in scores]
    n_global = sum(s.numel() for s in scores)
    comm = ThreadWorld(world)
    results, errors = [None] * world, []

    def run(rank):
        try:
            local = [sh[rank] for sh in shards]
            lay = layout_of(local)
            bits = ds.select_mask_by_histogram(backend, lay, local, k, square, n_global=n_global, **comm.for_rank(rank))
            results[rank] = ref.unpack_mask(lay, bits)
        except BaseException as exc:  # surface a rank's failure in the test, not in a thread
            errors.append(exc)
            comm.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    # Local masks, concatenated in rank order, are the unsharded masks.
    return [torch.cat([results[r][j] for r in range(world)]) for j in range(len(scores))]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("levels", [None, 4], ids=["distinct", "ties"])
def test_sharded_select_equals_unsharded(world, levels):
    backend = get_backend("torch", "cpu")
    scores = random_scores(10 + world, levels=levels, signed=True)
    layout = layout_of(scores)
    n = layout.n_masked
    for k in sorted({1, n // 7, n // 2, n - 3}):
        want = ref.unpack_mask(layout, ref.select_mask_reference(layout, scores, k, True))
        got = sharded_select(backend, scores, k, True, world)
        for j, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"world={world} k={k} tensor {j}: {first_mismatch(a, b)}"


def test_ties_straddling_shard_boundaries_go_to_lower_ranks_first():
    # All keys equal: the mask is the first k elements in global order whatever the split.
    scores = [torch.ones(6, 3), torch.ones(5)]
    got = sharded_select(get_backend("torch", "cpu"), scores, 10, False, 4)
    assert got[0].reshape(-1).tolist() == [True] * 10 + [False] * 8
    assert not got[1].any()
